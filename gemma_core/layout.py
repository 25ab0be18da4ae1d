"""The weight layout: every tensor a config needs, with its shape, and checks of weight sets
against it. The table itself, its roles and the role lookups live in `gemma_core.layout_table`
(imported by `gemma_core.quant` too) and are re-exported here: `LAYOUT`, `param_name(config,
role, layer)`, `role_of(name, config)`, `roles_of`, `has_role`, `fused_name`, `fused_parts`.

Shapes are written in config symbols (see `gemma_core.config`): V vocab, D hidden, F intermediate,
N query heads, K kv heads, H head_dim, L labels (classification heads).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from gemma_core.config import GemmaConfig
from gemma_core.errors import WeightError
from gemma_core.layout_table import (  # noqa: F401  (re-exported: the layout's public names)
    EMBED,
    FINAL_NORM,
    LAYOUT,
    LM_HEAD,
    NORMS,
    ROLES,
    SCORE,
    SCORE_BIAS,
    ParamRow,
    applies,
    fused_name,
    fused_parts,
    has_role,
    param_name,
    param_template,
    role_of,
    roles_of,
)
from gemma_core.quant import SCALE_SUFFIX, stored_dtype, stored_shapes


def _symbols(config: GemmaConfig, num_labels: int = 0) -> dict[str, int]:
    c = config
    return {"V": c.vocab_size, "D": c.hidden_size, "F": c.intermediate_size, "N": c.num_heads,
            "K": c.num_kv_heads, "H": c.head_dim, "L": num_labels}


def _dim(symbol: str, values: Mapping[str, int]) -> int:
    return math.prod(values[s] for s in symbol.split("*"))


def iter_params(config: GemmaConfig, task: str = "causal-lm",
                num_labels: int = 0) -> Iterator[tuple[str, tuple[int, ...], ParamRow]]:
    """Every tensor name of `config` (with `task`'s head) and its concrete shape, in layout order."""
    values = _symbols(config, num_labels)
    for row in LAYOUT:
        if not applies(row, config, task):
            continue
        shape = tuple(_dim(s, values) for s in row.shape)
        if row.per_layer:
            for layer in range(config.num_layers):
                yield row.name.format(layer=layer), shape, row
        else:
            yield row.name, shape, row


def expected_shapes(config: GemmaConfig, task: str = "causal-lm",
                    num_labels: int = 0) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor `config` needs for `task` (as stored: a quantised weight
    is its values and its `_scale`)."""
    quant = config.quantization
    out: dict[str, tuple[int, ...]] = {}
    for name, shape, _ in iter_params(config, task, num_labels):
        scheme = quant.scheme_for(name) if quant is not None else None
        if quant is not None and scheme is not None:
            out.update(stored_shapes(name, shape, scheme, quant.group_for(scheme)))
        else:
            out[name] = shape
    return out


def param_count(config: GemmaConfig, task: str = "causal-lm", num_labels: int = 0) -> int:
    """Number of parameters, the tied embedding counted once."""
    return sum(math.prod(shape) for _, shape, _ in iter_params(config, task, num_labels))


def validate_weights(config: GemmaConfig, weights: Mapping[str, Any], task: str = "causal-lm",
                     num_labels: int = 0) -> None:
    """Raise one `WeightError` naming every missing, unexpected and mis-shaped tensor.

    `weights` maps names to anything with a `.shape`. A tied model may also carry
    `lm_head.weight` (some exporters write it); it must then have the embedding's shape.
    """
    check_tensor_count(config, weights, task)
    expected = expected_shapes(config, task, num_labels)
    allowed = dict(expected)
    if config.tie_word_embeddings and task == "causal-lm":
        allowed[LM_HEAD] = expected[EMBED]
        if EMBED + SCALE_SUFFIX in expected:
            allowed[LM_HEAD + SCALE_SUFFIX] = expected[EMBED + SCALE_SUFFIX]
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(allowed))
    misshaped = [
        f"{name}: expected {list(allowed[name])}, got {list(weights[name].shape)}"
        for name in weights
        if name in allowed and tuple(weights[name].shape) != allowed[name]
    ]
    quant = config.quantization
    if quant is not None:
        for name in weights:
            scheme = quant.scheme_for(name)
            if name not in allowed or scheme is None:
                continue
            want = stored_dtype(scheme)
            if getattr(weights[name], "dtype", want) != want:
                misshaped.append(f"{name}: expected {want} quantised values ({scheme}), "
                                 f"got {weights[name].dtype}")
    misshaped += dtype_problems(config, {k: v for k, v in weights.items() if k in allowed})
    problems = key_set_problems(missing, unexpected, misshaped)
    if problems:
        raise WeightError("weights do not match the config: " + " | ".join(problems))


def is_float_dtype(dtype: Any) -> bool:
    """Whether `dtype` is a floating-point numpy dtype (bfloat16 included)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name == "bfloat16"  # ml_dtypes' (not imported: 0.8 s)


def dtype_problems(config: GemmaConfig, weights: Mapping[str, Any]) -> list[str]:
    """One line per tensor stored in a dtype the layout does not allow for it: every tensor is
    floating point except the integer values of a quantised weight (`config.quantization`,
    whose dtypes `validate_weights` checks); a quantisation scale is floating point too.
    Tensors without a numpy dtype (another framework's arrays) are not judged here."""
    quant = config.quantization
    out = []
    for name, w in weights.items():
        if quant is not None and quant.scheme_for(name) is not None:
            continue
        dtype = getattr(w, "dtype", None)
        try:
            dtype = np.dtype(dtype) if dtype is not None else None
        except TypeError:
            continue
        if dtype is not None and not is_float_dtype(dtype):
            out.append(f"{name}: expected a floating-point dtype, got {dtype}")
    return out


def check_tensor_count(config: GemmaConfig, weights: Mapping[str, Any], task: str = "causal-lm") -> None:
    """Refuse at once a config that implies more tensors than the weights hold (a config.json or
    GGUF header claiming millions of layers), before anything of that size is listed or made."""
    per_layer = sum(1 for row in LAYOUT if row.per_layer and applies(row, config, task))
    other = sum(1 for row in LAYOUT if not row.per_layer and applies(row, config, task))
    needed = per_layer * config.num_layers + other
    if needed <= 2 * len(weights) + 64:  # a small gap is listed tensor by tensor by the caller
        return
    found = (role_of(name, config) for name in weights)
    layers = {f[1] for f in found if f is not None and f[1] is not None}
    raise WeightError(f"num_hidden_layers: the config's {config.num_layers} layers need at least "
                      f"{needed} tensors, the weights hold {len(weights)} (for {len(layers)} layers)")


_LISTED = 24  # names shown per kind of mismatch; the rest are counted


def _listing(names: list[str], sep: str) -> str:
    shown = sep.join(names[:_LISTED])
    return shown + (f"{sep}... ({len(names) - _LISTED} more)" if len(names) > _LISTED else "")


def key_set_problems(missing: list[str], unexpected: list[str], misshaped: list[str]) -> list[str]:
    """One line per kind of mismatch between a tensor set and what was expected, naming each
    (the first 24 of each kind)."""
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_listing(missing, ', ')}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_listing(unexpected, ', ')}")
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)}: {_listing(misshaped, '; ')}")
    return problems


def format_layout(config: GemmaConfig, task: str = "causal-lm", num_labels: int = 0) -> str:
    """The layout table as text, one row per template: name, role, shape, note."""
    values = _symbols(config, num_labels)
    lines = []
    for row in LAYOUT:
        if not applies(row, config, task):
            continue
        shape = ", ".join(f"{s}={_dim(s, values)}" for s in row.shape)
        lines.append(f"{row.name:<58} {row.role:<14} [{shape}]" + (f"  # {row.note}" if row.note else ""))
    return "\n".join(lines)
