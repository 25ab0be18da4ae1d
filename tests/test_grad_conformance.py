"""Gradient conformance (`conformance.grad`): torch, jax and tensorflow training gradients against the
float64 NumPy oracle in float32 and bfloat16, per weight, within `GRAD_TOLERANCES`; and the suite's
own behaviour (a wrong gradient fails, unknown names are refused, the CLI flag)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from backends.numpy.vjp import value_and_grad
from conformance.grad import (
    GRAD_CASES,
    GRAD_TOLERANCES,
    GradCase,
    GradFailure,
    run_grad_case,
    run_grad_conformance,
)
from gemma_core.errors import ConfigError
from gemma_core.weights import random_weights

CASES = [c.name for c in GRAD_CASES]
# jax compiles one value-and-grad per case and dtype (2-8 s each on two shared cores): the
# softcap and pad-logit cases run by default, the rest of its matrix is slow
JAX_FAST = ("grad-gemma2-binding-softcaps", "grad-gemma3-pad-logits-read")


def _assert_all_pass(backend: str, dtype: str, cases: list[str] | None = None) -> None:
    pytest.importorskip({"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}.get(backend, "numpy"))
    results = run_grad_conformance([backend], [dtype], cases)
    assert [r.case for r in results] == (cases or CASES)
    failed = [f"{r.case}: {r.detail}" for r in results if r.status != "pass"]
    assert not failed, failed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["numpy", "torch", "tensorflow"])
def test_backend_gradients_conform(backend: str, dtype: str) -> None:
    _assert_all_pass(backend, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_gradients_conform(dtype: str) -> None:
    _assert_all_pass("jax", dtype, list(JAX_FAST))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_gradients_conform_every_case(dtype: str) -> None:
    _assert_all_pass("jax", dtype, [c for c in CASES if c not in JAX_FAST])


def _case(name: str) -> GradCase:
    return next(c for c in GRAD_CASES if c.name == name)


def test_a_face_without_the_frozen_pad_row_fails() -> None:
    """A face whose embedding lookup feeds the pad row (a plain gather, as the torch and jax faces
    did before they followed transformers' padding_idx) fails the case that reads a pad logit, on
    the embedding alone."""
    case = _case("grad-gemma3-pad-logits-read")

    def gather_face(c: GradCase, dtype: str) -> tuple[float, dict[str, np.ndarray]]:
        config = c.config()
        return value_and_grad(config, random_weights(config, c.seed), *c.batch(), dtype=dtype,
                              freeze_pad_row=False)

    with pytest.raises(GradFailure, match=r"1 of 80 gradients .*model\.embed_tokens\.weight"):
        run_grad_case(case, gather_face, "float32", GRAD_TOLERANCES["float32"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_gradient_off_by_a_wrong_term_fails(dtype: str) -> None:
    """One weight's gradient off by 3x its dtype's bound (in a random direction) fails, naming it."""
    case = _case("grad-gemma1-mqa-padded")
    bound = GRAD_TOLERANCES[dtype].grad_rel_l2
    victim = "model.layers.1.mlp.down_proj.weight"

    def skewed(c: GradCase, d: str) -> tuple[float, dict[str, np.ndarray]]:
        config = c.config()
        loss, grads = value_and_grad(config, random_weights(config, c.seed), *c.batch(), dtype="float64")
        noise = np.random.default_rng(0).standard_normal(grads[victim].shape)
        noise *= 3 * bound * np.linalg.norm(grads[victim]) / np.linalg.norm(noise)
        grads[victim] = grads[victim] + noise
        return loss, grads

    with pytest.raises(GradFailure, match=victim):
        run_grad_case(case, skewed, dtype, GRAD_TOLERANCES[dtype])


def test_the_oracle_passes_itself_and_the_loss_is_checked() -> None:
    case = _case("grad-gemma1-untied")

    def oracle_face(c: GradCase, dtype: str) -> tuple[float, dict[str, np.ndarray]]:
        config = c.config()
        return value_and_grad(config, random_weights(config, c.seed), *c.batch(), dtype="float64")

    assert "21 gradients within" in run_grad_case(case, oracle_face, "float32", GRAD_TOLERANCES["float32"])
    tight = dataclasses.replace(GRAD_TOLERANCES["float32"], loss_rel=0.0)

    def off_loss(c: GradCase, dtype: str) -> tuple[float, dict[str, np.ndarray]]:
        loss, grads = oracle_face(c, dtype)
        return loss * (1 + 1e-9), grads

    with pytest.raises(GradFailure, match="loss"):
        run_grad_case(case, off_loss, "float32", tight)


def test_unknown_names_are_refused_or_skipped() -> None:
    with pytest.raises(ConfigError, match="float16"):
        run_grad_conformance(["numpy"], ["float16"])
    with pytest.raises(ConfigError, match="nope"):
        run_grad_conformance(["numpy"], ["float32"], ["nope"])
    (result,) = run_grad_conformance(["array_api"], ["float32"])
    assert result.status == "skip" and "no gradient face" in result.detail
    (result,) = run_grad_conformance(["no-such-backend"], ["float32"])
    assert result.case == "load" and result.status == "fail"


def test_cli_grad_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from gemma_core.cli import main

    assert main(["conformance", "--grad", "--backends", "numpy", "--dtypes", "float32",
                 "--cases", "grad-gemma1-untied"]) == 0
    out = capsys.readouterr().out
    assert "grad-gemma1-untied" in out and "1 passed, 0 failed, 0 skipped" in out
