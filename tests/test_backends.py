"""Every installed backend besides the reference: the conformance matrix, transformers on the
same weights, and generation equal to the reference."""

from __future__ import annotations

import numpy as np
import pytest
from hf_reference import hf_forward, hf_model

import gemma_core
from conformance import run_conformance
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights

pytestmark = pytest.mark.parametrize(
    "backend", [b for b in gemma_core.installed_backends() if b not in ("numpy", "array_api")])
# (array_api runs the catalogue in tests/test_array_api_backend.py)


def test_conformance_float32_bfloat16_float16(backend: str) -> None:
    results = run_conformance([backend], ("float32", "bfloat16", "float16"))
    failed = [r for r in results if r.status == "fail"]
    assert not failed, failed
    # float32 is every backend's; bfloat16/float16 are skipped where a backend lacks them (array_api)
    assert sum(r.status == "pass" for r in results if r.dtype == "float32") >= 25


@pytest.mark.transformers
@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_logits_match_transformers(backend: str, preset: str) -> None:
    pytest.importorskip("transformers")
    config = get_preset(preset).replace(**({"attn_logit_softcap": 0.5} if preset == "tiny-gemma2" else {}))
    model = gemma_core.Model(config, random_weights(config, 4), backend=backend)
    ids, mask = gemma_core.batch_ids([list(range(3, 23)), list(range(30, 39))])
    ref, _ = hf_forward(hf_model(config, seed=4), ids, mask)
    ours = model.to_numpy(model.forward(ids, mask).logits)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4 * ref[real].std()


def test_generation_equals_the_reference(backend: str) -> None:
    ours = gemma_core.load("tiny-gemma3", backend=backend, tie_word_embeddings=False)
    ref = gemma_core.load("tiny-gemma3", tie_word_embeddings=False)
    prompts = [[2, 10, 20, 30], [2, 11]]
    kw = {"max_new_tokens": 8, "eos_token_ids": []}
    assert ours.generate(prompts, **kw).token_ids == ref.generate(prompts, **kw).token_ids
    sampled = {"temperature": 0.9, "top_k": 20, "seed": 3, **kw}
    assert ours.generate(prompts, **sampled).token_ids == ours.generate(prompts, **sampled).token_ids
