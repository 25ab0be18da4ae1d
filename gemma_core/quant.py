"""Weight-only quantisation: the backend-neutral format every backend runs.

A quantised weight `W [O, I]` (a linear layer's, or the embedding / tied LM head) is stored as two
tensors with readable names:

- `<name>` the integer values: int8 `[O, I]` (`int8`), or two 4-bit codes per byte, uint8
  `[O, I/2]` (`int4`, `nf4`): element `2j` in the low nibble, `2j+1` in the high nibble;
- `<name>_scale` float32: `[O]` (int8, one symmetric scale per output channel) or `[O, I/g]`
  (int4 / nf4, one scale per group of `g` inputs).

Dequantisation (what the NumPy reference computes, exactly, in float32):
- int8: `W[o, i] = q[o, i] * s[o]`, q in [-127, 127], s = max|W[o]| / 127;
- int4: `W[o, i] = (c[o, i] - 8) * s[o, i // g]`, codes c in [1, 15], s = max|W group| / 7;
- nf4: `W[o, i] = NF4[c[o, i]] * s[o, i // g]`, s = max|W group| (the 4-bit NormalFloat codebook
  of QLoRA / bitsandbytes).

The choice is recorded in config.json as `quantization_config` (`quant_method: "gemma-core"`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from gemma_core.errors import ConfigError, WeightError

SCHEMES = ("int8", "int4", "nf4")
GROUP_SIZES = (32, 64, 128)
SCALE_SUFFIX = "_scale"
QUANT_METHOD = "gemma-core"

# The NF4 codebook (QLoRA, Dettmers et al. 2023; bitsandbytes' `nf4` values), ascending.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Which scheme, its group size, and whether the embedding (with the tied LM head, or an
    untied `lm_head.weight`) is quantised too; the projections of every layer always are."""

    scheme: str = "int8"
    group_size: int | None = None
    embedding: bool = True

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"quantization scheme: unsupported value {self.scheme!r} "
                              f"(supported: {', '.join(SCHEMES)})")
        if self.scheme == "int8":
            if self.group_size is not None:
                raise ConfigError("quantization group_size: int8 uses one scale per output channel; "
                                  f"got group_size={self.group_size}")
        else:
            if self.group_size is None:
                object.__setattr__(self, "group_size", 32)
            if self.group_size not in GROUP_SIZES:
                raise ConfigError(f"quantization group_size: {self.group_size!r} is not supported "
                                  f"(supported: {', '.join(map(str, GROUP_SIZES))})")

    @property
    def bits(self) -> int:
        """Bits per stored weight."""
        return 8 if self.scheme == "int8" else 4

    def to_hf(self) -> dict[str, Any]:
        """The `quantization_config` entry of config.json."""
        return {"quant_method": QUANT_METHOD, "scheme": self.scheme, "bits": self.bits,
                "group_size": self.group_size, "embedding": self.embedding}

    @classmethod
    def from_hf(cls, entry: Mapping[str, Any]) -> QuantConfig:
        """Read a `quantization_config` written by `to_hf`; other methods are refused by name."""
        if not isinstance(entry, Mapping):
            raise ConfigError(f"quantization_config: expected an object, got {entry!r}")
        method = entry.get("quant_method")
        if method != QUANT_METHOD:
            raise ConfigError(f"quantization_config: quant_method {method!r} is not supported "
                              f"(gemma-core reads its own {QUANT_METHOD!r} format)")
        scheme = entry.get("scheme", "int8")
        bits = entry.get("bits")
        if bits is not None and bits != (8 if scheme == "int8" else 4):
            raise ConfigError(f"quantization_config: bits {bits!r} do not match scheme {scheme!r}")
        return cls(scheme=scheme, group_size=entry.get("group_size"),
                   embedding=bool(entry.get("embedding", True)))


def parse_scheme(text: str, group_size: int | None = None, embedding: bool = True) -> QuantConfig:
    """A QuantConfig from a user's `int8` / `int4` / `nf4` (or `8` / `4`)."""
    scheme = {"8": "int8", "4": "int4"}.get(str(text), str(text))
    return QuantConfig(scheme=scheme, group_size=group_size, embedding=embedding)


def is_quantized_name(name: str, quant: QuantConfig) -> bool:
    """Whether the canonical tensor `name` is stored quantised under `quant`."""
    if name.endswith("_proj.weight") and name.startswith("model.layers."):
        return True
    return quant.embedding and name in ("model.embed_tokens.weight", "lm_head.weight")


def stored_shapes(name: str, shape: tuple[int, ...], quant: QuantConfig) -> dict[str, tuple[int, ...]]:
    """The stored tensors (values and scale) of a quantised weight of logical `shape`."""
    out, inp = shape
    if quant.scheme == "int8":
        return {name: (out, inp), name + SCALE_SUFFIX: (out,)}
    g = quant.group_size
    assert g is not None
    if inp % g:
        raise WeightError(f"{name}: input size {inp} is not divisible by group_size {g}")
    return {name: (out, inp // 2), name + SCALE_SUFFIX: (out, inp // g)}


def stored_dtype(quant: QuantConfig) -> np.dtype:
    """The dtype of the stored values."""
    return np.dtype(np.int8) if quant.scheme == "int8" else np.dtype(np.uint8)


def quantize(w: np.ndarray, quant: QuantConfig, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """(values, scale) of one float `[O, I]` weight."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise WeightError(f"{name}: only 2-D weights are quantised, got shape {list(w.shape)}")
    if quant.scheme == "int8":
        scale = np.abs(w).max(axis=1) / np.float32(127)
        safe = np.where(scale > 0, scale, np.float32(1))
        q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
        return q, scale.astype(np.float32)
    g = quant.group_size
    assert g is not None
    stored_shapes(name, w.shape, quant)  # raises if g does not divide I
    groups = w.reshape(w.shape[0], -1, g)  # [O, I/g, g]
    absmax = np.abs(groups).max(axis=-1)  # [O, I/g]
    if quant.scheme == "int4":
        scale = absmax / np.float32(7)
        safe = np.where(scale > 0, scale, np.float32(1))
        codes = np.clip(np.rint(groups / safe[..., None]), -7, 7).astype(np.int16) + 8
    else:  # nf4: the nearest codebook entry of w / absmax
        scale = absmax
        safe = np.where(scale > 0, scale, np.float32(1))
        normed = groups / safe[..., None]
        mids = (NF4[1:] + NF4[:-1]) / 2
        codes = np.searchsorted(mids, normed).astype(np.int16)
    codes = codes.reshape(w.shape).astype(np.uint8)
    return pack_nibbles(codes), scale.astype(np.float32)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes `[O, I]` in [0, 15] -> `[O, I/2]`, element 2j low, 2j+1 high."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """`[O, I/2]` uint8 -> codes `[O, I]` in [0, 15]."""
    packed = np.asarray(packed, np.uint8)
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def dequantize(values: np.ndarray, scale: np.ndarray, quant: QuantConfig) -> np.ndarray:
    """The float32 weight `[O, I]` that (values, scale) stand for."""
    scale = np.asarray(scale, np.float32)
    if quant.scheme == "int8":
        return np.asarray(values).astype(np.float32) * scale[:, None]
    codes = unpack_nibbles(values)
    levels = codes.astype(np.float32) - 8 if quant.scheme == "int4" else NF4[codes]
    o, i = levels.shape
    return (levels.reshape(o, -1, quant.group_size or i) * scale[..., None]).reshape(o, i)


def quantize_weights(weights: Mapping[str, np.ndarray], quant: QuantConfig,
                     progress: Any = None) -> dict[str, np.ndarray]:
    """Every weight `is_quantized_name` picks, replaced by its values and scale; the others kept.
    A tensor shared by two names (a tied LM head) is quantised once."""
    out: dict[str, np.ndarray] = {}
    done: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    todo = [n for n in weights if is_quantized_name(n, quant)]
    for name, w in weights.items():
        if not is_quantized_name(name, quant):
            out[name] = w
            continue
        if id(w) not in done:
            done[id(w)] = quantize(w, quant, name)
            if progress is not None:
                progress(len(done), len(todo))
        out[name], out[name + SCALE_SUFFIX] = done[id(w)]
    return out


def dequantize_weights(weights: Mapping[str, np.ndarray], quant: QuantConfig) -> dict[str, np.ndarray]:
    """The float32 weights a quantised set stands for (canonical names, no scales)."""
    out = {}
    for name, w in weights.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if is_quantized_name(name, quant):
            if name + SCALE_SUFFIX not in weights:
                raise WeightError(f"{name}: quantised values without their scale {name + SCALE_SUFFIX}")
            out[name] = dequantize(w, weights[name + SCALE_SUFFIX], quant)
        else:
            out[name] = w
    return out
