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

from conformance.cases import MODEL_CASES, OP_CASES, Harness, ModelCase, OpCase
from conformance.compare import compare_logits, compare_op, compare_tensor, logit_distance, relative_l2
from conformance.golden import GOLDEN_CASES, GOLDEN_DIR, GoldenCase, load_golden
from conformance.tolerances import TOLERANCES, Tolerance, widen_cache, widen_logits
from gemma_core.backend import Backend, get_backend, known_backends
from gemma_core.cache import CacheState, batch_ids
from gemma_core.config import Architecture, GemmaConfig
from gemma_core.errors import BackendError, ConfigError
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
                    first: list[str]) -> None:
    r, c = step.state, cand.export_cache(cand_cache)
    for layer, (rk, ck, rv, cv) in enumerate(zip(r.keys, c.keys, r.values, c.values, strict=True)):
        # keys of pad tokens come from fully masked attention rows: implementation-defined
        pad = ~r.real[layer][:, None, :, None]
        rk, ck, rv, cv = (np.where(pad, 0.0, x) for x in (rk, ck, rv, cv))
        for kind, rt, ct in (("keys", rk, ck), ("values", rv, cv)):
            _check(*compare_tensor(rt, ct, _Bounds.cache(tol, step, rt, kind, layer, pad)),
                   what=f"{what} cache {kind} layer {layer}", first=first)


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


def _reference_forks(case: ModelCase, config: GemmaConfig, weights: Mapping[str, np.ndarray],
                     tol: Tolerance) -> _Reference:
    """Per fork, the reference's full forward over the prefix and the fork's random tokens."""
    ref, exact = _reference_models(config, weights, tol)
    ids, mask = _prompt(case, config.vocab_size)
    rows, prefix = ids.shape
    max_length = prefix + max(sum(fork) for fork in case.forks)
    rng = np.random.default_rng(case.seed + 2)
    tokens, steps = [], []
    for fork in case.forks:
        fork_tokens = rng.integers(3, config.vocab_size, (rows, sum(fork)))
        full_ids = np.concatenate([ids, fork_tokens], axis=1)
        full_mask = np.concatenate([mask, np.ones(fork_tokens.shape, mask.dtype)], axis=1)
        r = ref.forward(full_ids, full_mask, max_length=max_length)
        e = None if exact is None else exact.forward(full_ids, full_mask, max_length=max_length)
        tokens.append(fork_tokens)
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


def _run_fork_case(case: ModelCase, reference: _Reference, cand: Model, tol: Tolerance) -> str:
    """One prefix cache continued once per fork, each fork from the same cache object: its
    logits and final cache against the reference's full forward over prefix + fork; then the
    prefix cache's exported state must be exactly what it was."""
    ids, mask = _prompt(case, cand.config.vocab_size)
    rows, prefix = ids.shape
    max_length = prefix + max(sum(fork) for fork in case.forks)
    shared = cand.forward(ids, mask, cand.new_cache(rows, max_length)).cache
    before = cand.export_cache(shared)
    first: list[str] = []
    bounds = _Bounds()
    for n, (fork, tokens, ref) in enumerate(zip(case.forks, reference.tokens, reference.steps,
                                                strict=True)):
        full_mask = np.concatenate([mask, np.ones(tokens.shape, mask.dtype)], axis=1)
        fork_tol = bounds.logits(tol, ref, full_mask.astype(bool))
        cache, logits, at = shared, [], 0
        for size in fork:
            out = cand.forward(tokens[:, at:at + size], None, cache)
            cache, at = out.cache, at + size
            logits.append(cand.to_numpy(out.logits))
        _check(*compare_logits(ref.logits[:, prefix:], np.concatenate(logits, axis=1),
                               np.ones(tokens.shape, bool), fork_tol),
               what=f"fork {n} logits", first=first)
        _compare_caches(ref, cand, cache, f"fork {n}", tol, first)
    after = cand.export_cache(shared)
    for layer, (k0, k1, v0, v1) in enumerate(zip(before.keys, after.keys, before.values, after.values,
                                                 strict=True)):
        if not (np.array_equal(k0, k1, equal_nan=True) and np.array_equal(v0, v1, equal_nan=True)):
            raise _Failure(f"the prefix cache passed to forward changed (layer {layer})")
    return f"{len(case.forks)} forks of one prefix cache; first check: {first[0]}"


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
