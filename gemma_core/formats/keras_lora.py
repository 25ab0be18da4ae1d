"""keras-hub's LoRA (`backbone.enable_lora(rank, target_layer_names)`) to and from PEFT's format
(`gemma_core.lora`: `A [r, I]`, `B [O, r]`, the update `alpha / r * B @ A` of a weight `[O, I]`).

keras-hub factors the update of each `EinsumDense` kernel as `lora_alpha / rank * a @ b`, with
`a` the kernel's shape but its last axis (`rank` there) and `b` `[rank, last]`: the kernel seen as
a matrix `[prod(leading axes), last]` gets a rank-`rank` update. Its kernels are the projections
reshaped and transposed (`gemma_core.formats.keras_hub.table`): query/key/value `[heads, D, H]`,
attention output `[heads, H, D]`, the MLP's `[in, out]`. So one adapter is a rank-r matrix in one
layout and a matrix of a known rank bound in the other (a query's PEFT update of rank r has rank
up to min(H, heads * r) as keras-hub's `[heads * D, H]` matrix); converting computes the update in
float64 and factors it again (SVD) at that bound, so the model's function is kept to float64
rounding, not the factors' values. keras-hub uses one rank for every layer and PEFT's config here
one `r` too: the rank is the largest bound of the targeted projections, smaller factors padded
with zeros (which add nothing).

Tensors of the keras side are keyed by the layer's `path` in a keras-hub Gemma backbone
(`decoder_block_{i}/attention/query`, `decoder_block_{i}/ffw_linear`), each a pair `(a, b)`.
`to_backbone` / `from_backbone` move them into and out of a live backbone (keras imported by the
caller: this module imports no optional library); `backbone.save_lora_weights(path.lora.h5)` then
writes keras-hub's own file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gemma_core.config import GemmaConfig
from gemma_core.errors import ConfigError, WeightError
from gemma_core.layout import param_name
from gemma_core.lora import LoraConfig, check_lora_weights, lora_names
from gemma_core.quant import MODULE_ROLES

# transformers' module name -> keras-hub's layer name (`enable_lora`'s target_layer_names)
KERAS_LAYERS = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attention_output",
                "gate_proj": "ffw_gating", "up_proj": "ffw_gating_2", "down_proj": "ffw_linear"}
_MODULES = {layer: module for module, layer in KERAS_LAYERS.items()}
KerasLora = dict[str, tuple[np.ndarray, np.ndarray]]


def layer_path(layer: int, module: str) -> str:
    """The keras-hub layer path of projection `module` (transformers' name) in block `layer`."""
    name = KERAS_LAYERS[module]
    inner = f"attention/{name}" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else name
    return f"decoder_block_{layer}/{inner}"


def _heads(config: GemmaConfig, module: str) -> int:
    return config.num_kv_heads if module in ("k_proj", "v_proj") else config.num_heads


def _to_kernel(config: GemmaConfig, module: str, w: np.ndarray) -> np.ndarray:
    """A projection `[O, I]` (transformers' layout) as keras-hub's kernel."""
    h = config.head_dim
    if module in ("q_proj", "k_proj", "v_proj"):  # [N*H, D] -> [N, D, H]
        return w.reshape(_heads(config, module), h, w.shape[1]).transpose(0, 2, 1)
    if module == "o_proj":  # [D, N*H] -> [N, H, D]
        return w.reshape(w.shape[0], config.num_heads, h).transpose(1, 2, 0)
    return w.T


def _from_kernel(config: GemmaConfig, module: str, k: np.ndarray) -> np.ndarray:
    """keras-hub's kernel as the projection `[O, I]`: `_to_kernel`'s inverse."""
    if module in ("q_proj", "k_proj", "v_proj"):
        n, d, h = k.shape
        return k.transpose(0, 2, 1).reshape(n * h, d)
    if module == "o_proj":
        n, h, d = k.shape
        return k.transpose(2, 0, 1).reshape(d, n * h)
    return k.T


def _factor(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(x [M, rank], y [rank, N]) with x @ y = m, for m of rank at most `rank` (to rounding);
    columns past m's dimensions are zeros."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    k = min(rank, s.size)
    x, y = np.zeros((m.shape[0], rank)), np.zeros((rank, m.shape[1]))
    root = np.sqrt(s[:k])
    x[:, :k], y[:k] = u[:, :k] * root, root[:, None] * vt[:k]
    return x, y


def _layers(config: GemmaConfig, lora: LoraConfig) -> list[int]:
    return [i for i in range(config.num_layers) if lora.applies_to(i)]


def keras_rank(config: GemmaConfig, lora: LoraConfig) -> int:
    """The keras-hub rank that holds the PEFT adapter `lora` exactly: the largest rank bound of
    its projections as keras-hub's kernel matrices (module docstring)."""
    bounds = []
    for module in lora.target_modules:
        if module in ("q_proj", "k_proj", "v_proj"):
            heads = _heads(config, module)
            bounds.append(min(config.head_dim, heads * lora.r, heads * config.hidden_size))
        else:
            bounds.append(lora.r)
    return max(bounds)


def peft_to_keras(config: GemmaConfig, lora: LoraConfig, weights: Mapping[str, np.ndarray],
                  rank: int | None = None, keras_scale: float = 1.0) -> tuple[int, KerasLora]:
    """(rank, keras-hub factors by layer path) of a PEFT adapter, for a backbone whose LoRA
    layers scale by `keras_scale` (their `lora_alpha / lora_rank`: 1 as `enable_lora` makes
    them). `rank` (default `keras_rank`) must be at least that bound. Every block gets factors:
    those `lora.layers` leaves out are zeros, as keras-hub enables its layers in every block."""
    check_lora_weights(config, lora, weights)
    need = keras_rank(config, lora)
    rank = need if rank is None else rank
    if rank < need:
        raise ConfigError(f"keras rank: {rank} cannot hold this adapter exactly (it needs {need})")
    out: KerasLora = {}
    for layer in range(config.num_layers):
        for module in lora.target_modules:
            base = param_name(config, MODULE_ROLES[module], layer)
            a_name, b_name = lora_names(base)
            if a_name not in weights:  # a block the adapter leaves out
                shape = _kernel_shape(config, module)
                a = np.zeros((*shape[:-1], rank), np.float32)
                b = np.zeros((rank, shape[-1]), np.float32)
            else:
                delta = lora.scale * (np.asarray(weights[b_name], np.float64)
                                      @ np.asarray(weights[a_name], np.float64))
                kernel = _to_kernel(config, module, delta)
                x, y = _factor(kernel.reshape(-1, kernel.shape[-1]), rank)
                a = (x / keras_scale).reshape(*kernel.shape[:-1], rank).astype(np.float32)
                b = y.astype(np.float32)
            out[layer_path(layer, module)] = (a, b)
    return rank, out


def _kernel_shape(config: GemmaConfig, module: str) -> tuple[int, ...]:
    from gemma_core.layout import iter_params

    shapes = {name: shape for name, shape, _ in iter_params(config)}
    o, i = shapes[param_name(config, MODULE_ROLES[module], 0)]
    return _to_kernel(config, module, np.zeros((o, i), np.float32)).shape


def keras_to_peft(config: GemmaConfig, tensors: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  keras_scale: float = 1.0) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """(LoraConfig, adapter weights under our names) of keras-hub factors by layer path (as
    `from_backbone` reads them), scaled by `keras_scale` (`lora_alpha / lora_rank`). The
    PEFT rank is the largest rank bound of the updates as `[O, I]` matrices; alpha equals it
    (scale 1)."""
    found: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    for path, (a, b) in tensors.items():
        block, _, rest = path.partition("/")
        module = _MODULES.get(rest.removeprefix("attention/"))
        if not block.startswith("decoder_block_") or module is None or \
                not block.removeprefix("decoder_block_").isdigit():
            raise WeightError(f"keras lora: {path!r} is not a Gemma projection layer of keras-hub")
        found[int(block.removeprefix("decoder_block_")), module] = (np.asarray(a), np.asarray(b))
    if not found:
        raise WeightError("keras lora: no LoRA factors")
    modules = sorted({m for _, m in found}, key=list(KERAS_LAYERS).index)
    layers = sorted({i for i, _ in found})
    if any((i, m) not in found for i in layers for m in modules):
        raise WeightError("keras lora: every block must carry the same projections' factors")
    deltas, bounds = {}, []
    for (layer, module), (a, b) in found.items():
        rank = b.shape[0]
        kernel = keras_scale * (a.astype(np.float64).reshape(-1, rank) @ b.astype(np.float64))
        delta = _from_kernel(config, module, kernel.reshape(*a.shape[:-1], b.shape[1]))
        heads = _heads(config, module) if module in ("q_proj", "k_proj", "v_proj") else 1
        bounds.append(min(heads * rank, *delta.shape))
        deltas[layer, module] = delta
    r = max(bounds)
    lora = LoraConfig(r=r, alpha=float(r), target_modules=tuple(modules),
                      layers=None if layers == list(range(config.num_layers)) else tuple(layers))
    weights: dict[str, np.ndarray] = {}
    for (layer, module), delta in deltas.items():
        b_factor, a_factor = _factor(delta, r)
        a_name, b_name = lora_names(param_name(config, MODULE_ROLES[module], layer))
        weights[a_name], weights[b_name] = a_factor.astype(np.float32), b_factor.astype(np.float32)
    check_lora_weights(config, lora, weights)
    return lora, weights


def _lora_layers(backbone: Any) -> dict[str, Any]:
    return {layer.path: layer for layer in backbone._flatten_layers(include_self=False)
            if getattr(layer, "lora_enabled", False)}


def to_backbone(backbone: Any, config: GemmaConfig, lora: LoraConfig,
                weights: Mapping[str, np.ndarray]) -> int:
    """Enable keras-hub's LoRA on `backbone` (a keras-hub Gemma backbone of `config`, without
    LoRA yet) at the rank that holds the PEFT adapter, on its projections, and set the factors;
    returns the rank."""
    if getattr(backbone, "_lora_enabled_layers", None):
        raise ConfigError("keras lora: the backbone has LoRA enabled already")
    rank, tensors = peft_to_keras(config, lora, weights)
    backbone.enable_lora(rank, target_layer_names=[KERAS_LAYERS[m] for m in lora.target_modules])
    layers = _lora_layers(backbone)
    if set(layers) != set(tensors):
        raise ConfigError(f"keras lora: the backbone's LoRA layers ({len(layers)}) are not the "
                          f"adapter's ({len(tensors)}): another architecture than {config.architecture}?")
    for path, (a, b) in tensors.items():
        layer = layers[path]
        scale = layer.lora_alpha / layer.lora_rank
        layer.lora_kernel_a.assign(a / np.float32(scale))
        layer.lora_kernel_b.assign(b)
    return rank


def from_backbone(backbone: Any, config: GemmaConfig) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """The PEFT adapter (LoraConfig, weights) of a keras-hub Gemma backbone's enabled LoRA."""
    layers = _lora_layers(backbone)
    scales = {layer.lora_alpha / layer.lora_rank for layer in layers.values()}
    if len(scales) > 1:
        raise ConfigError(f"keras lora: the layers scale differently ({sorted(scales)})")
    tensors = {path: (np.asarray(layer.lora_kernel_a), np.asarray(layer.lora_kernel_b))
               for path, layer in layers.items()}
    return keras_to_peft(config, tensors, scales.pop() if scales else 1.0)
