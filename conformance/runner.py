"""Runs the catalogue for chosen backends and dtypes against the NumPy reference."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from conformance.cases import MODEL_CASES, OP_CASES, ForkStep, Harness, ModelCase, OpCase
from conformance.compare import compare_logits, compare_op, compare_tensor, logit_distance, relative_l2
from conformance.golden import GOLDEN_CASES, GOLDEN_DIR, GoldenCase, load_golden
from conformance.tolerances import TOLERANCES, Tolerance, widen_cache, widen_logits
from gemma_core.backend import Backend, get_backend, known_backends
from gemma_core.cache import (
    CacheState,
    KVCache,
    batch_ids,
    grown_length,
    reorder_cache,
    shift_slots,
    write_row,
)
from gemma_core.config import Architecture, GemmaConfig
from gemma_core.errors import BackendError, ConfigError, InputError
from gemma_core.graph import build_graph
from gemma_core.loading import load
from gemma_core.model import Float16OverflowWarning, Model
from gemma_core.opset import OP_KINDS, check_table, groups_needed
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights

DEFAULT_DTYPES = ("float32", "bfloat16")
UNSUPPORTED = "not supported (declared by the backend)"  # the detail of a skip a backend declared
GOLDEN_META: dict[str, dict[str, Any]] = (
    json.loads((GOLDEN_DIR / "meta.json").read_text()) if (GOLDEN_DIR / "meta.json").is_file() else {})


def known_gaps(backend: str | Backend) -> list[tuple[str, str, str]]:
    """(case glob or arch:<name>, dtype, reason) rows the backend declares (`Backend.known_gaps`);
    none for a backend name that does not load."""
    if isinstance(backend, str):
        try:
            backend = get_backend(backend)
        except BackendError:
            return []
    return backend.known_gaps()


def _unsupported(backend: Backend, kinds: set[str]) -> str | None:
    """Why a case using op `kinds` cannot run on `backend`: an op group it does not declare."""
    missing = sorted(groups_needed(kinds) - set(backend.supported_groups()))
    if not missing:
        return None
    return f"{UNSUPPORTED}: needs op group{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"


def _graph_kinds(config: GemmaConfig, task: str = "causal-lm") -> set[str]:
    return {op.kind for op in build_graph(config, task)}


def _gap(gaps: list[tuple[str, str, str]], case: str, arch: Architecture, dtype: str) -> str | None:
    for pattern, gap_dtype, reason in gaps:
        if gap_dtype not in (dtype, "*"):
            continue
        if pattern == f"arch:{arch.value}" or fnmatch.fnmatch(case, pattern):
            return reason
    return None


@dataclasses.dataclass(frozen=True)
class Result:
    """One cell of the case x backend x dtype matrix."""

    case: str
    backend: str
    dtype: str
    status: str  # "pass", "fail" or "skip"
    detail: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


class _Failure(Exception):
    pass


def _check(ok: bool, text: str, what: str, first: list[str]) -> None:
    """Raise on a failed check; remember the first passing one's text for the report."""
    if not ok:
        raise _Failure(f"{what}: {text}")
    if not first:
        first.append(f"{what}: {text}")


def run_op_case(case: OpCase, backend: Backend, dtype: str, tol: Tolerance,
                device: str | None = None) -> str:
    """Compare one op case with the reference; returns a summary or raises _Failure."""
    reference = get_backend("numpy")
    ref = case.run(Harness(reference, tol.reference_dtype), np.random.default_rng(0))
    cand = case.run(Harness(backend, dtype, device), np.random.default_rng(0))
    if set(ref) != set(cand):
        raise _Failure(f"outputs {sorted(cand)} != reference {sorted(ref)}")
    first: list[str] = []
    for name in ref:
        _check(*compare_op(ref[name], cand[name], tol), what=name, first=first)
    return f"{len(ref)} outputs within tolerance"


def _prompt(case: ModelCase, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(case.seed + 1)
    return batch_ids([list(rng.integers(3, vocab, n)) for n in case.lengths])


class _RefStep(NamedTuple):
    """One step of the reference run: its logits and exported cache, and for narrow dtypes the
    float64 oracle's on the same inputs (so that each bound can follow the reference's own error,
    tolerances.ORACLE_SLACK)."""

    logits: np.ndarray
    state: CacheState
    exact_logits: np.ndarray | None
    exact_state: CacheState | None


class _Reference(NamedTuple):
    """A case's whole reference run: the tokens fed (prefill, then one per decode step; or one
    run of tokens per fork) and the reference's step for each. It depends on the case, the
    reference dtype and the reference op table only, not on the candidate, so it is computed once
    and reused for every backend compared (`_reference`)."""

    tokens: tuple[np.ndarray, ...]
    steps: tuple[_RefStep, ...]


class _Bounds:
    """The narrow-dtype bounds loosened to the reference's own error against the oracle: the
    largest of the run so far, as a step of one or two positions alone estimates it poorly."""

    def __init__(self) -> None:
        self.top1, self.kl = 1.0, 0.0

    def logits(self, tol: Tolerance, step: _RefStep, real: np.ndarray) -> Tolerance:
        if step.exact_logits is None:
            return tol
        top1, kl = logit_distance(step.exact_logits[real], step.logits[real])
        self.top1, self.kl = min(self.top1, top1), max(self.kl, kl)
        return widen_logits(tol, self.top1, self.kl)

    @staticmethod
    def cache(tol: Tolerance, step: _RefStep, ref_tensor: np.ndarray, kind: str, layer: int,
              pad: np.ndarray) -> Tolerance:
        if step.exact_state is None:
            return tol
        exact = (step.exact_state.keys if kind == "keys" else step.exact_state.values)[layer]
        return widen_cache(tol, relative_l2(np.where(pad, 0.0, exact), ref_tensor))


def _compare_caches(step: _RefStep, cand: Model, cand_cache: Any, what: str, tol: Tolerance,
                    first: list[str], rows: np.ndarray | None = None) -> None:
    r, c = step.state, cand.export_cache(cand_cache)
    if rows is not None or any(ck.shape != rk.shape for ck, rk in zip(c.keys, r.keys, strict=True)):
        c = _aligned_state(c, r, rows, what)
    for layer, (rk, ck, rv, cv) in enumerate(zip(r.keys, c.keys, r.values, c.values, strict=True)):
        # keys of pad tokens come from fully masked attention rows: implementation-defined
        pad = ~r.real[layer][:, None, :, None]
        rk, ck, rv, cv = (np.where(pad, 0.0, x) for x in (rk, ck, rv, cv))
        for kind, rt, ct in (("keys", rk, ck), ("values", rv, cv)):
            _check(*compare_tensor(rt, ct, _Bounds.cache(tol, step, rt, kind, layer, pad)),
                   what=f"{what} cache {kind} layer {layer}", first=first)


def _aligned_state(c: CacheState, r: CacheState, rows: np.ndarray | None, what: str) -> CacheState:
    """The candidate's exported cache `c` at the reference's rows (`rows` of it, else all) and
    slots: a cache whose tokens start at a later slot than the reference's (a prompt prefilled
    at an offset, slots shifted) exports more leading slots, which must hold no real token; the
    reference's own extra leading slots (a shift dropped pad slots) must be pads too."""
    pick = slice(None) if rows is None else rows
    keys, values, real = [], [], []
    for layer, (ck, cv, cr, rr) in enumerate(zip(c.keys, c.values, c.real, r.real, strict=True)):
        ck, cv, cr = ck[pick], cv[pick], cr[pick]
        have, want = cr.shape[1], rr.shape[1]
        if have > want:
            if cr[:, :have - want].any():
                raise _Failure(f"{what} cache layer {layer}: real tokens in the {have - want} slots before "
                               "the reference's first")
            ck, cv, cr = ck[:, :, have - want:], cv[:, :, have - want:], cr[:, have - want:]
        elif have < want:
            if rr[:, :want - have].any():
                raise _Failure(f"{what} cache layer {layer}: {have} slots exported for the reference's "
                               f"{want}, which hold real tokens")
            pad = [(0, 0), (0, 0), (want - have, 0), (0, 0)]
            ck, cv = np.pad(ck, pad), np.pad(cv, pad)
            cr = np.pad(cr, [(0, 0), (want - have, 0)])
        if not np.array_equal(cr, rr):
            raise _Failure(f"{what} cache layer {layer}: real-token slots {cr.astype(int).tolist()} != "
                           f"reference {rr.astype(int).tolist()}")
        keys.append(ck)
        values.append(cv)
        real.append(cr)
    return CacheState(tuple(keys), tuple(values), r.length, c.seen[pick], tuple(real))


_CHECKPOINTS: dict[str, tuple[GemmaConfig, dict[str, np.ndarray]]] = {}
# (case, tolerance) -> (reference backend, its op table's functions, weights, run): reused while
# the reference backend and its ops are the same objects (a test may swap or patch them) and,
# for a checkpoint, while its weights are the ones loaded
_REFERENCES: dict[tuple[str, Tolerance], tuple[Backend, tuple[Any, ...], Any, _Reference]] = {}


def _checkpoint(path: str) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    if path not in _CHECKPOINTS:
        model = load(path)  # any supported format; the numpy backend keeps float32 host arrays
        _CHECKPOINTS.clear()  # hold one checkpoint at a time
        for key in [k for k in _REFERENCES if k[0].startswith("model:")]:
            del _REFERENCES[key]  # and only its reference runs (a real model's logits are large)
        _CHECKPOINTS[path] = (model.config, dict(model.weights))
    return _CHECKPOINTS[path]


def checkpoint_cases(path: str) -> tuple[ModelCase, ...]:
    """The model-level comparisons on a user's checkpoint: a left-padded batch, then decode."""
    name = f"model:{Path(path).name}"
    return (ModelCase(name, ("user checkpoint: logits and caches across backends",), preset=path,
                      lengths=(11, 6), decode_steps=4),)


def case_config(case: ModelCase) -> GemmaConfig:
    """The config a case runs: its preset with changes, or a checkpoint's."""
    if case.name.startswith("model:"):
        return _checkpoint(case.preset)[0]
    return get_preset(case.preset).replace(**case.changes)


def _case_weights(case: ModelCase, config: GemmaConfig) -> dict[str, np.ndarray]:
    return (_checkpoint(case.preset)[1] if case.name.startswith("model:")
            else random_weights(config, case.seed))


def _reference(case: ModelCase, config: GemmaConfig, weights: Mapping[str, np.ndarray],
               tol: Tolerance) -> _Reference:
    """The case's reference run (`_Reference`), computed once per case and tolerance."""
    backend = get_backend("numpy")
    ops = tuple(backend.op_table(tol.reference_dtype).values())
    key = (f"{case.name}:{case.preset}" if case.name.startswith("model:") else repr(case), tol)
    held = _REFERENCES.get(key)
    if (held is not None and held[0] is backend and held[2] is (weights if case.name.startswith("model:")
                                                                  else None)
            and len(held[1]) == len(ops) and all(a is b for a, b in zip(held[1], ops, strict=True))):
        return held[3]
    run = (_reference_forks if case.forks else _reference_decode)(case, config, weights, tol)
    _REFERENCES[key] = (backend, ops, weights if case.name.startswith("model:") else None, run)
    return run


def _reference_models(config: GemmaConfig, weights: Mapping[str, np.ndarray],
                      tol: Tolerance) -> tuple[Model, Model | None]:
    """The reference in its dtype, and for narrow dtypes the float64 oracle."""
    ref = Model(config, weights, backend="numpy", dtype=tol.reference_dtype)
    narrow = tol.top1_agreement is not None
    return ref, Model(config, weights, backend="numpy", dtype="float64") if narrow else None


def _ref_step(ref: Model, out: Any, exact: Model | None, exact_out: Any) -> _RefStep:
    return _RefStep(np.asarray(out.logits), ref.export_cache(out.cache),
                    None if exact is None else np.asarray(exact_out.logits),
                    None if exact is None else exact.export_cache(exact_out.cache))


def _reference_decode(case: ModelCase, config: GemmaConfig, weights: Mapping[str, np.ndarray],
                      tol: Tolerance) -> _Reference:
    """Prefill of the case's prompt, then greedy decode steps on the reference's own argmax."""
    ref, exact = _reference_models(config, weights, tol)
    ids, mask = _prompt(case, config.vocab_size)
    max_length = ids.shape[1] + case.decode_steps
    r = ref.forward(ids, mask, ref.new_cache(len(ids), max_length))
    e = None if exact is None else exact.forward(ids, mask, exact.new_cache(len(ids), max_length))
    tokens, steps = [ids], [_ref_step(ref, r, exact, e)]
    for _ in range(case.decode_steps):
        nxt = np.asarray(r.logits)[:, -1].argmax(-1)[:, None]
        r = ref.forward(nxt, None, r.cache, last_only=True)
        e = None if exact is None or e is None else exact.forward(nxt, None, e.cache, last_only=True)
        tokens.append(nxt)
        steps.append(_ref_step(ref, r, exact, e))
    return _Reference(tuple(tokens), tuple(steps))


_OPERATIONS = ("crop", "crop-refused", "donate", "reorder", "splice", "shift")


def _fork_step(step: ForkStep) -> tuple[str, Any]:
    """A fork step as (kind, argument): an int is ("chunk", its size); see `cases.ForkStep`."""
    if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
        return "chunk", int(step)
    if isinstance(step, tuple) and len(step) == 2 and step[0] in _OPERATIONS:
        return step[0], step[1]
    raise ValueError(f"fork step {step!r}: expected a chunk size or ({' | '.join(_OPERATIONS)}, arg)")


class _ForkHistory:
    """What a fork's cache holds as the reference sees it, followed step by step by both runs:
    per reference row, the prefix then the tokens fed and kept (`ids`, `mask`; `fed` marks the
    fed columns, whose logits are compared), after `offset` slots the prefix does not use (its
    prefill slot, moved by shifts). `pool` holds the fork's random tokens `[most rows, tokens
    fed]` (a reorder may add rows); each chunk takes its next columns of the first rows."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offset: int, pool: np.ndarray | None) -> None:
        self.ids, self.mask, self.fed = ids, mask, np.zeros(ids.shape[1], bool)
        self.offset, self.pool, self.at = offset, pool, 0
        self.peak, self.spliced = self.length, False

    @property
    def length(self) -> int:
        """The slots the fork's cache holds."""
        return self.offset + self.ids.shape[1]

    def apply(self, kind: str, arg: Any) -> np.ndarray | None:
        """Follow one step; a chunk (or donate) returns its tokens `[rows, size]`."""
        if kind in ("chunk", "donate"):
            rows = len(self.ids)
            tokens = (np.zeros((rows, arg), np.int64) if self.pool is None
                      else self.pool[:rows, self.at:self.at + arg])
            self.at += arg
            self.ids = np.concatenate([self.ids, tokens], axis=1)
            self.mask = np.concatenate([self.mask, np.ones(tokens.shape, self.mask.dtype)], axis=1)
            self.fed = np.concatenate([self.fed, np.ones(arg, bool)])
            self.peak = max(self.peak, self.length)
            return tokens
        if kind == "crop":
            cols = (self.length + arg if arg < 0 else min(arg, self.length)) - self.offset
            if cols < 1:
                raise ValueError(f"fork step {(kind, arg)!r}: crops every token of the fork's rows")
            self.ids, self.mask, self.fed = self.ids[:, :cols], self.mask[:, :cols], self.fed[:cols]
        elif kind == "reorder":
            if self.spliced:  # the reference rows would be a gather of the larger cache's rows
                raise ValueError("fork step ('reorder', ...) after a splice: not a case this runner follows")
            gather = np.asarray(arg, np.int64)
            self.ids, self.mask = self.ids[gather], self.mask[gather]
        elif kind == "splice":
            self.spliced = True
        elif kind == "shift":
            self.offset -= arg
            self.peak = max(self.peak, self.length)
        return None


def _fork_pool_shape(fork: Sequence[ForkStep], rows: int) -> tuple[int, int]:
    """(most rows, tokens fed) of a fork: the shape of its random tokens."""
    steps = [_fork_step(step) for step in fork]
    most = max([rows, *(len(arg) for kind, arg in steps if kind == "reorder")])
    return most, sum(arg for kind, arg in steps if kind in ("chunk", "donate"))


def _fork_max_length(case: ModelCase, ids: np.ndarray, mask: np.ndarray) -> int:
    """The static cache size every fork of the case fits in (its peak length)."""
    peaks = []
    for fork in case.forks:
        history = _ForkHistory(ids, mask, case.prefix_slot, None)
        for step in fork:
            history.apply(*_fork_step(step))
        peaks.append(history.peak)
    return max(peaks)


def _reference_forks(case: ModelCase, config: GemmaConfig, weights: Mapping[str, np.ndarray],
                     tol: Tolerance) -> _Reference:
    """Per fork, the reference's full forward over the prefix and the tokens the fork kept (its
    random tokens, after crops and row gathers), the prompt starting at slot 0."""
    ref, exact = _reference_models(config, weights, tol)
    ids, mask = _prompt(case, config.vocab_size)
    max_length = _fork_max_length(case, ids, mask)
    rng = np.random.default_rng(case.seed + 2)
    tokens, steps = [], []
    for fork in case.forks:
        pool = rng.integers(3, config.vocab_size, _fork_pool_shape(fork, len(ids)))
        history = _ForkHistory(ids, mask, case.prefix_slot, pool)
        for step in fork:
            history.apply(*_fork_step(step))
        r = ref.forward(history.ids, history.mask, max_length=max_length)
        e = None if exact is None else exact.forward(history.ids, history.mask, max_length=max_length)
        tokens.append(pool)
        steps.append(_ref_step(ref, r, exact, e))
    return _Reference(tuple(tokens), tuple(steps))


def run_model_case(case: ModelCase, backend: Backend, dtype: str, tol: Tolerance,
                   device: str | None = None) -> str:
    """Prefill + greedy decode on reference and candidate (on `device`); logits and caches after
    every step, then the candidate's incremental logits against its own full forward pass."""
    config = case_config(case)
    if case.task != "causal-lm":
        return _run_head_case(case, config, backend, dtype, tol, device)
    weights = _case_weights(case, config)
    reference = _reference(case, config, weights, tol)
    cand = Model(config, weights, backend=backend, dtype=dtype, device=device)
    if case.forks:
        return _run_fork_case(case, reference, cand, tol)
    ids, mask = _prompt(case, config.vocab_size)
    max_length = ids.shape[1] + case.decode_steps
    first: list[str] = []
    bounds = _Bounds()
    ref = reference.steps[0]
    c = cand.forward(ids, mask, cand.new_cache(len(ids), max_length), donate_cache=True)
    c_logits = cand.to_numpy(c.logits)
    real = mask.astype(bool)
    prefill_tol = bounds.logits(tol, ref, real)
    _check(*compare_logits(ref.logits, c_logits, real, prefill_tol), first=first,
           what="prefill logits")
    _compare_caches(ref, cand, c.cache, "prefill", tol, first)
    steps = [c_logits]
    for step, (nxt, ref) in enumerate(zip(reference.tokens[1:], reference.steps[1:], strict=True)):
        # handed over, as generation does: the in-place decode path (fork cases check the copy)
        c = cand.forward(nxt, None, c.cache, last_only=True, donate_cache=True)
        c_logits = cand.to_numpy(c.logits)
        steps.append(c_logits)
        real = np.ones(nxt.shape, bool)
        _check(*compare_logits(ref.logits, c_logits, real, bounds.logits(tol, ref, real)),
               what=f"decode {step} logits", first=first)
        _compare_caches(ref, cand, c.cache, f"decode {step}", tol, first)
    full_ids = np.concatenate(reference.tokens, axis=1)
    full_mask = np.concatenate([mask, np.ones((len(ids), case.decode_steps), mask.dtype)], axis=1)
    full = cand.to_numpy(cand.forward(full_ids, full_mask).logits)
    _check(*compare_logits(full, np.concatenate(steps, axis=1), full_mask.astype(bool), prefill_tol),
           what="incremental vs full forward", first=first)
    return f"{case.decode_steps} decode steps; first check: {first[0]}"


def _same_state(a: CacheState, b: CacheState) -> int | None:
    """The first layer where two exported caches differ at all, or None."""
    for layer, (k0, k1, v0, v1) in enumerate(zip(a.keys, b.keys, a.values, b.values, strict=True)):
        if not (np.array_equal(k0, k1, equal_nan=True) and np.array_equal(v0, v1, equal_nan=True)):
            return layer
    return None


class _CandidateFork:
    """One fork on the candidate: its cache, the logits of every column of the history (None for
    the prefix), and after a splice the rows of the larger cache that hold the fork (`view`)."""

    def __init__(self, cand: Model, shared: KVCache, history: _ForkHistory, rng: np.random.Generator) -> None:
        self.cand, self.cache, self.history, self.rng = cand, shared, history, rng
        self.owned = False  # the shared prefix cache: shift_slots may write its caller's in place
        self.view: np.ndarray | None = None
        self.logits: list[np.ndarray | None] = [None] * history.ids.shape[1]

    def step(self, kind: str, arg: Any, what: str) -> None:
        cand, h = self.cand, self.history
        if kind in ("chunk", "donate"):
            tokens = h.apply(kind, arg)
            assert tokens is not None
            self._feed(tokens, kind == "donate", what)
            return
        if kind == "crop-refused":
            try:
                cand.crop_cache(self.cache, arg)
            except InputError:
                return
            raise _Failure(f"{what}: crop_cache({arg}) of a cache of {self.cache.length} tokens, whose "
                           "sliding ring wrapped, was not refused (InputError)")
        h.apply(kind, arg)
        if kind == "crop":
            self.cache = cand.crop_cache(self.cache, arg)  # shares the layers of an unowned cache
            del self.logits[h.ids.shape[1]:]
        elif kind == "reorder":
            rows = np.asarray(arg, np.int64)
            self.cache = reorder_cache(cand.backend, self.cache, rows, cand.dtype, cand.device)
            self.logits = [None if x is None else x[rows] for x in self.logits]
            self.owned = True
            if self.cache.batch_size != len(rows):
                raise _Failure(f"{what}: reorder_cache made {self.cache.batch_size} rows, not {len(rows)}")
        elif kind == "splice":
            self._splice(int(arg))
        elif kind == "shift":
            if not self.owned:
                self.cache, self.owned = cand.copy_cache(self.cache), True
            self.cache = shift_slots(cand.backend, self.cache, arg, cand.dtype, cand.device)
        if self.cache.length != h.length:
            raise _Failure(f"{what}: the cache holds {self.cache.length} slots after {kind}, expected "
                           f"{h.length}")

    def _feed(self, tokens: np.ndarray, donate: bool, what: str) -> None:
        cand, cache = self.cand, self.cache
        if self.view is not None:  # the larger cache's other rows: other prompts, other tokens
            full = self.rng.integers(3, cand.config.vocab_size, (cache.batch_size, tokens.shape[1]))
            full[self.view] = tokens
            tokens = full
        needed = cache.length + tokens.shape[1]
        grows = cache.dynamic and needed > cache.max_length
        expected = (grown_length(cache.max_length, needed, cand.config.max_position_embeddings) if grows
                    else cache.max_length)
        if donate:  # every slot of every layer, past the length too (a global layer's next ones)
            kept = [cand.backend.export_cache_layer(layer) for layer in cache.layers]
            copy = cand.copy_cache(cache)
            out = cand.forward(tokens, None, copy, donate_cache=True)
            try:
                cand.export_cache(copy)
            except InputError:
                pass
            else:
                raise _Failure(f"{what}: the copy handed to forward(donate_cache=True) was not marked spent")
            cache.check_usable()
            for layer, (k0, v0) in enumerate(kept):
                k1, v1 = cand.backend.export_cache_layer(cache.layers[layer])
                if not (np.array_equal(k0, k1, equal_nan=True) and np.array_equal(v0, v1, equal_nan=True)):
                    raise _Failure(f"{what}: forward(copy_cache(c), donate_cache=True) changed c's buffers "
                                   f"(layer {layer}): the copy shares them")
        else:
            out = cand.forward(tokens, None, cache)
        if out.cache.max_length != expected or out.cache.dynamic != cache.dynamic:
            raise _Failure(f"{what}: a {'dynamic' if cache.dynamic else 'static'} cache of "
                           f"{cache.max_length} slots fed to {needed} tokens became a "
                           f"{'dynamic' if out.cache.dynamic else 'static'} one of {out.cache.max_length}, "
                           f"expected {expected} (grown_length)")
        logits = cand.to_numpy(out.logits)
        if self.view is not None:
            logits = logits[self.view]
        self.logits.extend(logits[:, j] for j in range(logits.shape[1]))
        self.cache, self.owned = out.cache, True

    def _splice(self, row: int) -> None:
        """The fork's rows written (write_row, as the serving engine joins a prefilled prompt)
        into rows `row`, `row + 1`, ... of a cache of two more rows holding other prompts: the
        fork's own, gathered so that every row written held another one (a separate prefill of
        other prompts would cost a compiled step shape more)."""
        cand, cache = self.cand, self.cache
        size = cache.batch_size
        if not 0 <= row <= 2:
            raise ValueError(f"splice: row {row} of a cache of {size + 2} rows for {size}")
        others = (np.arange(size + 2) - row + 1) % size  # row + j holds row j + 1, not j
        host = reorder_cache(cand.backend, cache, others, cand.dtype, cand.device)
        for j in range(size):
            host = write_row(cand.backend, host, row + j, cache, j, cand.dtype, cand.device)
        self.cache, self.view, self.owned = host, np.arange(row, row + size), True


def _run_fork_case(case: ModelCase, reference: _Reference, cand: Model, tol: Tolerance) -> str:
    """One prefix cache continued once per fork, each fork from the same cache object, through
    the cache operations its steps name: the logits of the tokens it kept and its final cache
    (at the fork's rows) against the reference's full forward over prefix + those tokens; then
    the prefix cache's exported state must be exactly what it was."""
    ids, mask = _prompt(case, cand.config.vocab_size)
    rows, prefix = ids.shape
    max_length = _fork_max_length(case, ids, mask)
    if case.dynamic:
        shared = cand.forward(ids, mask).cache
        if not shared.dynamic or shared.max_length != prefix:
            raise _Failure(f"dynamic: forward(ids, mask) made a {'dynamic' if shared.dynamic else 'static'} "
                           f"cache of {shared.max_length} slots, expected a dynamic one of {prefix}")
    else:
        start = cand.new_cache(rows, max_length)
        if case.prefix_slot:  # as the serving engine places a joining prompt (gemma_core/serving)
            start = dataclasses.replace(start, length=case.prefix_slot)
        shared = cand.forward(ids, mask, start).cache
    before = cand.export_cache(shared)
    first: list[str] = []
    bounds = _Bounds()
    names: list[str] = []
    for n, (fork, pool, ref) in enumerate(zip(case.forks, reference.tokens, reference.steps, strict=True)):
        ops = list(dict.fromkeys(kind for kind, _ in map(_fork_step, fork) if kind != "chunk"))
        names += ops
        label = f"fork {n}" + (f" ({', '.join(ops)})" if ops else "")
        run = _CandidateFork(cand, shared, _ForkHistory(ids, mask, case.prefix_slot, pool),
                             np.random.default_rng((case.seed, 3, n)))
        for i, step in enumerate(fork):
            what = f"{label} step {i} {step!r}"
            try:
                run.step(*_fork_step(step), what=what)
            except _Failure:
                raise
            except Exception as e:  # name the operation that crashed, not just the case
                raise _Failure(f"{what}: {type(e).__name__}: {e}") from e
        history = run.history
        fork_tol = bounds.logits(tol, ref, history.mask.astype(bool))
        fed = np.flatnonzero(history.fed)
        logits = np.stack([x for x in (run.logits[j] for j in fed) if x is not None], axis=1)
        _check(*compare_logits(ref.logits[:, fed], logits, history.mask[:, fed].astype(bool), fork_tol),
               what=f"{label} logits", first=first)
        _compare_caches(ref, cand, run.cache, label, tol, first, rows=run.view)
        seen = run.cache.seen if run.view is None else run.cache.seen[run.view]
        if not np.array_equal(seen, ref.state.seen):
            raise _Failure(f"{label} cache: real tokens seen {seen.tolist()} != reference "
                           f"{ref.state.seen.tolist()} (the next RoPE positions)")
    layer = _same_state(before, cand.export_cache(shared))
    if layer is not None:
        raise _Failure(f"the prefix cache passed to forward changed (layer {layer})")
    done = f" ({', '.join(dict.fromkeys(names))})" if names else ""
    return f"{len(case.forks)} forks of one prefix cache{done}; first check: {first[0]}"


def run_golden_case(case: GoldenCase, backend: Backend, dtype: str, tol: Tolerance,
                    device: str | None = None) -> str:
    """The backend against transformers' recorded logits and caches (first and last layer)."""
    expected = load_golden(case)
    config = case.config()
    model = Model(config, random_weights(config, case.seed), backend=backend, dtype=dtype, device=device)
    ids, mask = case.inputs()
    out = model.forward(ids, mask)
    first: list[str] = []
    _check(*compare_logits(expected["logits"].astype(np.float64), model.to_numpy(out.logits),
                           mask.astype(bool), tol), what="logits vs transformers", first=first)
    state = model.export_cache(out.cache)
    for tag, layer in (("first", 0), ("last", config.num_layers - 1)):
        for kind, ours in (("keys", state.keys[layer]), ("values", state.values[layer])):
            ref = expected[f"{tag}_{kind}"]
            kept = ref.shape[2]  # transformers' sliding layers keep W - 1 tokens
            pad = ~state.real[layer][:, None, -kept:, None]
            _check(*compare_tensor(np.where(pad, 0.0, ref), np.where(pad, 0.0, ours[:, :, -kept:]), tol),
                   what=f"{tag} layer {kind} vs transformers", first=first)
    return f"transformers {GOLDEN_META.get(case.name, {}).get('transformers', '?')}; {first[0]}"


def _run_head_case(case: ModelCase, config: GemmaConfig, backend: Backend, dtype: str,
                   tol: Tolerance, device: str | None = None) -> str:
    """A task head on a left-padded batch: its outputs (and every hidden state, for base)."""
    labels = 3 if case.task.endswith("classification") else 0
    weights = random_weights(config, case.seed, task=case.task, num_labels=labels)
    ref = Model(config, weights, backend="numpy", dtype=tol.reference_dtype, task=case.task)
    cand = Model(config, weights, backend=backend, dtype=dtype, task=case.task, device=device)
    ids, mask = _prompt(case, config.vocab_size)
    r, c = ref.forward(ids, mask), cand.forward(ids, mask)
    real = mask.astype(bool)
    first: list[str] = []
    if case.task == "base":
        assert r.hidden_states is not None and c.hidden_states is not None
        for i, (rh, ch) in enumerate(zip(r.hidden_states, c.hidden_states, strict=True)):
            pad = ~real[:, :, None]  # rows of pad tokens come from fully masked attention
            rh, ch = np.where(pad, 0.0, np.asarray(rh)), np.where(pad, 0.0, cand.to_numpy(ch))
            _check(*compare_tensor(rh, ch, tol), what=f"hidden state {i}", first=first)
        return f"{len(r.hidden_states)} hidden states; first check: {first[0]}"
    rl, cl = np.asarray(r.logits), cand.to_numpy(c.logits)
    if case.task == "sequence-classification":  # [B, labels]: one pooled position per row
        rl, cl, real = rl[:, None], cl[:, None], np.ones((len(ids), 1), bool)
    _check(*compare_logits(rl, cl, real, tol), what=f"{case.task} logits", first=first)
    return first[0]


def check_float16_policy(backend: Backend, device: str | None = None) -> str:
    """Rule 9: float16 Gemma 2/3 is refused, or runs with a warning when allowed (checked only
    where the backend declares float16)."""
    config = get_preset("tiny-gemma2")
    weights = random_weights(config, 0)
    try:
        Model(config, weights, backend=backend, dtype="float16", device=device)
    except ConfigError:
        pass
    else:
        raise _Failure("float16 Gemma 2 was accepted without allow_float16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Model(config, weights, backend=backend, dtype="float16", allow_float16=True, device=device)
    if not any(issubclass(w.category, Float16OverflowWarning) for w in caught):
        raise _Failure("allow_float16=True did not warn")
    return "refused by default, warns when allowed"


def _op_table_check(backend: Backend, dtype: str) -> str:
    """The table has every required core kind and every kind of the groups the backend declares,
    and nothing outside the vocabulary."""
    groups = backend.supported_groups()
    table = backend.op_table(dtype)
    missing, extra = check_table(table, groups)
    if missing or extra:
        raise _Failure(f"op table differs from the vocabulary: missing {missing}, extra {extra}")
    kinds = sum(k in table for k in OP_KINDS)
    if kinds == len(OP_KINDS):
        return f"all {len(OP_KINDS)} op kinds"
    return f"{kinds} op kinds (declared groups: {', '.join(groups)})"


def _cell(fn: Any, case: str, name: str, dtype: str, *args: Any) -> Result:
    try:
        return Result(case, name, dtype, "pass", fn(*args))
    except _Failure as e:
        return Result(case, name, dtype, "fail", str(e))
    except Exception as e:  # a crash in a backend is a failure of that cell, not of the run
        return Result(case, name, dtype, "fail", f"{type(e).__name__}: {e}")


ALWAYS_RUN = ("float16-policy", "op-table")  # cells of every backend (and dtype), whatever `cases` says


def case_names(model: str | None = None) -> list[str]:
    """The names `run_conformance(cases=...)` accepts: the catalogue's cases, or with `model`
    (a checkpoint) its model-level comparisons."""
    if model is not None:
        return [*ALWAYS_RUN, *(c.name for c in checkpoint_cases(model))]
    return [*ALWAYS_RUN, *(c.name for c in OP_CASES), *(c.name for c in GOLDEN_CASES),
            *(c.name for c in MODEL_CASES)]


def run_conformance(backends: Sequence[str] | None = None, dtypes: Sequence[str] = DEFAULT_DTYPES,
                    cases: Iterable[str] | None = None, model: str | None = None,
                    device: str | None = None,
                    progress: Callable[[Result], None] | None = None) -> list[Result]:
    """The full matrix. Backends named explicitly must load; by default every known backend is
    tried and one that is not installed is reported as skipped. With `model` (a checkpoint in
    any supported format), the model-level comparisons run on its weights instead of the
    catalogue's random ones; with `device`, every candidate model and op input is placed there
    (the reference stays on the CPU). Cases listed in a backend's known gaps are skipped with the
    reason; so are cases needing a dtype, op group or device the backend does not declare.
    A name in `cases` that is not in `case_names(model)` raises `ConfigError` before anything runs.
    `progress` is called with each result as it is made (the CLI's per-case line)."""
    explicit = backends is not None
    names = list(backends) if backends is not None else known_backends()
    wanted = set(cases) if cases is not None else None
    if wanted is not None:
        known = case_names(model)
        unknown = sorted(wanted - set(known))
        if unknown:
            raise ConfigError(f"cases: unknown case{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))} (known: {', '.join(known)})")
    results: list[Result] = []

    def add(result: Result) -> None:
        results.append(result)
        if progress is not None:
            progress(result)
    model_cases = MODEL_CASES if model is None else checkpoint_cases(model)
    for name in names:
        try:
            backend = get_backend(name)
        except BackendError as e:
            add(Result("load", name, "-", "fail" if explicit else "skip", str(e)))
            continue
        if not backend.supports_device(device):
            add(Result("*", name, "-", "skip", f"{UNSUPPORTED}: device {device!r} "
                                  f"(devices: {', '.join(backend.devices)})"))
            continue
        gaps = known_gaps(backend)
        if "float16" in backend.dtypes:
            add(_cell(check_float16_policy, "float16-policy", name, "float16", backend,
                                 device))
        else:
            add(Result("float16-policy", name, "float16", "skip", f"{UNSUPPORTED}: float16"))
        for dtype in dtypes:
            if dtype not in TOLERANCES:
                raise ConfigError(f"dtype: no tolerance for {dtype!r} (known: {', '.join(TOLERANCES)})")
            if dtype not in backend.dtypes:
                add(Result("*", name, dtype, "skip", f"{UNSUPPORTED}: {dtype}"))
                continue
            tol = TOLERANCES[dtype]
            add(_cell(_op_table_check, "op-table", name, dtype, backend, dtype))
            for op_case in OP_CASES if model is None else ():
                if wanted is None or op_case.name in wanted:
                    reason = _unsupported(backend, {op_case.kind})
                    if reason is not None:
                        add(Result(op_case.name, name, dtype, "skip", reason))
                        continue
                    add(_cell(run_op_case, op_case.name, name, dtype, op_case, backend,
                                         dtype, tol, device))
            for golden in GOLDEN_CASES if model is None and dtype == "float32" else ():
                if wanted is not None and golden.name not in wanted:
                    continue
                reason = _gap(gaps, golden.name, golden.config().architecture, dtype)
                if reason is not None:
                    add(Result(golden.name, name, dtype, "skip", f"known gap: {reason}"))
                    continue
                reason = _unsupported(backend, _graph_kinds(golden.config()))
                if reason is not None:
                    add(Result(golden.name, name, dtype, "skip", reason))
                    continue
                add(_cell(run_golden_case, golden.name, name, dtype, golden, backend, dtype,
                                     tol, device))
            for case in model_cases:
                if (wanted is not None and case.name not in wanted) or (
                        case.dtypes and dtype not in case.dtypes):
                    continue
                reason = _gap(gaps, case.name, case_config(case).architecture, dtype)
                if reason is not None:
                    add(Result(case.name, name, dtype, "skip", f"known gap: {reason}"))
                    continue
                reason = _unsupported(backend, _graph_kinds(case_config(case), case.task))
                if reason is not None:
                    add(Result(case.name, name, dtype, "skip", reason))
                    continue
                add(_cell(run_model_case, case.name, name, dtype, case, backend, dtype, tol,
                                     device))
    return results
