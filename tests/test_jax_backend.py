"""The JAX backend: conformance with the reference, transformers on the same weights, a jitted
step with the cache donated, and generation equal to the reference."""

from __future__ import annotations

import numpy as np
import pytest
from hf_reference import hf_forward, hf_model

import gemma_core
from conformance import run_conformance
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights

jax = pytest.importorskip("jax")


def test_conformance_float32_bfloat16_float16() -> None:
    results = run_conformance(["jax"], ("float32", "bfloat16", "float16"))
    failed = [r for r in results if r.status == "fail"]
    assert not failed, failed
    assert sum(r.status == "pass" for r in results) >= 30


@pytest.mark.transformers
@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_logits_match_transformers(preset: str) -> None:
    config = get_preset(preset).replace(**({"attn_logit_softcap": 0.5} if preset == "tiny-gemma2" else {}))
    model = gemma_core.Model(config, random_weights(config, 4), backend="jax")
    ids, mask = gemma_core.batch_ids([list(range(3, 23)), list(range(30, 39))])
    ref, _ = hf_forward(hf_model(config, seed=4), ids, mask)
    ours = model.to_numpy(model.forward(ids, mask).logits)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4 * ref[real].std()


def test_jitted_decode_does_not_retrace_and_donates_the_cache() -> None:
    model = gemma_core.load("tiny-gemma3", backend="jax")
    out = model.forward(np.array([[2, 5, 6, 7]]), max_length=16, last_only=True)
    cache = out.cache
    traces = model._step.jitted._cache_size()  # type: ignore[attr-defined]
    for token in range(8, 18):
        old = cache.layers[0][0]
        cache = model.forward(np.array([[token]]), cache=cache, last_only=True).cache
        assert old.is_deleted()  # donated: XLA reused the buffer for the update
    assert model._step.jitted._cache_size() == traces + 1  # type: ignore[attr-defined]  # one decode trace


def test_eager_equals_jit_and_generation_equals_numpy() -> None:
    jitted = gemma_core.load("tiny-gemma3", backend="jax", tie_word_embeddings=False)
    eager = gemma_core.load("tiny-gemma3", backend="jax", compile=False, tie_word_embeddings=False)
    ref = gemma_core.load("tiny-gemma3", tie_word_embeddings=False)
    ids = np.array([[2, 5, 6, 7, 8]])
    np.testing.assert_allclose(jitted.to_numpy(jitted.forward(ids).logits),
                               eager.to_numpy(eager.forward(ids).logits), atol=1e-5)
    prompts = [[2, 10, 20, 30], [2, 11]]
    kw = {"max_new_tokens": 8, "eos_token_ids": []}
    assert jitted.generate(prompts, **kw).token_ids == ref.generate(prompts, **kw).token_ids
