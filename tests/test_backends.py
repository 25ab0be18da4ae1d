"""Every installed backend besides the reference: the conformance matrix, transformers on the
same weights, and generation equal to the reference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from conftest import EXHAUSTIVE
from hf_reference import hf_forward, hf_model

import gemma_core
from conformance import MODEL_CASES, OP_CASES, run_conformance
from conformance.runner import ALWAYS_RUN, Result
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights

BACKENDS = [b for b in gemma_core.installed_backends() if b not in ("numpy", "array_api")]
# (array_api runs the catalogue in tests/test_array_api_backend.py)

# XLA compiles each model case's three step shapes (prefill, decode, the full forward) anew,
# ~4 s each on TensorFlow, so in bf16/fp16 these backends run by default the model cases whose
# rules have a dtype side: the rounding points of each architecture (embedding scale, norms,
# RoPE tables, softcaps, masks and caches in the compute dtype), 4-bit codes dequantised in the
# compute dtype (int4 with the int8 embedding as LM head, nf4), and the task heads. The others
# prove dtype-free rules (head mapping, window, ring wrap, fusion within a scheme) that float32
# proves on the same code path; GEMMA_EXHAUSTIVE=1 runs them too. torch runs eagerly: the full
# catalogue costs it little, and its bf16 int8/int4 kernels differ by case.
PER_CASE_COMPILE = ("jax", "tensorflow")
NARROW_MODEL_CASES = ("gemma1-mqa-padded", "gemma2-binding-softcaps", "gemma3-local-global-rope",
                      "gemma2-int4-int8-embedding", "gemma3-nf4-float-embedding",
                      "gemma1-int4-untied",  # fp16's only 4-bit case (Gemma 2/3 are refused)
                      "gemma2-sequence-classification", "gemma1-token-classification",
                      "gemma3-base-hidden-states")


def _check_matrix(results: list[Result], dtype: str, cases: list[str] | None) -> None:
    lacking = [r for r in results if r.case == "*" and r.status == "skip"]
    if lacking:
        pytest.skip(lacking[0].detail)  # a dtype or device the backend does not declare
    failed = [r for r in results if r.status == "fail"]
    assert not failed, failed
    passed = {r.case for r in results if r.status == "pass" and r.dtype == dtype}
    if dtype == "float32":  # every backend's dtype: the whole catalogue runs
        assert len(passed) >= 25, sorted(passed)
    # every op case, and every model case asked for that runs in this dtype and is not a gap
    # the backend declares, passed (a declared skip names its reason; nothing else is skipped)
    skipped = {r.case for r in results if r.status == "skip"}
    wanted = [c for c in MODEL_CASES if (cases is None or c.name in cases)
              and (not c.dtypes or dtype in c.dtypes)]
    assert {c.name for c in OP_CASES} <= passed | skipped
    assert {c.name for c in wanted} <= passed | skipped
    assert passed, results


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conformance(backend: str, dtype: str) -> None:
    cases = None
    if dtype != "float32" and backend in PER_CASE_COMPILE and not EXHAUSTIVE:
        cases = [*ALWAYS_RUN, *(c.name for c in OP_CASES), *NARROW_MODEL_CASES]
    _check_matrix(run_conformance([backend], (dtype,), cases), dtype, cases)


@pytest.mark.slow
@pytest.mark.skipif(not EXHAUSTIVE, reason="exhaustive sweep: set GEMMA_EXHAUSTIVE=1")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in PER_CASE_COMPILE])
def test_narrow_dtype_model_cases_left_out_by_default(backend: str, dtype: str) -> None:
    rest = [c.name for c in MODEL_CASES if c.name not in NARROW_MODEL_CASES]
    _check_matrix(run_conformance([backend], (dtype,), rest), dtype, rest)


@pytest.fixture(scope="module")
def hf_logits() -> Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """transformers' logits on a preset's random weights (seed 4) for one padded batch, run once
    per preset and shared by every backend's comparison."""
    held: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def run(preset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if preset not in held:
            ids, mask = gemma_core.batch_ids([list(range(3, 23)), list(range(30, 39))])
            ref, _ = hf_forward(hf_model(_config(preset), seed=4), ids, mask)
            held[preset] = ids, mask, ref
        return held[preset]

    return run


def _config(preset: str) -> gemma_core.GemmaConfig:
    return get_preset(preset).replace(**({"attn_logit_softcap": 0.5} if preset == "tiny-gemma2" else {}))


@pytest.mark.transformers
@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(backend: str, preset: str, hf_logits) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("transformers")
    config = _config(preset)
    model = gemma_core.Model(config, random_weights(config, 4), backend=backend)
    ids, mask, ref = hf_logits(preset)
    ours = model.to_numpy(model.forward(ids, mask).logits)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4 * ref[real].std()


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_equals_the_reference(backend: str) -> None:
    ours = gemma_core.load("tiny-gemma3", backend=backend, tie_word_embeddings=False)
    ref = gemma_core.load("tiny-gemma3", tie_word_embeddings=False)
    prompts = [[2, 10, 20, 30], [2, 11]]
    kw = {"max_new_tokens": 8, "eos_token_ids": []}
    assert ours.generate(prompts, **kw).token_ids == ref.generate(prompts, **kw).token_ids
    sampled = {"temperature": 0.9, "top_k": 20, "seed": 3, **kw}
    assert ours.generate(prompts, **sampled).token_ids == ours.generate(prompts, **sampled).token_ids
