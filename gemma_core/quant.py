"""Weight-only quantisation: the backend-neutral format every backend runs.

A quantised weight `W [O, I]` (a linear layer's, or the embedding / tied LM head) is stored as two
tensors with readable names:

- `<name>` the integer values: int8 `[O, I]` (`int8`), or two 4-bit codes per byte, uint8
  `[O, I/2]` (`int4`, `nf4`): element `2j` in the low nibble, `2j+1` in the high nibble;
- `<name>_scale` float32: `[O]` (int8, one symmetric scale per output channel), `[O, I/g, 2]`
  (int4: a step and an offset per group of `g` inputs) or `[O, I/g]` (nf4: one scale per group).

Dequantisation (what the NumPy reference computes, exactly, in float32):
- int8: `W[o, i] = q[o, i] * s[o]`, q in [-127, 127], s = max|W[o]| / 127;
- int4: `W[o, i] = c[o, i] * step + offset` of the group `(o, i // g)`, codes c in [0, 15]: an
  asymmetric grid over the group's range, its ends moved toward zero where that lowers the
  squared error (on Gemma 3 270M this more than halves the perplexity cost of a symmetric
  absmax grid);
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
from gemma_core.layout_table import roles_of

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


FLOAT = "float"
# Named recipes: a scheme with module overrides. int4-mixed keeps the two projections where
# 4 bits cost Gemma 3 270M the most at int8 (the perplexity cost on tests/data/quality.txt:
# +71% for int4, +34% for int4-mixed, see benchmarks/results-quality.md).
RECIPES: dict[str, tuple[str, dict[str, str]]] = {
    "int4-mixed": ("int4", {"v_proj": "int8", "down_proj": "int8"}),
}
# The projections as users name them (`--modules v_proj=int8`, transformers' module names), and
# the layout role (gemma_core.layout_table) each one is.
MODULE_ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
                "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
PROJECTIONS = tuple(MODULE_ROLES)
_ROLE_MODULES = {role: module for module, role in MODULE_ROLES.items()}
_EMBEDDING_ROLES = ("embedding", "lm_head")  # the embedding, or the untied head of its shape


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """The scheme of every layer's projections, their group size (4-bit schemes), and the
    scheme of the embedding (with the tied LM head, or an untied `lm_head.weight`): int8 by
    default, as llama.cpp's Q4_K_M files keep it at 8 bits (a 4-bit embedding and LM head cost a
    small model most of its quality), or "float" to keep it unquantised. `embedding=True` means
    the projections' scheme, False "float". `modules` overrides the scheme of some projections
    in every layer, e.g. {"v_proj": "int8", "down_proj": "int8"} (llama.cpp's Q4_K_M likewise
    gives attn_v and ffn_down more bits) or {"o_proj": "float"} (transformers'
    `modules_to_not_convert`); held as sorted (module, scheme) pairs."""

    scheme: str = "int8"
    group_size: int | None = None
    embedding: str | bool = "int8"
    modules: Mapping[str, str] | tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"quantization scheme: unsupported value {self.scheme!r} "
                              f"(supported: {', '.join(SCHEMES)})")
        if isinstance(self.embedding, bool):
            object.__setattr__(self, "embedding", self.scheme if self.embedding else FLOAT)
        if self.embedding not in (*SCHEMES, FLOAT):
            raise ConfigError(f"quantization embedding: unsupported value {self.embedding!r} "
                              f"(supported: {', '.join((*SCHEMES, FLOAT))})")
        modules = dict(self.modules.items() if isinstance(self.modules, Mapping) else self.modules)
        for module, scheme in modules.items():
            if module not in PROJECTIONS:
                raise ConfigError(f"quantization modules: unknown projection {module!r} "
                                  f"(known: {', '.join(PROJECTIONS)})")
            if scheme not in (*SCHEMES, FLOAT):
                raise ConfigError(f"quantization modules: {module}: unsupported scheme {scheme!r} "
                                  f"(supported: {', '.join((*SCHEMES, FLOAT))})")
        object.__setattr__(self, "modules", tuple(sorted(modules.items())))
        used = {self.scheme, str(self.embedding), *modules.values()}
        four_bit = bool(used & {"int4", "nf4"})
        if self.scheme == "int8" and self.group_size is not None and not four_bit:
            raise ConfigError("quantization group_size: int8 uses one scale per output channel; "
                              f"got group_size={self.group_size}")
        if four_bit:
            if self.group_size is None:
                object.__setattr__(self, "group_size", 32)
            if self.group_size not in GROUP_SIZES:
                raise ConfigError(f"quantization group_size: {self.group_size!r} is not supported "
                                  f"(supported: {', '.join(map(str, GROUP_SIZES))})")

    def describe(self) -> str:
        """One line for people: `int4, groups of 32, embedding int8, v_proj int8`."""
        group = f", groups of {self.group_size}" if self.group_size else ""
        modules = "".join(f", {module} {scheme}" for module, scheme in self.modules)
        return f"{self.scheme}{group}, embedding {self.embedding}{modules}"

    @property
    def bits(self) -> int:
        """Bits per stored weight of the projections."""
        return bits_of(self.scheme)

    def role_scheme(self, role: str) -> str | None:
        """The scheme the tensors holding layout `role` (gemma_core.layout_table) are stored in;
        None for float tensors (norms, the classification head, an override to "float")."""
        scheme = self._scheme_or_float(role)
        return None if scheme == FLOAT else scheme

    def _scheme_or_float(self, role: str) -> str:
        if role in _ROLE_MODULES:
            return dict(self.modules).get(_ROLE_MODULES[role], self.scheme)
        return str(self.embedding) if role in _EMBEDDING_ROLES else FLOAT

    def scheme_for(self, name: str) -> str | None:
        """The scheme the canonical tensor `name` is stored in (that of its role); None for float
        tensors and names outside the layout. A fused projection (`...{q,k,v}_proj.weight`,
        gemma_core.graph.fuse_projections) has its parts' scheme, which fusion requires to be one."""
        schemes = {self._scheme_or_float(role) for role in roles_of(name)}
        if len(schemes) > 1:
            raise ConfigError(f"{name}: fused projections in different schemes {sorted(schemes)}")
        scheme = schemes.pop() if schemes else FLOAT
        return None if scheme == FLOAT else scheme

    def group_for(self, scheme: str) -> int | None:
        """The group size of `scheme` (None for int8's per-channel scales)."""
        return None if scheme == "int8" else self.group_size

    def to_hf(self) -> dict[str, Any]:
        """The `quantization_config` entry of config.json."""
        out = {"quant_method": QUANT_METHOD, "scheme": self.scheme, "bits": self.bits,
               "group_size": self.group_size, "embedding": self.embedding}
        if self.modules:
            out["modules"] = dict(self.modules)
        return out

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
        if bits is not None and scheme in SCHEMES and bits != bits_of(scheme):
            raise ConfigError(f"quantization_config: bits {bits!r} do not match scheme {scheme!r}")
        modules = entry.get("modules", {})
        if not isinstance(modules, Mapping):
            raise ConfigError(f"quantization_config: modules: expected an object, got {modules!r}")
        return cls(scheme=scheme, group_size=entry.get("group_size"),
                   embedding=entry.get("embedding", "int8"), modules=modules)


def bits_of(scheme: str) -> int:
    """Bits per stored weight of a scheme."""
    return 8 if scheme == "int8" else 4


def parse_scheme(text: str, group_size: int | None = None, embedding: str | bool = "int8",
                 modules: str | Mapping[str, str] = ()) -> QuantConfig:
    """A QuantConfig from a user's `int8` / `int4` / `nf4` (or `8` / `4`) or a recipe name
    (RECIPES), and module overrides (added to a recipe's) as a mapping or as the command line's
    `v_proj=int8,down_proj=int8`."""
    scheme = {"8": "int8", "4": "int4"}.get(str(text), str(text))
    scheme, base = RECIPES.get(scheme, (scheme, {}))
    extra = parse_modules(modules) if isinstance(modules, str) else dict(modules)
    return QuantConfig(scheme=scheme, group_size=group_size, embedding=embedding,
                       modules={**base, **extra})


def as_quant_config(quantize: str | QuantConfig) -> QuantConfig:
    """`quantize` as given to `load` or `quantize_model`: a QuantConfig, or a scheme or recipe
    name (`parse_scheme`)."""
    return quantize if isinstance(quantize, QuantConfig) else parse_scheme(quantize)


def parse_modules(text: str) -> dict[str, str]:
    """`v_proj=int8,down_proj=float` -> {"v_proj": "int8", "down_proj": "float"}."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        module, sep, scheme = item.partition("=")
        if not sep or not module.strip() or not scheme.strip():
            raise ConfigError(f"quantization modules: expected module=scheme, got {item!r}")
        out[module.strip()] = {"8": "int8", "4": "int4"}.get(scheme.strip(), scheme.strip())
    return out


def keeps_dtype(name: str, array: Any) -> bool:
    """Whether a stored tensor keeps its dtype when the float weights are cast: quantised values
    (integers) and their `_scale` tensors do."""
    return np.asarray(array).dtype.kind in "iub" or name.endswith(SCALE_SUFFIX)


def stored_shapes(name: str, shape: tuple[int, ...], scheme: str,
                  group_size: int | None) -> dict[str, tuple[int, ...]]:
    """The stored tensors (values and scale) of a weight of logical `shape` under `scheme`."""
    out, inp = shape
    if scheme == "int8":
        return {name: (out, inp), name + SCALE_SUFFIX: (out,)}
    if group_size is None or inp % group_size:
        raise WeightError(f"{name}: input size {inp} is not divisible by group_size {group_size}")
    scale = (out, inp // group_size, 2) if scheme == "int4" else (out, inp // group_size)
    return {name: (out, inp // 2), name + SCALE_SUFFIX: scale}


def stored_dtype(scheme: str) -> np.dtype:
    """The dtype of the stored values."""
    return np.dtype(np.int8) if scheme == "int8" else np.dtype(np.uint8)


def quantize(w: np.ndarray, scheme: str, group_size: int | None = None,
             name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """(values, scale) of one float `[O, I]` weight under `scheme`."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise WeightError(f"{name}: only 2-D weights are quantised, got shape {list(w.shape)}")
    finite = np.isfinite(w)
    if not finite.all():  # a NaN or inf would spread to its whole row's (or group's) scale
        row, col = np.unravel_index(int(np.argmin(finite)), w.shape)
        raise WeightError(f"{name}: cannot quantise a non-finite value ({w[row, col]} at index "
                          f"[{row}, {col}])")
    del finite
    if scheme == "int8":
        scale = np.abs(w).max(axis=1) / np.float32(127)
        safe = np.where(scale > 0, scale, np.float32(1))
        q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
        return q, scale.astype(np.float32)
    stored_shapes(name, w.shape, scheme, group_size)  # raises if the group does not divide I
    assert group_size is not None
    groups = w.reshape(w.shape[0], -1, group_size)  # [O, I/g, g]
    absmax = np.abs(groups).max(axis=-1)  # [O, I/g]
    if scheme == "int4":
        codes, scale = _int4_codes(groups)
    else:  # nf4: the nearest codebook entry of w / absmax
        scale = absmax
        safe = np.where(scale > 0, scale, np.float32(1))
        mids = (NF4[1:] + NF4[:-1]) / 2
        codes = np.searchsorted(mids, groups / safe[..., None]).astype(np.int16)
    codes = codes.reshape(w.shape).astype(np.uint8)
    return pack_nibbles(codes), scale.astype(np.float32)


# Factors tried per group for int4, on the low and the high end of its range each: the grid
# spans [lo * (1 - a), hi * (1 - b)] (ends scaled toward zero, which clips the outliers of a
# mixed-sign group); each group keeps the pair of least squared error, (0, 0) among them.
INT4_SHRINK = (0.0, 0.1, 0.2, 0.3)


def _int4_codes(groups: np.ndarray, rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric 4-bit codes `[O, I/g, g]` in [0, 15] and `[O, I/g, 2]` (step, offset) per group,
    the grid's ends set by the pair of INT4_SHRINK factors of least squared error. Rows are done
    in chunks to bound memory."""
    codes = np.empty(groups.shape, np.uint8)
    params = np.empty((*groups.shape[:2], 2), np.float32)
    for r in range(0, groups.shape[0], rows):
        g = groups[r:r + rows]
        lo0, hi0 = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
        best_err = np.full(lo0.shape, np.inf, np.float32)
        for a in INT4_SHRINK:
            for b in INT4_SHRINK:
                lo, hi = lo0 * np.float32(1 - a), hi0 * np.float32(1 - b)
                step = (hi - lo) / np.float32(15)
                safe = np.where(step > 0, step, np.float32(1))
                c = np.clip(np.rint((g - lo) / safe), 0, 15)
                err = np.square(c * step + lo - g).sum(axis=-1, keepdims=True)
                better = err < best_err
                best_err = np.where(better, err, best_err)
                codes[r:r + rows] = np.where(better, c, codes[r:r + rows])
                params[r:r + rows, :, 0:1] = np.where(better, step, params[r:r + rows, :, 0:1])
                params[r:r + rows, :, 1:2] = np.where(better, lo, params[r:r + rows, :, 1:2])
    return codes, params


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


def dequantize(values: np.ndarray, scale: np.ndarray, scheme: str,
               group_size: int | None = None) -> np.ndarray:
    """The float32 weight `[O, I]` that (values, scale) stand for under `scheme`."""
    scale = np.asarray(scale, np.float32)
    if scheme == "int8":
        return np.asarray(values).astype(np.float32) * scale[:, None]
    codes = unpack_nibbles(values)
    o, i = codes.shape
    groups = codes.reshape(o, -1, group_size or i)
    if scheme == "int4":  # codes * step + offset
        return (groups * scale[..., 0:1] + scale[..., 1:2]).reshape(o, i)
    return (NF4[groups] * scale[..., None]).reshape(o, i)


def quantize_weights(weights: Mapping[str, np.ndarray], quant: QuantConfig,
                     progress: Any = None) -> dict[str, np.ndarray]:
    """Every weight `quant` stores quantised, replaced by its values and scale; the others kept.
    A tensor shared by two names (a tied LM head) is quantised once."""
    out: dict[str, np.ndarray] = {}
    done: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    todo = [n for n in weights if quant.scheme_for(n) is not None]
    for name, w in weights.items():
        scheme = quant.scheme_for(name)
        if scheme is None:
            out[name] = w
            continue
        if id(w) not in done:
            done[id(w)] = quantize(w, scheme, quant.group_for(scheme), name)
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
        scheme = quant.scheme_for(name)
        if scheme is not None:
            if name + SCALE_SUFFIX not in weights:
                raise WeightError(f"{name}: quantised values without their scale {name + SCALE_SUFFIX}")
            out[name] = dequantize(w, weights[name + SCALE_SUFFIX], scheme, quant.group_for(scheme))
        else:
            out[name] = w
    return out
