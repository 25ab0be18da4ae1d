"""LoRA adapters as part of the spec: a graph rewrite every backend runs, merge and unmerge, and
PEFT's file format.

A LoRA adapter of rank `r` on a projection `W [O, I]` adds `scale * B @ A` to it, with
`A [r, I]`, `B [O, r]` and `scale = alpha / r` (`alpha / sqrt(r)` for rsLoRA). `apply_lora`
rewrites the op list so that each targeted `linear` (or `qlinear`: QLoRA is LoRA over the
quantised weights `gemma_core.quant` already holds) also runs `lora(x, A, B; scale)` and adds it
to the projection's output, exactly as PEFT's `lora.Linear.forward` evaluates it. Dropout
(`LoraConfig.dropout`, PEFT's `lora_dropout`) applies to `x` before `A` in training only; the
op list is the evaluation step, where it is the identity, so it is carried and saved, not run.

Weight names are PEFT's minus its `base_model.model.` prefix, derived from the projection's
canonical name (found by role, `gemma_core.layout_table`):
`model.layers.{i}.self_attn.q_proj.lora_A.weight` `[r, I]` and `...lora_B.weight` `[O, r]`.

Files: a folder as `peft.PeftModel.save_pretrained` writes it, `adapter_config.json` (the keys
PEFT writes for a LORA / CAUSAL_LM adapter) and `adapter_model.safetensors` (keys
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`). Reading is strict: PEFT
options that change what the adapter computes and that this module does not implement (DoRA,
trained biases, `fan_in_fan_out`, rank or alpha patterns, ...) are refused naming the key,
and so are missing, unexpected, mis-shaped and non-float tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemma_core.config import GemmaConfig
from gemma_core.errors import CheckpointError, ConfigError, WeightError
from gemma_core.graph import Graph, Op
from gemma_core.layout import is_float_dtype, iter_params, param_name
from gemma_core.layout_table import role_of
from gemma_core.quant import MODULE_ROLES, SCALE_SUFFIX

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the transformers model as base_model.model
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_ROLES = frozenset(MODULE_ROLES.values())
_MODULES = {role: module for module, role in MODULE_ROLES.items()}
_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A LoRA adapter's shape: rank `r`, `alpha` (scale alpha / r, or alpha / sqrt(r) with
    `use_rslora`), the projections it targets (transformers' module names, `MODULE_ROLES`), the
    `dropout` of its input in training, and the layers it applies to (None: every layer; PEFT's
    `layers_to_transform`)."""

    r: int = 8
    alpha: float = 8.0
    target_modules: Sequence[str] = DEFAULT_TARGETS
    dropout: float = 0.0
    use_rslora: bool = False
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora r: expected a positive integer, got {self.r!r}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ConfigError(f"lora alpha: expected a positive finite number, got {self.alpha!r}")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"lora dropout: expected a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"lora use_rslora: expected true or false, got {self.use_rslora!r}")
        modules = self.target_modules
        modules = (modules,) if isinstance(modules, str) else tuple(modules)
        unknown = [m for m in modules if m not in MODULE_ROLES]
        if unknown or not modules or len(set(modules)) != len(modules):
            raise ConfigError(f"lora target_modules: expected distinct projections of "
                              f"{', '.join(MODULE_ROLES)}, got {list(modules)}")
        # one order whatever the caller's: the layout's
        object.__setattr__(self, "target_modules", tuple(m for m in MODULE_ROLES if m in modules))
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers) \
                    or len(set(layers)) != len(layers):
                raise ConfigError(f"lora layers: expected distinct layer indices, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        """The factor of `B @ A`: alpha / r, or alpha / sqrt(r) (rsLoRA), as PEFT computes it."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def roles(self) -> frozenset[str]:
        """The layout roles of the targeted projections."""
        return frozenset(MODULE_ROLES[m] for m in self.target_modules)

    def applies_to(self, layer: int) -> bool:
        """Whether layer `layer` carries the adapter."""
        return self.layers is None or layer in self.layers


def lora_names(base: str) -> tuple[str, str]:
    """The (A, B) weight names of the adapter of the projection weight `base`."""
    stem = base.removesuffix(".weight")
    return stem + _A, stem + _B


def base_name(name: str) -> str | None:
    """The projection weight an adapter weight `name` belongs to, or None for another name."""
    for suffix in (_A, _B):
        if name.endswith(suffix):
            return name.removesuffix(suffix) + ".weight"
    return None


def lora_shapes(config: GemmaConfig, lora: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every adapter weight `lora` needs on `config`: A `[r, I]`, B `[O, r]`."""
    if lora.layers is not None and max(lora.layers) >= config.num_layers:
        raise ConfigError(f"lora layers: {max(lora.layers)} is past the model's {config.num_layers} layers")
    shapes = {name: shape for name, shape, _ in iter_params(config)}
    out: dict[str, tuple[int, ...]] = {}
    for layer in range(config.num_layers):
        if not lora.applies_to(layer):
            continue
        for module in lora.target_modules:
            base = param_name(config, MODULE_ROLES[module], layer)
            o, i = shapes[base]
            a, b = lora_names(base)
            out[a], out[b] = (lora.r, i), (o, lora.r)
    return out


def check_lora_weights(config: GemmaConfig, lora: LoraConfig, weights: Mapping[str, Any],
                       source: str = "lora weights") -> None:
    """Raise one `WeightError` naming every missing, unexpected, mis-shaped or non-float adapter
    tensor of `weights` for `lora` on `config`."""
    expected = lora_shapes(config, lora)
    problems = [f"missing {n}" for n in expected if n not in weights]
    problems += [f"unexpected {n}" for n in weights if n not in expected]
    for name, w in weights.items():
        if name in expected and tuple(w.shape) != expected[name]:
            problems.append(f"{name}: expected {list(expected[name])}, got {list(w.shape)}")
        elif not is_float_dtype(w.dtype):
            problems.append(f"{name}: expected a float tensor, got {w.dtype}")
    if problems:
        raise WeightError(f"{source}: {'; '.join(problems)}")


def apply_lora(graph: Graph, config: GemmaConfig, lora: LoraConfig) -> Graph:
    """`graph` with the adapter: for each targeted projection `linear(x) -> y` (or `qlinear`),
    `lora(x, A, B; scale) -> lora.y` before it and `add(y, lora.y) -> y` after it. A run of
    projections sharing one input (q/k/v, gate/up) keeps its products consecutive, the adapters'
    before and the adds after, so `fuse_projections` still fuses the base weights. Targets are
    found by role (`role_of`), never by parsing names."""
    ops = graph.ops
    out: list[Op] = []
    found = 0
    i = 0
    while i < len(ops):
        op, j = ops[i], i + 1
        if op.kind not in ("linear", "qlinear"):
            out.append(op)
            i += 1
            continue
        # the run fuse_projections would fuse: one input, not overwritten inside the run
        while (j < len(ops) and ops[j].kind in ("linear", "qlinear") and ops[j].inputs == op.inputs
               and op.inputs[0] not in ops[j - 1].outputs):
            j += 1
        before, after = [], []
        for p in ops[i:j]:
            found_role = role_of(p.params[0], config)
            if found_role is None or found_role[0] not in lora.roles or found_role[1] is None \
                    or not lora.applies_to(found_role[1]):
                continue
            (y,), delta = p.outputs, f"lora.{p.outputs[0]}"
            before.append(Op("lora", p.inputs, (delta,), lora_names(p.params[0]),
                             {"scale": lora.scale}, p.layer))
            after.append(Op("add", (y, delta), (y,), (), {}, p.layer))
        found += len(before)
        out += [*before, *ops[i:j], *after]
        i = j
    expected = len(lora_shapes(config, lora)) // 2
    if found != expected:
        raise ConfigError(f"lora: found {found} of the {expected} targeted projections in the graph "
                          "(fuse projections after the adapter is applied, not before)")
    return graph.replace(out)


def init_lora_weights(config: GemmaConfig, lora: LoraConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh adapter weights as PEFT initialises them (`init_lora_weights=True`): A
    kaiming-uniform (a = sqrt(5): uniform in +-1/sqrt(I)), B zeros, so the adapter starts as
    the identity. float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in lora_shapes(config, lora).items():
        if name.endswith(_A):
            bound = 1.0 / math.sqrt(shape[1])
            out[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, np.float32)
    return out


def _delta_pairs(weights: Mapping[str, np.ndarray], lora_weights: Mapping[str, np.ndarray],
                 lora: LoraConfig) -> dict[str, np.ndarray]:
    """{projection weight name: scale * B @ A in float64}, refusing quantised projections."""
    out = {}
    for name in lora_weights:
        base = base_name(name)
        if base is None:
            raise WeightError(f"{name}: not a LoRA weight name (expected ...{_A} or ...{_B})")
        if base in out:
            continue
        a_name, b_name = lora_names(base)
        if a_name not in lora_weights or b_name not in lora_weights:
            raise WeightError(f"{base}: the adapter has only one of {a_name} and {b_name}")
        if base not in weights:
            raise WeightError(f"{base}: the adapter targets a weight the model does not have")
        w = np.asarray(weights[base])
        if base + SCALE_SUFFIX in weights or w.dtype.kind in "iub":
            raise WeightError(f"{base}: is quantised; a LoRA adapter cannot be merged into quantised "
                              "weights (run it unmerged: QLoRA), or merge before quantising")
        a = np.asarray(lora_weights[a_name], np.float64)
        b = np.asarray(lora_weights[b_name], np.float64)
        if a.shape != (lora.r, w.shape[1]) or b.shape != (w.shape[0], lora.r):
            raise WeightError(f"{base}: adapter shapes A {list(a.shape)}, B {list(b.shape)} do not fit "
                              f"a weight of {list(w.shape)} at rank {lora.r}")
        out[base] = lora.scale * (b @ a)
    return out


def merge(weights: Mapping[str, np.ndarray], lora_weights: Mapping[str, np.ndarray],
          lora: LoraConfig) -> dict[str, np.ndarray]:
    """The weights with the adapter folded in: `W + scale * B @ A`, computed in float64 and
    stored in each weight's own dtype (PEFT's `merge_and_unload`). Float weights only: a
    quantised projection is refused (WeightError)."""
    out = dict(weights)
    for base, delta in _delta_pairs(weights, lora_weights, lora).items():
        w = np.asarray(weights[base])
        out[base] = (w.astype(np.float64) + delta).astype(w.dtype)
    return out


def unmerge(weights: Mapping[str, np.ndarray], lora_weights: Mapping[str, np.ndarray],
            lora: LoraConfig) -> dict[str, np.ndarray]:
    """The inverse of `merge`: `W - scale * B @ A` (equal to the weights before merging up to
    the rounding of their dtype)."""
    out = dict(weights)
    for base, delta in _delta_pairs(weights, lora_weights, lora).items():
        w = np.asarray(weights[base])
        out[base] = (w.astype(np.float64) - delta).astype(w.dtype)
    return out


# adapter_config.json: the keys PEFT (0.13 and later) writes for a LoRA adapter of a causal LM.
# Keys that only describe the file or how it was trained are read as anything; every other key
# must hold the value under which it changes nothing, since this module does not implement it.
_INFORMATIONAL = frozenset({
    "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
    "megatron_core", "qalora_group_size",  # qalora_group_size: read only with use_qalora
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",  # initialisation only
})
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "bias": ("none",), "fan_in_fan_out": (False,), "use_dora": (False,), "lora_bias": (False,),
    "modules_to_save": (None, []), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
    "layer_replication": (None,), "megatron_config": (None,), "exclude_modules": (None, []),
    "use_qalora": (False,), "trainable_token_indices": (None,), "target_parameters": (None, []),
    "alora_invocation_tokens": (None,), "arrow_config": (None,), "ensure_weight_tying": (False,),
    "kasa_config": (None,), "monteclora_config": (None,), "velora_config": (None,),
    "use_bdlora": (None, False),
    # initialisations that leave the base weights as they were (PiSSA, OLoRA, LoftQ change them)
    "init_lora_weights": (True, False, "gaussian", "eva", "orthogonal"),
}
_READ = frozenset({"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora",
                   "target_modules", "layers_to_transform", "layers_pattern"})


def _neutral(value: Any) -> bool:
    return value is None or value is False or value == {} or value == []


def config_from_peft(entry: Mapping[str, Any], where: str = CONFIG_FILE) -> LoraConfig:
    """A `LoraConfig` of a PEFT adapter_config.json object, refusing what it cannot run."""
    if not isinstance(entry, Mapping):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    for key in ("peft_type", "r", "lora_alpha", "target_modules"):
        if key not in entry:
            raise CheckpointError(f"{where}: missing key {key!r}")
    if entry["peft_type"] != "LORA":
        raise CheckpointError(f"{where}: peft_type {entry['peft_type']!r} is not supported (only LORA)")
    if entry.get("task_type") not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{where}: task_type {entry['task_type']!r} is not supported "
                              "(CAUSAL_LM adapters only)")
    for key, value in entry.items():
        if key in _READ or key in _INFORMATIONAL:
            continue
        if key in _NEUTRAL:
            if not any(value == ok and type(value) is type(ok) for ok in _NEUTRAL[key]):
                raise CheckpointError(f"{where}: {key}={json.dumps(value)} is not supported "
                                      f"(supported: {', '.join(json.dumps(v) for v in _NEUTRAL[key])})")
        elif not _neutral(value):  # a key of a newer PEFT, or a misspelt one, that would matter
            raise CheckpointError(f"{where}: unknown key {key!r} (= {json.dumps(value)})")
    targets = entry["target_modules"]
    if targets == "all-linear":  # PEFT: every linear layer but the output head
        targets = list(MODULE_ROLES)
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(f"{where}: target_modules={json.dumps(targets)} is not supported "
                              f"(a list of {', '.join(MODULE_ROLES)}; regular expressions are not read)")
    pattern = entry.get("layers_pattern")
    if pattern not in (None, "layers", ["layers"]):
        raise CheckpointError(f"{where}: layers_pattern={json.dumps(pattern)} is not supported")
    layers: Any = entry.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not isinstance(layers, list):
        raise CheckpointError(f"{where}: layers_to_transform={json.dumps(layers)} is not supported "
                              "(a layer index or a list of them)")
    try:
        return LoraConfig(r=entry["r"], alpha=entry["lora_alpha"], target_modules=targets,
                          dropout=entry.get("lora_dropout", 0.0), use_rslora=entry.get("use_rslora", False),
                          layers=layers)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def config_to_peft(lora: LoraConfig, base_model_name: str | None = None) -> dict[str, Any]:
    """The adapter_config.json object PEFT writes for `lora` (a LORA adapter of a CAUSAL_LM)."""
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model_name,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None if lora.layers is None else list(lora.layers),
        "loftq_config": {}, "lora_alpha": int(lora.alpha) if lora.alpha.is_integer() else lora.alpha,
        "lora_dropout": lora.dropout, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "peft_type": "LORA", "r": lora.r, "rank_pattern": {},
        "revision": None, "target_modules": list(lora.target_modules), "task_type": "CAUSAL_LM",
        "use_dora": False, "use_rslora": lora.use_rslora,
    }


def _check_pairs(lora: LoraConfig, weights: Mapping[str, np.ndarray], where: str) -> None:
    """Each name an adapter weight of a targeted projection in a targeted layer, A and B
    together, of rank r; float tensors only."""
    problems = []
    for name, w in weights.items():
        base = base_name(name)
        role, layer = (role_of(base) if base is not None else None) or (None, None)
        if base is None or role not in _ROLES or layer is None:
            problems.append(f"unexpected tensor {name}")
            continue
        if role not in lora.roles or not lora.applies_to(layer):
            problems.append(f"{name}: {_MODULES[role]} of layer {layer} is not a target of the adapter")
        a_name, b_name = lora_names(base)
        if (b_name if name == a_name else a_name) not in weights:
            problems.append(f"{name}: its pair {b_name if name == a_name else a_name} is missing")
        rank_axis = 0 if name == a_name else 1
        if w.ndim != 2 or w.shape[rank_axis] != lora.r:
            problems.append(f"{name}: shape {list(w.shape)} is not of rank r={lora.r}")
        if not is_float_dtype(w.dtype):
            problems.append(f"{name}: expected a float tensor, got {w.dtype}")
    if problems:
        raise CheckpointError(f"{where}: {'; '.join(problems)}")


def save_peft(folder: str | os.PathLike[str], lora: LoraConfig, lora_weights: Mapping[str, np.ndarray],
              *, base_model_name: str | None = None, config: GemmaConfig | None = None,
              overwrite: bool = False) -> Path:
    """Write the adapter as PEFT's `save_pretrained` does: `folder/adapter_config.json` and
    `folder/adapter_model.safetensors`, in one transaction (the folder appears whole or not at
    all). Given the model's `config`, the weights are checked against its shapes too."""
    from gemma_core.transaction import write_transaction

    folder = Path(folder)
    if config is not None:
        check_lora_weights(config, lora, lora_weights)
    _check_pairs(lora, lora_weights, str(folder))
    with write_transaction(folder, overwrite) as tmp:
        tmp.mkdir()
        write_peft_files(tmp, lora, lora_weights, base_model_name)
    return folder


def write_peft_files(folder: Path, lora: LoraConfig, lora_weights: Mapping[str, np.ndarray],
                     base_model_name: str | None = None) -> None:
    """PEFT's two adapter files into the existing `folder` (a transaction's temporary one)."""
    from gemma_core.safetensors_io import write_safetensors

    tensors = {PEFT_PREFIX + name: np.asarray(w) for name, w in lora_weights.items()}
    (folder / CONFIG_FILE).write_text(json.dumps(config_to_peft(lora, base_model_name), indent=2,
                                                 sort_keys=True) + "\n")
    write_safetensors(folder / WEIGHTS_FILE, tensors, metadata={"format": "pt"})


def load_peft(folder: str | os.PathLike[str], config: GemmaConfig | None = None,
              ) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """(LoraConfig, adapter weights under our names) of a PEFT adapter folder, read strictly.
    Given the model's `config`, the weights are checked against its shapes too (WeightError)."""
    from gemma_core.checkpoint import check_finite
    from gemma_core.jsonfile import read_json
    from gemma_core.safetensors_io import read_safetensors

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not an adapter folder (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    lora = config_from_peft(read_json(folder / CONFIG_FILE), str(folder / CONFIG_FILE))
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        note = " (adapter_model.bin is a pickle, not read)" if (folder / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{path}: missing{note}")
    tensors = read_safetensors(path)
    stray = [k for k in tensors if not k.startswith(PEFT_PREFIX)]
    if stray:
        raise CheckpointError(f"{path}: unexpected tensor {stray[0]} (every key starts with {PEFT_PREFIX!r})")
    weights = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
    if not weights:
        raise CheckpointError(f"{path}: holds no tensors")
    _check_pairs(lora, weights, str(path))
    check_finite(weights, str(path))
    if config is not None:
        check_lora_weights(config, lora, weights, str(path))
    return lora, weights


def model_adapter(model: Any) -> tuple[LoraConfig | None, dict[str, np.ndarray]]:
    """The adapter a `gemma_core.Model` runs (`load(..., adapter=DIR)`) and its weights as numpy,
    or (None, {}): what a trainable face takes over from the model."""
    lora = getattr(model, "lora", None)
    if lora is None:
        return None, {}
    names = lora_shapes(model.config, lora)
    return lora, {n: np.asarray(model.to_numpy(model.weights[n]), np.float32) for n in names}
