"""One frozen config for Gemma 1, 2 and 3 (text), with Hugging Face `config.json` I/O.

Axis letters used across the package: B batch, T new tokens, S keys, D hidden_size,
N query heads, K kv heads, H head_dim, F intermediate_size, V vocab_size, L layers.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from collections.abc import Mapping
from typing import Any

from gemma_core.errors import ConfigError
from gemma_core.quant import QuantConfig


class Architecture(str, enum.Enum):
    """The Gemma generation: it decides norms, softcaps, QK-norm and the layer pattern."""

    GEMMA = "gemma"
    GEMMA2 = "gemma2"
    GEMMA3 = "gemma3"


class AttentionKind(str, enum.Enum):
    """Per-layer attention span, spelled as in Hugging Face `layer_types`."""

    GLOBAL = "full_attention"
    LOCAL = "sliding_attention"


_HF_MODEL_TYPES = {
    "gemma": Architecture.GEMMA,
    "gemma2": Architecture.GEMMA2,
    "gemma3_text": Architecture.GEMMA3,
}
_TANH_GELU_NAMES = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")
# Gemma 1 hub configs say "gelu" but the model was trained with the tanh approximation
# (transformers PR #29729; reference/transformers-gemma.md 7.1), so "gelu" means tanh here too.
_LEGACY_GELU_NAMES = ("gelu",)


MAX_LAYERS = 4096


def default_layer_types(arch: Architecture, num_layers: int) -> tuple[AttentionKind, ...]:
    """The layer pattern each generation ships with: all global; local/global; five local, one global."""
    if arch is Architecture.GEMMA:
        return (AttentionKind.GLOBAL,) * num_layers
    period = 2 if arch is Architecture.GEMMA2 else 6
    return tuple(
        AttentionKind.GLOBAL if (i + 1) % period == 0 else AttentionKind.LOCAL
        for i in range(num_layers)
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig:
    """Shape and numerics of one Gemma text model. Validated on construction."""

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[AttentionKind, ...] = ()
    rope_theta: float = 10_000.0
    rope_local_theta: float = 10_000.0
    rope_scaling_factor: float = 1.0
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    quantization: QuantConfig | None = None  # weight-only quantisation (gemma_core.quant)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        try:
            set_(self, "architecture", Architecture(self.architecture))
        except ValueError:
            raise ConfigError(f"architecture: unsupported value {self.architecture!r}") from None
        n = self.num_layers
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"num_layers: must be a positive integer, got {n!r}")
        if n > MAX_LAYERS:  # checked before anything per layer is built
            raise ConfigError(f"num_layers: {n} is past any Gemma (the largest has 62; this "
                              f"package accepts up to {MAX_LAYERS})")
        if not self.layer_types:
            set_(self, "layer_types", default_layer_types(self.architecture, n))
        if isinstance(self.layer_types, (str, bytes)) or not hasattr(self.layer_types, "__iter__"):
            raise ConfigError(f"layer_types: expected a list of layer kinds, got {self.layer_types!r}")
        try:
            set_(self, "layer_types", tuple(AttentionKind(k) for k in self.layer_types))
        except ValueError as e:
            raise ConfigError(f"layer_types: {e}") from None
        eos = self.eos_token_ids
        set_(self, "eos_token_ids", (eos,) if isinstance(eos, int) else tuple(eos))
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta", "rope_local_theta", "rope_scaling_factor",
                     "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is None and name in ("query_pre_attn_scalar", "attn_logit_softcap",
                                          "final_logit_softcap"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0
            ):
                raise ConfigError(f"{name}: must be a positive finite number, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: must be even for rotary embeddings, got {self.head_dim}")
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types: {len(self.layer_types)} entries for num_layers {self.num_layers}"
            )
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings: must be true or false, got {self.tie_word_embeddings!r}")
        if self.quantization is not None and not isinstance(self.quantization, QuantConfig):
            raise ConfigError(f"quantization: expected a QuantConfig or None, got {self.quantization!r}")
        has_local = AttentionKind.LOCAL in self.layer_types
        if has_local and self.sliding_window is None:
            raise ConfigError("sliding_window: required by sliding_attention layers, got None")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool)
            or not isinstance(self.sliding_window, int)
            or self.sliding_window <= 0
        ):
            raise ConfigError(f"sliding_window: must be a positive integer, got {self.sliding_window!r}")
        if self.architecture is Architecture.GEMMA and has_local:
            raise ConfigError("layer_types: Gemma 1 has no sliding_attention layers")
        if self.architecture is Architecture.GEMMA and (
                self.attn_logit_softcap is not None or self.final_logit_softcap is not None):
            raise ConfigError("attn_logit_softcap/final_logit_softcap: Gemma 1 does not soft-cap "
                              f"(got {self.attn_logit_softcap!r}, {self.final_logit_softcap!r}); use None")
        if self.architecture is Architecture.GEMMA3 and self.attn_logit_softcap is not None:
            raise ConfigError(
                "attn_logit_softcap: Gemma 3 does not soft-cap attention scores "
                f"(got {self.attn_logit_softcap!r}); use None"
            )
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}: {value!r} is outside the vocabulary [0, {self.vocab_size})")
        for value in self.eos_token_ids:
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"eos_token_ids: {value!r} is outside the vocabulary [0, {self.vocab_size})"
                )

    # ---- derived values -------------------------------------------------------------------

    @property
    def query_scale(self) -> float:
        """Multiplier of q.k: `query_pre_attn_scalar ** -0.5` (Gemma 2/3) or `head_dim ** -0.5`."""
        scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(scalar) ** -0.5

    @property
    def queries_per_kv(self) -> int:
        """Query heads sharing one kv head: query head h reads kv head h // queries_per_kv."""
        return self.num_heads // self.num_kv_heads

    @property
    def has_sandwich_norms(self) -> bool:
        """Gemma 2/3 layers have post-attention and post-feedforward norms."""
        return self.architecture is not Architecture.GEMMA

    @property
    def has_qk_norm(self) -> bool:
        """Gemma 3 normalises each query and key head before RoPE."""
        return self.architecture is Architecture.GEMMA3

    @property
    def embed_scale(self) -> float:
        """Embedding multiplier sqrt(D) before rounding to the compute dtype."""
        return math.sqrt(self.hidden_size)

    def is_local(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window."""
        return self.layer_types[layer] is AttentionKind.LOCAL

    def window(self, layer: int) -> int | None:
        """Keys a query of `layer` sees, itself included; None for global layers."""
        return self.sliding_window if self.is_local(layer) else None

    def rope(self, layer: int) -> tuple[float, float]:
        """(theta, linear scaling factor) of `layer`: Gemma 3 local layers use their own theta, unscaled."""
        if self.architecture is Architecture.GEMMA3 and self.is_local(layer):
            return self.rope_local_theta, 1.0
        return self.rope_theta, self.rope_scaling_factor

    def replace(self, **changes: Any) -> GemmaConfig:
        """A copy with `changes`; the layer pattern is re-derived when num_layers changes alone."""
        if "num_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> GemmaConfig:
        """Build from a Hugging Face `config.json` dict (gemma, gemma2, gemma3_text, gemma3)."""
        return config_from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict transformers writes for this model (with the
        gemma-core `quantization_config` of a quantised one)."""
        out = config_to_hf(self)
        if self.quantization is not None:
            out["quantization_config"] = self.quantization.to_hf()
        return out


# transformers' class defaults (GemmaConfig = gemma-7b, Gemma2Config = gemma-2-2b, Gemma3TextConfig),
# used for keys a config.json leaves out, as transformers does (hub multimodal Gemma 3 configs
# rely on them). An explicit null is kept as null.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": {"vocab_size": 256_000, "hidden_size": 3072, "intermediate_size": 24_576,
              "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
              "head_dim": 256, "max_position_embeddings": 8192, "rope_theta": 10_000.0},
    "gemma2": {"vocab_size": 256_000, "hidden_size": 2304, "intermediate_size": 9216,
               "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
               "head_dim": 256, "max_position_embeddings": 8192, "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "rope_theta": 10_000.0},
    "gemma3_text": {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
                    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "head_dim": 256, "max_position_embeddings": 131_072, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0},
}
_COMMON_DEFAULTS: dict[str, Any] = {"rms_norm_eps": 1e-6, "pad_token_id": 0, "bos_token_id": 2,
                                    "eos_token_id": 1, "tie_word_embeddings": True}


def _getter(hf: Mapping[str, Any], model_type: str) -> Any:
    defaults = {**_COMMON_DEFAULTS, **_HF_DEFAULTS[model_type]}

    def get(key: str) -> Any:
        return hf[key] if key in hf else defaults.get(key)

    return get


def _rope_entry(entry: Any, where: str) -> tuple[float | None, float]:
    """(theta or None, linear factor) of one rope_scaling / rope_parameters entry."""
    if entry is None:
        return None, 1.0
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected an object, got {entry!r}")
    kind = entry.get("rope_type", entry.get("type", "default"))
    theta = entry.get("rope_theta")
    if kind == "default":
        return theta, 1.0
    if kind == "linear":
        factor = entry.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise ConfigError(f"{where}.factor: must be a positive number, got {factor!r}")
        return theta, float(factor)
    raise ConfigError(f"{where}.rope_type: unsupported value {kind!r} (supported: default, linear)")


def _activation(hf: Mapping[str, Any]) -> None:
    for key in ("hidden_activation", "hidden_act"):
        name = hf.get(key)
        if name is not None and name not in _TANH_GELU_NAMES + _LEGACY_GELU_NAMES:
            raise ConfigError(f"{key}: unsupported activation {name!r} (Gemma uses gelu_pytorch_tanh)")


def config_from_hf(hf: Mapping[str, Any]) -> GemmaConfig:
    """Parse a Hugging Face config dict; the text part of a multimodal `gemma3` config is used."""
    if not isinstance(hf, Mapping):
        raise ConfigError(f"config.json: expected an object, got {type(hf).__name__}")
    quant_entry = hf.get("quantization_config")
    quantization = QuantConfig.from_hf(quant_entry) if quant_entry is not None else None
    model_type = hf.get("model_type")
    if model_type == "gemma3":
        text = hf.get("text_config")
        if not isinstance(text, Mapping):
            raise ConfigError("text_config: missing from a gemma3 config.json")
        merged = {"model_type": "gemma3_text", **text}
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings"):
            if key not in text and key in hf:
                merged[key] = hf[key]
        hf = merged
        model_type = "gemma3_text"
    if model_type not in _HF_MODEL_TYPES:
        raise ConfigError(
            f"model_type: unsupported value {model_type!r} (supported: {', '.join(_HF_MODEL_TYPES)}, gemma3)"
        )
    arch = _HF_MODEL_TYPES[model_type]
    _activation(hf)
    for key in ("attention_bias", "use_bidirectional_attention", "tie_word_embeddings"):
        if hf.get(key) is not None and not isinstance(hf[key], bool):
            raise ConfigError(f"{key}: must be true or false, got {hf[key]!r}")
    if hf.get("attention_bias"):
        raise ConfigError("attention_bias: Gemma has no attention biases, got true")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention: bidirectional (embedding) Gemma is not supported")
    if model_type == "gemma":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf.get(key) is not None:
                raise ConfigError(f"{key}: Gemma 1 (model_type gemma) does not soft-cap, got {hf[key]!r}; "
                                  "is this a Gemma 2 config with the wrong model_type?")

    get = _getter(hf, model_type)
    defaults = _HF_DEFAULTS[model_type]
    # transformers 5.x writes rope_theta: null beside rope_parameters; null means "see there".
    rope_theta = get("rope_theta") if get("rope_theta") is not None else defaults["rope_theta"]
    local_theta = get("rope_local_base_freq") if get("rope_local_base_freq") is not None else 10_000.0
    _, factor = _rope_entry(hf.get("rope_scaling"), "rope_scaling")
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping):
        if "full_attention" in params or "sliding_attention" in params:
            theta, factor = _rope_entry(params.get("full_attention"), "rope_parameters.full_attention")
            rope_theta = theta if theta is not None else rope_theta
            local, local_factor = _rope_entry(
                params.get("sliding_attention"), "rope_parameters.sliding_attention"
            )
            if local_factor != 1.0:
                raise ConfigError("rope_parameters.sliding_attention: local layers take no rope scaling")
            local_theta = local if local is not None else local_theta
        else:
            theta, factor = _rope_entry(params, "rope_parameters")
            rope_theta = theta if theta is not None else rope_theta

    num_layers = get("num_hidden_layers")
    layer_types = get("layer_types")
    if layer_types is None and arch is Architecture.GEMMA3 and "sliding_window_pattern" in hf:
        period = hf["sliding_window_pattern"]
        if not isinstance(period, int) or period <= 0:
            raise ConfigError(f"sliding_window_pattern: must be a positive integer, got {period!r}")
        if isinstance(num_layers, int):
            layer_types = [
                AttentionKind.GLOBAL if (i + 1) % period == 0 else AttentionKind.LOCAL
                for i in range(num_layers)
            ]

    attn_cap = get("attn_logit_softcapping")
    if arch is Architecture.GEMMA3 and attn_cap is not None:
        # transformers never applies it for Gemma 3 (Gemma3Attention drops it); do the same.
        warnings.warn(
            f"attn_logit_softcapping={attn_cap} is ignored for Gemma 3, as in transformers",
            stacklevel=2,
        )
        attn_cap = None
    eos = get("eos_token_id")
    g1 = arch is Architecture.GEMMA
    return GemmaConfig(
        architecture=arch,
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        num_layers=num_layers,
        num_heads=get("num_attention_heads"),
        num_kv_heads=get("num_key_value_heads"),
        head_dim=get("head_dim"),
        max_position_embeddings=get("max_position_embeddings"),
        rms_norm_eps=get("rms_norm_eps"),
        query_pre_attn_scalar=None if g1 else get("query_pre_attn_scalar"),
        attn_logit_softcap=None if g1 else attn_cap,
        final_logit_softcap=None if g1 else get("final_logit_softcapping"),
        sliding_window=None if g1 else get("sliding_window"),
        layer_types=tuple(layer_types or ()) if isinstance(layer_types, (list, tuple)) else layer_types,
        rope_theta=rope_theta,
        rope_local_theta=local_theta,
        rope_scaling_factor=factor,
        tie_word_embeddings=get("tie_word_embeddings"),
        pad_token_id=get("pad_token_id"),
        bos_token_id=get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
        quantization=quantization,
    )


def _hf_rope(theta: float, factor: float) -> dict[str, Any]:
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_type": "linear", "factor": factor, "rope_theta": theta}


def config_to_hf(config: GemmaConfig) -> dict[str, Any]:
    """The config.json dict of transformers 5.x for this config (text-only model types)."""
    arch = config.architecture
    model_type = {Architecture.GEMMA: "gemma", Architecture.GEMMA2: "gemma2",
                  Architecture.GEMMA3: "gemma3_text"}[arch]
    architectures = {Architecture.GEMMA: "GemmaForCausalLM", Architecture.GEMMA2: "Gemma2ForCausalLM",
                     Architecture.GEMMA3: "Gemma3ForCausalLM"}[arch]
    eos: int | list[int] = (
        config.eos_token_ids[0] if len(config.eos_token_ids) == 1 else list(config.eos_token_ids)
    )
    out: dict[str, Any] = {
        "architectures": [architectures],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "rope_theta": config.rope_theta,
    }
    if arch is Architecture.GEMMA:
        out["rope_parameters"] = _hf_rope(config.rope_theta, config.rope_scaling_factor)
        return out
    scalar = config.query_pre_attn_scalar if config.query_pre_attn_scalar is not None else config.head_dim
    # transformers types it int (a GGUF stores it as float32: 256.0 must be written 256)
    out["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
    out["attn_logit_softcapping"] = config.attn_logit_softcap
    out["final_logit_softcapping"] = config.final_logit_softcap
    out["sliding_window"] = config.sliding_window
    out["layer_types"] = [kind.value for kind in config.layer_types]
    if arch is Architecture.GEMMA2:
        out["rope_parameters"] = _hf_rope(config.rope_theta, config.rope_scaling_factor)
        return out
    out["rope_local_base_freq"] = config.rope_local_theta
    out["rope_parameters"] = {
        "full_attention": _hf_rope(config.rope_theta, config.rope_scaling_factor),
        "sliding_attention": _hf_rope(config.rope_local_theta, 1.0),
    }
    return out
