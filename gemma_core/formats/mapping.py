"""The conversion engine: a checkpoint format is a table of rows mapping canonical tensors
(Hugging Face names, `[out, in]` shapes; see `gemma_core.layout`) to the format's keys.

A row names its format key and canonical source(s) as templates with `{layer}`, the steps applied
to each source on the way out (reshape to config symbols, transpose, norm offset, row padding)
and, for several sources, how they are joined (stacked on a new leading axis, or concatenated
along axis 0). `to_format` applies a table; `from_format` inverts it after checking the full key
set and every shape, so a wrong, missing or extra tensor is named before anything is converted.

Symbols in shapes are those of the layout (V, D, F, N, K, H) plus any the table adds (such as a
padded vocabulary). Reshape and transpose only move bytes, so those round trips are bit-exact;
an offset (GGUF's `1 + w`) is exact only up to one rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from gemma_core.config import GemmaConfig
from gemma_core.errors import ConfigError, WeightError
from gemma_core.layout import LM_HEAD, _symbols, expected_shapes, key_set_problems, validate_weights
from gemma_core.quant import keeps_dtype

Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Step:
    """One forward step on a canonical tensor.

    kind: "reshape" (arg: symbols, e.g. ("N", "H", "D")), "transpose" (arg: axes),
    "offset" (arg: a number added on the way out, subtracted on the way back),
    "pad_rows" (arg: the symbol of the padded row count; zero rows are appended).
    """

    kind: str
    arg: Any


def reshape(*symbols: str) -> Step:
    return Step("reshape", symbols)


def transpose(*axes: int) -> Step:
    return Step("transpose", axes)


def offset(value: float) -> Step:
    return Step("offset", value)


def pad_rows(symbol: str) -> Step:
    return Step("pad_rows", symbol)


T = transpose(1, 0)  # a 2-D transpose, the commonest step


@dataclasses.dataclass(frozen=True)
class Row:
    """One format tensor: its key template, canonical source template(s), steps and join.

    `when` names a predicate of the table (or a config property, `not ...` negates) that must
    hold for the row to exist. `join` is None for one source, else "stack" or "concat".
    """

    key: str
    sources: tuple[str, ...]
    steps: tuple[Step, ...] = ()
    join: str | None = None
    when: str = "always"


def row(key: str, source: str | tuple[str, ...], *steps: Step, join: str | None = None,
        when: str = "always") -> Row:
    return Row(key, (source,) if isinstance(source, str) else tuple(source), tuple(steps), join, when)


@dataclasses.dataclass(frozen=True)
class Table:
    """A format: its rows, how a layer index is spelled in its keys, extra symbols and predicates."""

    name: str
    rows: tuple[Row, ...]
    layer_key: Callable[[int], str] = str
    symbols: Callable[[GemmaConfig], dict[str, int]] = lambda config: {}
    predicates: Mapping[str, Callable[[GemmaConfig], bool]] = dataclasses.field(default_factory=dict)

    def applies(self, r: Row, config: GemmaConfig) -> bool:
        when = r.when
        negate = when.startswith("not ")
        when = when[4:] if negate else when
        if when == "always":
            value = True
        elif when in self.predicates:
            value = self.predicates[when](config)
        else:
            value = bool(getattr(config, when))
        return value != negate


@dataclasses.dataclass
class Checkpoint:
    """A model in canonical form plus the tokenizer files that travel with it.

    `tokenizer_model` is the SentencePiece `tokenizer.model`; `hf_files` are Hugging Face
    tokenizer/generation files by name (copied verbatim between Hugging Face folders).
    """

    config: GemmaConfig
    weights: dict[str, np.ndarray]
    tokenizer_model: bytes | None = None
    hf_files: dict[str, bytes] = dataclasses.field(default_factory=dict)


# ---- the engine --------------------------------------------------------------------------------


def _values(table: Table, config: GemmaConfig) -> dict[str, int]:
    return {**_symbols(config), **table.symbols(config)}


def _instances(table: Table, config: GemmaConfig) -> Iterator[tuple[str, tuple[str, ...], Row]]:
    """(format key, canonical names, row) of every tensor the table produces for `config`."""
    for r in table.rows:
        if not table.applies(r, config):
            continue
        if "{layer}" in r.key or any("{layer}" in s for s in r.sources):
            for layer in range(config.num_layers):
                key = r.key.format(layer=table.layer_key(layer))
                yield key, tuple(s.format(layer=layer) for s in r.sources), r
        else:
            yield r.key, r.sources, r


def _step_shape(step: Step, shape: tuple[int, ...], values: Mapping[str, int]) -> tuple[int, ...]:
    if step.kind == "reshape":
        new = tuple(math.prod(values[s] for s in sym.split("*")) for sym in step.arg)
        if math.prod(new) != math.prod(shape):
            raise ConfigError(f"cannot reshape {list(shape)} to {list(step.arg)} = {list(new)}")
        return new
    if step.kind == "transpose":
        return tuple(shape[a] for a in step.arg)
    if step.kind == "pad_rows":
        return (values[step.arg], *shape[1:])
    return shape


def format_shapes(table: Table, config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Format key -> shape of every tensor `config` has in this format."""
    canonical = expected_shapes(config)
    values = _values(table, config)
    out = {}
    for key, sources, r in _instances(table, config):
        shapes = []
        for s in sources:
            shape = canonical[s]
            for step in r.steps:
                shape = _step_shape(step, shape, values)
            shapes.append(shape)
        if r.join == "stack":
            out[key] = (len(shapes), *shapes[0])
        elif r.join == "concat":
            out[key] = (sum(s[0] for s in shapes), *shapes[0][1:])
        else:
            out[key] = shapes[0]
    return out


def _forward_step(step: Step, x: np.ndarray, values: Mapping[str, int]) -> np.ndarray:
    if step.kind == "reshape":
        return x.reshape(_step_shape(step, x.shape, values))
    if step.kind == "transpose":
        return x.transpose(step.arg)
    if step.kind == "offset":
        return (x.astype(np.float32) + np.float32(step.arg)).astype(np.float32)
    if step.kind == "pad_rows":
        rows = values[step.arg]
        if rows < x.shape[0]:
            raise ConfigError(f"cannot pad {x.shape[0]} rows down to {rows}")
        pad = np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)
        return np.concatenate([x, pad], axis=0)
    raise ValueError(f"unknown step {step.kind!r}")


def _inverse_step(step: Step, x: np.ndarray, before: tuple[int, ...]) -> np.ndarray:
    """Undo `step`; `before` is the canonical-side shape the step started from."""
    if step.kind == "reshape":
        return x.reshape(before)
    if step.kind == "transpose":
        return x.transpose(np.argsort(step.arg))
    if step.kind == "offset":
        return (x.astype(np.float32) - np.float32(step.arg)).astype(np.float32)
    if step.kind == "pad_rows":
        return x[: before[0]]
    raise ValueError(f"unknown step {step.kind!r}")


def _check_coverage(table: Table, config: GemmaConfig) -> None:
    """Every canonical tensor is consumed by exactly one row (a table bug otherwise)."""
    if getattr(config, "quantization", None) is not None:
        raise ConfigError(f"quantization: {table.name} conversion takes floating-point weights; "
                          "gemma convert dequantises a quantised checkpoint for it")
    wanted = set(expected_shapes(config))
    used: list[str] = [s for _, sources, _ in _instances(table, config) for s in sources]
    missing = sorted(wanted - set(used))
    twice = sorted({s for s in used if used.count(s) > 1})
    extra = sorted(set(used) - wanted)
    if missing or twice or extra:
        raise WeightError(f"{table.name} table for {config.architecture.value}: unmapped {missing}, "
                          f"mapped twice {twice}, unknown {extra}")


def to_format(table: Table, config: GemmaConfig, weights: Mapping[str, np.ndarray],
              progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Canonical weights -> format tensors by key. The input is validated against `config`."""
    validate_weights(config, weights)
    if config.tie_word_embeddings:
        weights = {k: v for k, v in weights.items() if k != LM_HEAD}
    _check_coverage(table, config)
    values = _values(table, config)
    out: dict[str, np.ndarray] = {}
    instances = list(_instances(table, config))
    for i, (key, sources, r) in enumerate(instances):
        parts = []
        for s in sources:
            x = np.asarray(weights[s])
            for step in r.steps:
                x = _forward_step(step, x, values)
            parts.append(x)
        if r.join == "stack":
            out[key] = np.stack(parts)
        elif r.join == "concat":
            out[key] = np.concatenate(parts, axis=0)
        else:
            out[key] = np.ascontiguousarray(parts[0])
        if progress is not None:
            progress(i + 1, len(instances))
    return out


def check_tensors(table: Table, config: GemmaConfig, tensors: Mapping[str, Any], source: str) -> None:
    """Raise one `WeightError` naming every missing, unexpected and mis-shaped format tensor."""
    expected = format_shapes(table, config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [f"{k}: expected {list(expected[k])}, got {list(tensors[k].shape)}"
                 for k in sorted(tensors) if k in expected and tuple(tensors[k].shape) != expected[k]]
    problems = key_set_problems(missing, unexpected, misshaped)
    if problems:
        raise WeightError(f"{source}: {table.name} tensors do not match a {config.architecture.value} "
                          f"model of this config: " + " | ".join(problems))


def from_format(table: Table, config: GemmaConfig, tensors: Mapping[str, Any], source: str = "",
                progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Format tensors -> canonical weights, after checking the key set and every shape."""
    _check_coverage(table, config)
    check_tensors(table, config, tensors, source)
    canonical = expected_shapes(config)
    values = _values(table, config)
    out: dict[str, np.ndarray] = {}
    instances = list(_instances(table, config))
    for i, (key, sources, r) in enumerate(instances):
        x = np.asarray(tensors[key])
        if r.join == "stack":
            parts = list(x)
        elif r.join == "concat":
            sizes = []
            for s in sources:
                shape = canonical[s]
                for step in r.steps:
                    shape = _step_shape(step, shape, values)
                sizes.append(shape[0])
            parts = np.split(x, np.cumsum(sizes)[:-1], axis=0)
        else:
            parts = [x]
        for s, part in zip(sources, parts, strict=True):
            shapes = [canonical[s]]
            for step in r.steps:
                shapes.append(_step_shape(step, shapes[-1], values))
            for step, before in zip(reversed(r.steps), reversed(shapes[:-1]), strict=True):
                part = _inverse_step(step, part, before)
            out[s] = np.ascontiguousarray(part)
        if progress is not None:
            progress(i + 1, len(instances))
    validate_weights(config, out)
    return out


def cast(weights: Mapping[str, np.ndarray], dtype: str | None) -> dict[str, np.ndarray]:
    """Floating tensors cast to `dtype` (float32, bfloat16, float16); None keeps them. Quantised
    values and their scales keep their dtypes (gemma_core.quant.keeps_dtype)."""
    if dtype is None:
        return dict(weights)
    import ml_dtypes

    targets = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "float16": np.dtype(np.float16)}
    if dtype not in targets:
        raise ConfigError(f"dtype: cannot convert to {dtype!r} (supported: {', '.join(targets)})")
    return {k: v if keeps_dtype(k, v) else np.asarray(v).astype(targets[dtype])
            for k, v in weights.items()}


def dtype_name(weights: Mapping[str, np.ndarray]) -> str:
    """The floating dtype the weights share (the commonest, if mixed)."""
    import ml_dtypes

    names = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
             np.dtype(np.float16): "float16"}
    counts: dict[str, int] = {}
    for k, v in weights.items():
        if keeps_dtype(k, v):  # quantised values and scales say nothing of the float dtype
            continue
        name = names.get(np.asarray(v).dtype, "float32")
        counts[name] = counts.get(name, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else "float32"
