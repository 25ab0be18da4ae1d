"""Gradient conformance: each backend's training gradients (the loss's gradient with respect to every
weight) against the float64 NumPy oracle (`backends.numpy.vjp.value_and_grad`), per weight tensor by
relative L2 error, in float32 and bfloat16.

The gradient faces, one per backend, each differentiating the op list with its framework's own
autograd (nothing is written twice; each face is the one a user trains with):
- numpy: the reverse-mode runner itself in the candidate dtype (float32; bfloat16 emulated forward,
  float32 backward);
- torch: `backends.torch.as_module(model)`, `.loss.backward()`;
- jax: `jax.grad` of the `apply` of `backends.jax.as_function(model, dtype)`;
- tensorflow: `tf.GradientTape` over the tensorflow op table bound to `build_graph(config,
  cache=False)`, the weights as `tf.Variable`s in the compute dtype (TensorFlow has no training
  face yet: its `embed` is wrapped here to freeze the pad row, as the torch and jax faces do).
The oracle runs on the weights rounded to the candidate's dtype (so that only the computation
differs). Labels are -100 at pads. Most cases also skip each padded row's first real token, so
that no loss term reads a logit computed at a padding position; `grad-gemma3-pad-logits-read`
keeps it, and so checks the two conventions such a logit's gradient depends on (the fully masked
attention row's uniform softmax, and the embedding's frozen pad row: `backends.numpy.vjp`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from backends.numpy.ops import make_rounder
from backends.numpy.vjp import IGNORE_INDEX, value_and_grad
from conformance.runner import Result
from gemma_core.backend import get_backend
from gemma_core.cache import batch_ids
from gemma_core.config import GemmaConfig
from gemma_core.errors import BackendError, ConfigError
from gemma_core.graph import bind, build_graph, run_bound
from gemma_core.masks import layer_kinds
from gemma_core.model import Model
from gemma_core.presets import get_preset
from gemma_core.step import step_inputs
from gemma_core.weights import random_weights

Grads = tuple[float, dict[str, np.ndarray]]  # (loss, {weight name: gradient, float64})


@dataclasses.dataclass(frozen=True)
class GradTolerance:
    """Bounds for one candidate dtype: per weight tensor, ||g - g_oracle|| / ||g_oracle||, and the
    loss, |loss - loss_oracle| / max(1, |loss_oracle|)."""

    grad_rel_l2: float
    loss_rel: float


GRAD_TOLERANCES: dict[str, GradTolerance] = {
    # float32 against the float64 oracle: the rounding of one float32 pass, forward and backward
    # (~6e-8 per op, compounded over the layers and each softmax's backward). Measured, worst
    # weight over the four cases (transformers 5.24, torch 2.13, jax 0.10, tensorflow 2.21, CPU):
    # numpy 1.6e-6, torch 1.6e-6, jax 1.9e-6, tensorflow 1.7e-6 (the deepest layers' q/k
    # projections and Gemma 3's q/k norms); the median weight 5e-7 to 8e-7; losses within 1e-7.
    # 2e-5 is a 10x margin that a wrong term (off by O(1) of the tensor) still fails.
    "float32": GradTolerance(grad_rel_l2=2e-5, loss_rel=1e-6),
    # bfloat16: 8 mantissa bits, each op's output rounded (2**-9 relative), the backward's
    # cotangents and the stored gradients in bf16 too (torch, jax, tensorflow; the numpy face's
    # backward runs in float32 from its emulated bf16 forward, so it shows the forward's share).
    # Measured, worst weight over the four cases: numpy 3.1e-2, torch 3.6e-2, jax 3.7e-2,
    # tensorflow 3.3e-2 (Gemma 3's k norms, Gemma 2's last q/k projections: gradients that are
    # sums of many cancelling terms); the median weight 6e-3 to 2e-2; losses within 6e-4.
    # 0.1 is ~2.7x the worst measured; a wrong term still fails.
    "bfloat16": GradTolerance(grad_rel_l2=0.1, loss_rel=5e-3),
}


@dataclasses.dataclass(frozen=True)
class GradCase:
    """One gradient comparison: a preset with changes, a left-padded batch of `lengths`."""

    name: str
    rules: tuple[str, ...]
    preset: str
    lengths: tuple[int, ...]
    changes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    pad_logits: bool = False  # keep the first real token's label: a pad position's logit is read

    def config(self) -> GemmaConfig:
        return get_preset(self.preset).replace(**self.changes)

    def batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, mask, labels): labels are the ids, -100 at pads, at each padded row's first real
        token unless `pad_logits` (a pad position predicts it; see the module docstring), and at
        one more position of the first row (ignored labels inside a row)."""
        config = self.config()
        rng = np.random.default_rng(self.seed + 1)
        ids, mask = batch_ids([list(rng.integers(3, config.vocab_size, n)) for n in self.lengths],
                              config.pad_token_id)
        labels = np.where(mask == 1, ids, IGNORE_INDEX)
        padded = mask[:, 0] == 0
        if not self.pad_logits:
            labels[np.flatnonzero(padded), mask.argmax(1)[padded]] = IGNORE_INDEX
        labels[0, self.lengths[0] // 2] = IGNORE_INDEX
        return ids, mask, labels


GRAD_CASES: tuple[GradCase, ...] = (
    GradCase("grad-gemma1-mqa-padded", ("embedding scale, tied lm_head (two uses of one weight)",
                                        "MQA: one kv head's gradient summed over every query head"),
             "tiny-gemma", lengths=(12, 7)),
    GradCase("grad-gemma1-untied", ("untied lm_head",), "tiny-gemma", lengths=(9, 5), seed=2,
             changes={"tie_word_embeddings": False, "num_kv_heads": 2}),
    GradCase("grad-gemma2-binding-softcaps", ("attention softcap before the mask (binding: 0.5)",
                                              "final logit softcap", "four norms",
                                              "sliding window 8 < sequence"),
             "tiny-gemma2", lengths=(12, 6), changes={"attn_logit_softcap": 0.5,
                                                      "final_logit_softcap": 4.0}),
    GradCase("grad-gemma3-window-shorter-than-sequence", ("qk-norm", "five local then one global",
                                                          "sliding window 8 < sequence",
                                                          "per-layer rope theta"),
             "tiny-gemma3", lengths=(13, 9)),
    GradCase("grad-gemma3-pad-logits-read", ("a pad position's logit in the loss: its fully masked "
                                             "attention row (uniform softmax) and the frozen pad "
                                             "embedding row",),
             "tiny-gemma3", lengths=(11, 4, 7), seed=3, pad_logits=True),
)


def _model(case: GradCase, dtype: str) -> Model:
    """The case's model on the numpy backend in `dtype` (its weights rounded to it): the source
    the torch and jax faces copy from."""
    config = case.config()
    return Model(config, random_weights(config, case.seed), backend="numpy", dtype=dtype)


def numpy_grads(case: GradCase, dtype: str) -> Grads:
    """The reverse-mode runner computing in `dtype`."""
    config = case.config()
    return value_and_grad(config, random_weights(config, case.seed), *case.batch(), dtype=dtype)


def torch_grads(case: GradCase, dtype: str) -> Grads:
    """`as_module(model)` in `dtype`: its loss, backward, each Parameter's `.grad`."""
    import torch

    from backends.torch import as_module

    module = as_module(_model(case, dtype))
    ids, mask, labels = (torch.from_numpy(a) for a in case.batch())
    loss = module(ids, mask, labels).loss
    loss.backward()
    return float(loss.detach()), {name: p.grad.double().numpy() for name, p in module.named_parameters()}


def jax_grads(case: GradCase, dtype: str) -> Grads:
    """`jax.value_and_grad` of `as_function(model, dtype)`'s apply (jitted: one compiled step)."""
    import jax

    from backends.jax import as_function

    apply, params = as_function(_model(case, dtype), dtype)
    ids, mask, labels = case.batch()
    loss, grads = jax.jit(jax.value_and_grad(lambda p: apply(p, ids, mask, labels)["loss"]))(params)
    return float(loss), {name: np.asarray(g, np.float64) for name, g in grads.items()}


def tensorflow_grads(case: GradCase, dtype: str) -> Grads:
    """`tf.GradientTape` over the tensorflow op table bound to the cache-free graph, the weights
    as `tf.Variable`s in `dtype` (eager: each op as the table defines it)."""
    import tensorflow as tf

    from backends.tensorflow.ops import DTYPES, make_op_table

    config = case.config()
    graph = build_graph(config, "causal-lm", cache=False)
    weights = random_weights(config, case.seed)
    table = dict(make_op_table(dtype))
    embed = table["embed"]

    def frozen_pad_embed(ids: Any, weights: Any, *, scale: float) -> Any:
        rows = embed(ids, weights, scale=scale)  # the pad row frozen, as nn.Embedding(padding_idx)
        return tf.where((ids == config.pad_token_id)[..., None], tf.stop_gradient(rows), rows)

    table["embed"] = frozen_pad_embed
    variables = {n: tf.Variable(tf.constant(weights[n], DTYPES[dtype]), name=n.replace(".", "_"))
                 for n in graph.params}
    ids, mask, labels = case.batch()
    inputs, _ = step_inputs(ids, mask.astype(bool), None, windows=layer_kinds(config))
    env = {name: tf.constant(value) for name, value in inputs.items()}
    with tf.GradientTape() as tape:
        logits = run_bound(bind(graph, table, variables), env)["logits"]
        scores = tf.cast(logits[:, :-1], tf.float32)
        targets = labels[:, 1:]
        counted = targets != IGNORE_INDEX
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.constant(np.where(counted, targets, 0)), logits=scores)
        loss = tf.reduce_sum(tf.where(tf.constant(counted), ce, 0.0)) / max(int(counted.sum()), 1)
    names = list(variables)
    grads = tape.gradient(loss, [variables[n] for n in names])
    return float(loss), {n: np.asarray(tf.cast(tf.convert_to_tensor(g), tf.float64))
                         for n, g in zip(names, grads, strict=True)}


GRAD_FACES: dict[str, Callable[[GradCase, str], Grads]] = {
    "numpy": numpy_grads, "torch": torch_grads, "jax": jax_grads, "tensorflow": tensorflow_grads}

# (case name, dtype) -> the float64 oracle on the weights rounded to dtype
_ORACLES: dict[tuple[str, str], Grads] = {}


def oracle(case: GradCase, dtype: str) -> Grads:
    """The float64 VJP oracle's (loss, gradients) on the case's weights rounded to `dtype`."""
    key = (case.name, dtype)
    if key not in _ORACLES:
        config = case.config()
        rnd = make_rounder(dtype)
        weights = {n: rnd(w) for n, w in random_weights(config, case.seed).items()}
        _ORACLES[key] = value_and_grad(config, weights, *case.batch(), dtype="float64")
    return _ORACLES[key]


def relative_l2(ref: np.ndarray, cand: np.ndarray) -> float:
    """||cand - ref|| / ||ref|| (the absolute error where ref is all zero)."""
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(np.asarray(cand, np.float64) - ref))
    return num / den if den > 0 else num


class GradFailure(Exception):
    """A gradient cell outside its bounds."""


def run_grad_case(case: GradCase, face: Callable[[GradCase, str], Grads], dtype: str,
                  tol: GradTolerance) -> str:
    """The face's loss and every weight's gradient against the oracle; a summary, or raises
    GradFailure naming the weights out of bounds."""
    ref_loss, ref = oracle(case, dtype)
    loss, grads = face(case, dtype)
    if set(grads) != set(ref):
        raise GradFailure(f"gradients for {sorted(set(grads) ^ set(ref))} differ between the face "
                          f"and the oracle (face has {len(grads)}, oracle {len(ref)})")
    loss_err = abs(loss - ref_loss) / max(1.0, abs(ref_loss))
    errors = {name: relative_l2(ref[name], grads[name]) for name in ref}
    if not all(np.isfinite(g).all() for g in grads.values()):
        raise GradFailure("non-finite gradients: "
                          + ", ".join(n for n, g in grads.items() if not np.isfinite(g).all()))
    bad = sorted((e, n) for n, e in errors.items() if not e <= tol.grad_rel_l2)
    if bad:
        listed = "; ".join(f"{n} {e:.2e}" for e, n in bad[-4:][::-1])
        raise GradFailure(f"{len(bad)} of {len(errors)} gradients over rel L2 {tol.grad_rel_l2:g}: {listed}")
    if not loss_err <= tol.loss_rel:
        raise GradFailure(f"loss {loss:.8g} vs oracle {ref_loss:.8g} (rel {loss_err:.2e} > {tol.loss_rel:g})")
    worst = max(errors, key=errors.__getitem__)
    return (f"{len(errors)} gradients within rel L2 {tol.grad_rel_l2:g}; worst {errors[worst]:.2e} "
            f"({worst}); median {float(np.median(list(errors.values()))):.2e}; loss rel {loss_err:.1e}")


def _grad_cell(case: GradCase, name: str, dtype: str) -> Result:
    try:
        return Result(case.name, name, dtype, "pass",
                      run_grad_case(case, GRAD_FACES[name], dtype, GRAD_TOLERANCES[dtype]))
    except GradFailure as e:
        return Result(case.name, name, dtype, "fail", str(e))
    except Exception as e:  # a crash in a backend is a failure of that cell, not of the run
        return Result(case.name, name, dtype, "fail", f"{type(e).__name__}: {e}")


def grad_case_names() -> list[str]:
    """The names `run_grad_conformance(cases=...)` accepts."""
    return [c.name for c in GRAD_CASES]


def run_grad_conformance(backends: Sequence[str] | None = None,
                         dtypes: Sequence[str] = ("float32", "bfloat16"),
                         cases: Sequence[str] | None = None) -> list[Result]:
    """The gradient matrix: case x backend x dtype, each cell a `conformance.runner.Result`.
    Backends named explicitly must load (else a failed `load` cell); by default every backend
    with a gradient face (`GRAD_FACES`) is tried and one not installed is skipped. A backend
    without a gradient face, or a dtype it does not offer, is a skip; a dtype with no entry in
    `GRAD_TOLERANCES` or an unknown case name raises `ConfigError`."""
    unknown = sorted(set(dtypes) - set(GRAD_TOLERANCES))
    if unknown:
        raise ConfigError(f"dtype: no gradient tolerance for {unknown} (known: {', '.join(GRAD_TOLERANCES)})")
    wanted = GRAD_CASES if cases is None else tuple(c for c in GRAD_CASES if c.name in set(cases))
    missing = sorted(set(cases or ()) - set(grad_case_names()))
    if missing:
        raise ConfigError(f"cases: unknown gradient case {', '.join(map(repr, missing))} "
                          f"(known: {', '.join(grad_case_names())})")
    explicit = backends is not None
    results: list[Result] = []
    for name in list(backends) if backends is not None else list(GRAD_FACES):
        try:
            backend = get_backend(name)
        except BackendError as e:
            results.append(Result("load", name, "-", "fail" if explicit else "skip", str(e)))
            continue
        if name not in GRAD_FACES:
            results.append(Result("grad-*", name, "-", "skip",
                                  f"no gradient face for {name!r} (faces: {', '.join(GRAD_FACES)})"))
            continue
        for dtype in dtypes:
            if dtype not in backend.dtypes:
                results.append(Result("grad-*", name, dtype, "skip", f"not supported: {dtype}"))
                continue
            results.extend(_grad_cell(case, name, dtype) for case in wanted)
    return results


__all__ = ["GRAD_CASES", "GRAD_FACES", "GRAD_TOLERANCES", "GradCase", "GradTolerance", "oracle",
           "run_grad_case", "run_grad_conformance"]
