"""The PyTorch face: a trainable `torch.nn.Module` over the same op list.

`as_module(model)` takes any backend's `gemma_core.Model` (its config and weights) and returns a
`GemmaForCausalLM` whose parameters carry the Hugging Face canonical names, unfused, so that
`load_state_dict` of a transformers Gemma/Gemma2/Gemma3 causal LM works both ways. Its forward is
a thin adapter, nothing of the architecture is written here: the step inputs come from
`gemma_core.step.step_inputs` (numpy on the host, then tensors), the caches from the torch
backend's `new_cache_layer`, and the graph of `gemma_core.graph.build_graph(config)` runs bound
(`bind`/`run_bound`) to the torch op table of the parameters' dtype, with the Parameters
themselves as the weights. Unlike `Model.forward` it runs outside inference mode and does not
fuse projections, so autograd, optimizers, autocast and `torch.compile` see ordinary tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backends.torch import backend as torch_backend
from backends.torch.ops import DTYPES, make_op_table
from gemma_core.cache import KVCache, check_cache_fits, layer_capacity
from gemma_core.config import GemmaConfig
from gemma_core.errors import ConfigError, InputError
from gemma_core.graph import bind, build_graph, cache_name, run_bound
from gemma_core.layout import EMBED, FINAL_NORM, LM_HEAD, iter_params, validate_weights
from gemma_core.lora import (
    LoraConfig,
    apply_lora,
    check_lora_weights,
    init_lora_weights,
    lora_shapes,
    model_adapter,
)
from gemma_core.masks import layer_kinds
from gemma_core.model import check_dtype
from gemma_core.quant import SCALE_SUFFIX
from gemma_core.step import Bookkeeping, step_inputs
from gemma_core.weights import canonical_weights

IGNORE_INDEX = -100  # label ids the loss skips, as transformers
_DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}


@dataclasses.dataclass
class CausalLMOutput:
    """What `GemmaForCausalLM.forward` returns, named as transformers names it: `logits [B,T,V]`
    in the parameters' dtype, `loss` (a float32 scalar, or None without labels) and
    `past_key_values` (a `gemma_core.KVCache` to pass to the next call)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None


def host_weights(model: Any) -> dict[str, np.ndarray]:
    """A `gemma_core.Model`'s weights as canonical numpy arrays (own copies, unfused: a backend
    that runs stacked q/k/v and gate/up products has its stacks split back along the output
    axis; a quantised model's values and scales as gemma_core.quant stores them, which only a
    backend holding that layout gives back: numpy). Heads other than the causal LM are refused."""
    config: GemmaConfig = model.config
    backend = getattr(getattr(model, "backend", None), "name", "numpy")
    if config.quantization is not None and backend != "numpy":
        raise ConfigError(f"quantization: a quantised base for the torch module (QLoRA) is read in "
                          f"gemma-core's layout: load it on the numpy backend, not {backend!r}")
    if getattr(model, "task", "causal-lm") != "causal-lm":
        raise ConfigError(f"task: the torch module is a causal LM; this model's task is {model.task!r}")
    out = {name: np.array(w, copy=True) for name, w in canonical_weights(model).items()}  # own copies
    validate_weights(config, out)
    return out


def as_module(model: Any, *, allow_float16: bool = False, lora: LoraConfig | None = None,
              lora_weights: Mapping[str, np.ndarray] | None = None, seed: int = 0) -> GemmaForCausalLM:
    """A trainable `GemmaForCausalLM` holding a copy of `model`'s weights (any backend's
    `gemma_core.Model`), in the model's dtype, on its device where the model is a torch one
    (`.to(...)` moves it). `allow_float16` as in `gemma_core.load`. With `lora`, the adapter's
    weights (`lora_weights`, or fresh ones of `seed` as PEFT initialises them) are the only
    trainable Parameters and the base weights are frozen."""
    if lora is None:  # the adapter the model runs, if any, trains on
        lora, held = model_adapter(model)
        lora_weights = held if lora is not None and lora_weights is None else lora_weights
    dtype = DTYPES.get(model.dtype, torch.float32)
    device = model.device if getattr(model.backend, "name", None) == "torch" else None
    module = GemmaForCausalLM(model.config, host_weights(model), dtype=dtype,
                              allow_float16=allow_float16, lora=lora, lora_weights=lora_weights,
                              seed=seed)
    return module.to(torch_backend.device(device)) if device is not None else module


def _frozen_pad_embed(pad_id: int) -> Callable[..., torch.Tensor]:
    """The `embed` op with the pad token's row frozen (no gradient), as transformers' Gemma
    embeddings (`nn.Embedding(padding_idx=pad_token_id)`); the values are the op's own."""

    def embed(ids: torch.Tensor, table: torch.Tensor, *, scale: float) -> torch.Tensor:
        return F.embedding(ids, table, padding_idx=pad_id) * table.new_tensor(scale)

    return embed


class _TiedHead(torch.nn.Module):
    """`lm_head` of a tied model: its `weight` is the embedding's Parameter (so `state_dict`
    carries `lm_head.weight`, as transformers' does, and `named_parameters` lists it once).
    Loading takes the embedding as the one source of the matrix: an `lm_head.weight` entry is
    accepted (shape checked) or may be left out."""

    def __init__(self, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any,
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        key = prefix + "weight"
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key)
        if key in state_dict and tuple(state_dict[key].shape) != tuple(self.weight.shape):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                              f"{tuple(state_dict[key].shape)}, the tied embedding has "
                              f"{tuple(self.weight.shape)}")


def _container(root: torch.nn.Module, path: Iterable[str]) -> torch.nn.Module:
    """The submodule at `path` (e.g. model, layers, 0, self_attn), made where missing: a
    `ModuleList` where the children are layer indices, else a plain `Module`."""
    node = root
    parts = list(path)
    for i, part in enumerate(parts):
        if part not in node._modules:
            child_is_index = i + 1 < len(parts) and parts[i + 1].isdigit()
            node.add_module(part, torch.nn.ModuleList() if child_is_index else torch.nn.Module())
        node = node._modules[part]  # type: ignore[assignment]
    return node


class GemmaForCausalLM(torch.nn.Module):
    """A Gemma causal LM as a torch module: the canonical weights as Parameters under their
    Hugging Face names, the forward pass the bound op list of `build_graph(config)`."""

    def __init__(self, config: GemmaConfig, weights: Mapping[str, np.ndarray], *,
                 dtype: torch.dtype = torch.float32, allow_float16: bool = False,
                 lora: LoraConfig | None = None, lora_weights: Mapping[str, np.ndarray] | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        weights = {k: v for k, v in weights.items() if not (config.tie_word_embeddings and k == LM_HEAD)}
        validate_weights(config, weights)
        self.config, self.allow_float16 = config, allow_float16
        self.graph = build_graph(config)  # unfused: each canonical weight is one Parameter
        self.graph_without_cache = build_graph(config, cache=False)  # training: no cache kept
        self.lora = lora
        if lora is not None:  # the adapter as a graph rewrite (gemma_core.lora)
            self.graph = apply_lora(self.graph, config, lora)
            self.graph_without_cache = apply_lora(self.graph_without_cache, config, lora)
        self.layer_kinds = layer_kinds(config)  # the attention masks a step's inputs hold
        quant = config.quantization
        self.quantized: tuple[str, ...] = ()  # names held as (values, scale) buffers: QLoRA's base
        for name, _, _ in iter_params(config):  # layout order: the embedding first
            *path, leaf = name.split(".")
            if quant is not None and quant.scheme_for(name) is not None:
                # frozen values and their float32 scales, the scales stored bit-cast to int32 so
                # that `.to(dtype)` (which casts floating buffers) leaves them exact
                values = torch.from_numpy(np.array(weights[name]))
                scale = torch.from_numpy(np.array(weights[name + SCALE_SUFFIX], np.float32))
                _container(self, path).register_buffer(leaf, values)
                _container(self, path).register_buffer(leaf + SCALE_SUFFIX, scale.view(torch.int32))
                self.quantized += (name,)
                continue
            w = np.ascontiguousarray(weights[name], dtype=np.float32)
            param = torch.nn.Parameter(torch.from_numpy(w.copy()).to(dtype))
            _container(self, path).register_parameter(leaf, param)
        if config.tie_word_embeddings and EMBED not in self.quantized:
            self.add_module("lm_head", _TiedHead(self.get_parameter(EMBED)))
        if lora is not None:
            adapter = init_lora_weights(config, lora, seed) if lora_weights is None else dict(lora_weights)
            check_lora_weights(config, lora, adapter)
            for param in self.parameters():
                param.requires_grad_(False)  # only the adapter trains
            for name, w in adapter.items():
                *path, leaf = name.split(".")
                value = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)
                _container(self, path).register_parameter(leaf, torch.nn.Parameter(value))
        self._tables: dict[str, Mapping[str, Callable[..., Any]]] = {}

    def lora_weights(self) -> dict[str, np.ndarray]:
        """The adapter's weights as float32 numpy arrays under their gemma_core names (for
        `gemma_core.lora.save_peft`); empty without an adapter."""
        if self.lora is None:
            return {}
        names = lora_shapes(self.config, self.lora)
        return {n: self.get_parameter(n).detach().float().cpu().numpy().copy() for n in names}

    def op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        """The torch op table computing in `dtype`, built once per dtype. Not the backend's
        shared table: the module's is its own, so patching one does not change the other."""
        if dtype not in self._tables:
            table = dict(make_op_table(dtype))
            table["embed"] = _frozen_pad_embed(self.config.pad_token_id)
            if self.lora is not None and self.lora.dropout > 0:
                table["lora"] = self._lora_with_dropout(table["lora"], self.lora.dropout)
            self._tables[dtype] = table
        return self._tables[dtype]

    def _lora_with_dropout(self, lora: Callable[..., torch.Tensor], p: float) -> Callable[..., torch.Tensor]:
        """The `lora` op with PEFT's dropout of its input in train mode (the identity in eval)."""

        def op(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, scale: float) -> torch.Tensor:
            return lora(F.dropout(x, p, training=self.training), a, b, scale=scale)

        return op

    def compute_dtype(self, device: torch.device) -> str:
        """The dtype name the step computes in (its op table and cache buffers): autocast's
        where it is on for `device` (the Parameters stay as they are, the products autocast
        makes are in its dtype), else the embedding's (`.to(dtype)` changes it)."""
        if torch.is_autocast_enabled(device.type):
            dt = torch.get_autocast_dtype(device.type)
        else:
            dt = self.get_parameter(FINAL_NORM).dtype  # a norm: float in every model
        if dt not in _DTYPE_NAMES:
            raise ConfigError(f"dtype: the parameters are {dt}; supported: {', '.join(DTYPES)}")
        return _DTYPE_NAMES[dt]

    def forward(self, input_ids: Any, attention_mask: Any = None, labels: Any = None,
                past_key_values: KVCache | None = None, *, use_cache: bool | None = None,
                max_length: int | None = None) -> CausalLMOutput:
        """Logits of `input_ids [B,T]` after what `past_key_values` holds, and with `labels [B,T]`
        transformers' shifted next-token loss (logits[:, :-1] against labels[:, 1:], -100 skipped,
        the mean over the counted tokens, in float32). `attention_mask` marks real tokens (1) and
        left padding (0); RoPE positions are the running count of real tokens. The cache returned
        has `max_length` slots (default: the past's plus T, at least its own max_length); the
        cache passed is left as it was. `use_cache` (default: in eval mode, or with a past)
        False runs the step without a cache (each layer attends over the T keys only, as
        transformers' training forward) and returns no `past_key_values`."""
        device = self.get_parameter(FINAL_NORM).device
        dtype = self.compute_dtype(device)
        check_dtype(self.config, dtype, self.allow_float16)
        use_cache = (not self.training or past_key_values is not None) if use_cache is None else use_cache
        if not use_cache and past_key_values is not None:
            raise InputError("use_cache: False with past_key_values; continuing a cache keeps one")
        if use_cache:
            env, book = self._host_step(input_ids, attention_mask, past_key_values, max_length, dtype,
                                        device)
            env = self._step(self.graph, env, dtype)
            cache: KVCache | None = self._cache_after(env, book)
        else:
            env = self._step(self.graph_without_cache, self._host_inputs_only(input_ids, attention_mask,
                                                                             device), dtype)
            cache = None
        logits = env["logits"]
        loss = None if labels is None else causal_lm_loss(logits, torch.as_tensor(labels, device=device))
        return CausalLMOutput(logits=logits, loss=loss, past_key_values=cache)

    @torch.compiler.disable
    def _host_inputs_only(self, input_ids: Any, attention_mask: Any,
                          device: torch.device) -> dict[str, Any]:
        """The step inputs without a cache (`step_inputs` with no bookkeeping), as tensors."""
        ids, mask = self._host_inputs(input_ids, attention_mask)
        inputs, _ = step_inputs(ids, mask, windows=self.layer_kinds)
        return {k: torch.as_tensor(v, device=device) for k, v in inputs.items()}

    @torch.compiler.disable
    def _host_step(self, input_ids: Any, attention_mask: Any, past: KVCache | None,
                   max_length: int | None, dtype: str, device: torch.device,
                   ) -> tuple[dict[str, Any], Bookkeeping]:
        """The step's env (its inputs from `step_inputs`, as tensors, and each layer's cache)
        and the bookkeeping after it, computed on the host as `Model.forward` does: outside any
        compiled graph, which then takes them as inputs (a handful of small arrays)."""
        ids, mask = self._host_inputs(input_ids, attention_mask)
        cache = self._cache_for(past, ids.shape, max_length, dtype, device)
        inputs, book = step_inputs(ids, mask, Bookkeeping(cache.length, cache.valid, cache.seen),
                                   windows=self.layer_kinds)
        env: dict[str, Any] = {k: torch.as_tensor(v, device=device) for k, v in inputs.items()}
        env.update({cache_name(i): layer for i, layer in enumerate(cache.layers)})
        return env, book

    @torch.compiler.disable
    def _cache_after(self, env: Mapping[str, Any], book: Bookkeeping) -> KVCache:
        """The cache a step leaves: its layers from `env`, its counters from `book`."""
        return KVCache(layers=[env[cache_name(i)] for i in range(self.config.num_layers)],
                       length=book.length, max_length=book.max_length, valid=book.valid, seen=book.seen)

    def _step(self, graph: Any, env: dict[str, Any], dtype: str) -> dict[str, Any]:
        """The op list over the Parameters (bound per call: `.to()` and `load_state_dict` keep
        the Parameter objects, but a compiled trace must see them as it finds them)."""
        weights: dict[str, Any] = dict(self.named_parameters())
        for name in self.quantized:  # as the torch backend binds a weight without its kernel
            values = self.get_buffer(name)
            scale = self.get_buffer(name + SCALE_SUFFIX).view(torch.float32)
            weights[name], weights[name + SCALE_SUFFIX] = (None, values, scale), scale
        run_bound(bind(graph, self.op_table(dtype), weights), env)
        return env

    def _host_inputs(self, input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
        """Checked `(ids [B,T] int64, mask [B,T] bool)` on the host."""
        ids = np.asarray(_to_host(input_ids))
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
            raise InputError(f"input_ids: expected a non-empty [batch, length] integer array, "
                             f"got shape {ids.shape} of {ids.dtype}")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            raise InputError(f"input_ids: token id {int(ids[bad][0])} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        if attention_mask is None:
            return ids.astype(np.int64), np.ones(ids.shape, bool)
        mask = np.asarray(_to_host(attention_mask))
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
            raise InputError(f"attention_mask: expected 0/1 values of shape {ids.shape}, "
                             f"got shape {mask.shape}")
        return ids.astype(np.int64), mask.astype(bool)

    def _cache_for(self, past: KVCache | None, shape: tuple[int, ...], max_length: int | None,
                   dtype: str, device: torch.device) -> KVCache:
        """The cache this step writes: new layers from the backend (`new_cache_layer`) of
        `max_length` or T slots; or a copy of `past`, grown where its slots do not fit T more."""
        c, (b, t) = self.config, shape
        start = 0 if past is None else past.length
        size = max(max_length or 0, start + t, 0 if past is None else past.max_length)
        if size > c.max_position_embeddings:
            raise InputError(f"max_length: {size} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}")
        if past is None:
            check_cache_fits(c, b, size, dtype, str(device))
            layers = [torch_backend.new_cache_layer(b, c.num_kv_heads, layer_capacity(c, i, size),
                                                    c.head_dim, dtype, str(device))
                      for i in range(c.num_layers)]
            return KVCache(layers=layers, length=0, max_length=size, valid=np.zeros((b, size), bool),
                           seen=np.zeros(b, np.int64))
        past.check_usable()
        if past.batch_size != b:
            raise InputError(f"input_ids: batch of {b} rows for a cache of {past.batch_size}")
        layers = [self._grown(i, layer, size) for i, layer in enumerate(past.layers)]
        valid = np.pad(past.valid, ((0, 0), (0, size - past.max_length)))
        return KVCache(layers=layers, length=past.length, max_length=size, valid=valid, seen=past.seen.copy())

    def _grown(self, index: int, layer: Any, max_length: int) -> Any:
        """A copy of a torch cache layer (its (keys, values) slot buffers [B,K,C,H]; the step
        writes them in place, and the caller's cache is a value) with the capacity of
        `max_length`. A layer's capacity only grows while it holds fewer tokens than its slots,
        where token t sits in slot t (`gemma_core.cache`), so zero slots appended keep it valid."""
        capacity = layer_capacity(self.config, index, max_length)
        copy = torch_backend.copy_cache_layer(layer)
        return tuple(F.pad(x, (0, 0, 0, capacity - x.shape[2])) if x.shape[2] < capacity else x
                     for x in copy)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: logits[:, :-1] predict labels[:, 1:], -100 skipped, the
    mean over the counted tokens, computed in float32."""
    if labels.shape != logits.shape[:2]:
        raise InputError(f"labels: shape {tuple(labels.shape)} differs from input_ids "
                         f"{tuple(logits.shape[:2])}")
    # the labels shift, not the logits (as transformers' ForCausalLMLoss): the last position's
    # label is -100, so the [B,T,V] logits stay a view, with no slice copy of them forward nor a
    # zero-filled full-size gradient for the slice's backward (the largest tensors of a step)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1).long(),
                           ignore_index=IGNORE_INDEX)


def _to_host(x: Any) -> Any:
    """A tensor as numpy (ids and masks only: small integer arrays), anything else as it is."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


__all__ = ["CausalLMOutput", "GemmaForCausalLM", "as_module", "causal_lm_loss", "host_weights"]
