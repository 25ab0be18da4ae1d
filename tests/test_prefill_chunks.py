"""Chunked prefill (`Model.prefill_chunk_size`): a long prompt runs as consecutive steps of the
chunk, with the logits and the valid cache slots of one step, and masks bounded by the chunk."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gemma_core
from gemma_core.masks import layer_kinds, mask_name

BACKENDS = [b for b in gemma_core.installed_backends() if b != "array_api"]


def _prompt(model: gemma_core.Model, t: int = 64) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (2, t))
    mask = np.ones_like(ids)
    mask[1, :37] = 0  # a left-padded row, its first chunks all padding
    return ids, mask


def _valid_slots(cache: Any, model: gemma_core.Model) -> list[np.ndarray]:
    """Each layer's keys and values at the slots holding real tokens, in token order."""
    state = model.export_cache(cache)
    out = []
    for keys, values, real in zip(state.keys, state.values, state.real, strict=True):
        for array in (keys, values):  # [B, K, S, H] -> [real slots, K, H]
            out.append(np.asarray(array, np.float32).transpose(0, 2, 1, 3)[real])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_equals_one_step(backend: str) -> None:
    model = gemma_core.load("tiny-gemma3", backend=backend, tie_word_embeddings=False)
    ids, mask = _prompt(model)
    model.prefill_chunk_size = None
    whole = model.forward(ids, mask, model.new_cache(2, 128), last_only=True)
    model.prefill_chunk_size = 16  # 4 chunks (generate below: a remainder); the window is 8
    parts = model.forward(ids, mask, model.new_cache(2, 128), last_only=True)
    ref = model.to_numpy(whole.logits)
    np.testing.assert_allclose(model.to_numpy(parts.logits), ref, atol=1e-5 * np.abs(ref).max())
    assert parts.cache.length == whole.cache.length == 64
    assert (parts.cache.seen == whole.cache.seen).all() and (parts.cache.valid == whole.cache.valid).all()
    for a, b in zip(_valid_slots(parts.cache, model), _valid_slots(whole.cache, model), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, np.abs(b).max()))
    # and decoding on goes on identically from either cache
    nxt = np.array([[5], [6]])
    a = model.forward(nxt, None, parts.cache, last_only=True).logits
    b = model.forward(nxt, None, whole.cache, last_only=True).logits
    np.testing.assert_allclose(model.to_numpy(a), model.to_numpy(b), atol=1e-5 * np.abs(ref).max())


def test_masks_are_bounded_by_the_chunk() -> None:
    model = gemma_core.load("tiny-gemma3", tie_word_embeddings=False)
    ids, mask = _prompt(model)
    seen: list[tuple[int, ...]] = []
    step = model._step

    def spy(weights: Any, env: dict[str, Any]) -> dict[str, Any]:
        seen.extend(tuple(env[mask_name(w)].shape) for w in layer_kinds(model.config))
        return step(weights, env)

    model._step = spy
    model.prefill_chunk_size = 16
    model.forward(ids, mask, model.new_cache(2, 128), last_only=True)
    assert seen and max(s[2] for s in seen) == 16  # queries per step
    window = model.config.sliding_window
    # the sliding layers' keys: the ring plus the chunk, never the prompt
    assert max(s[3] for s in seen if s[3] != 128) <= window + 16


def test_generate_and_a_spent_cache_with_chunks() -> None:
    model = gemma_core.load("tiny-gemma3", tie_word_embeddings=False)
    ids, mask = _prompt(model, 60)
    prompts = [list(ids[0]), list(ids[1][37:])]
    kw = {"max_new_tokens": 6, "eos_token_ids": []}
    model.prefill_chunk_size = None
    whole = model.generate(prompts, **kw).token_ids
    model.prefill_chunk_size = 8
    assert model.generate(prompts, **kw).token_ids == whole
    for dynamic in (False, True):  # a dynamic cache of 4 slots grows once, then takes the chunks
        cache = model.new_cache(2, 4 if dynamic else 80, dynamic=dynamic)
        model.forward(ids, mask, cache, last_only=True, donate_cache=True)
        with pytest.raises(gemma_core.InputError, match="donate_cache=True"):
            model.forward(ids[:, :1], None, cache)
    for dynamic in (False, True):  # not donated: left exactly as it was
        kept = model.forward(ids[:, :5], None, model.new_cache(2, 8 if dynamic else 80,
                                                               dynamic=dynamic)).cache
        before = model.export_cache(kept)
        model.forward(ids, mask, kept, last_only=True)
        after = model.export_cache(kept)
        assert after.length == before.length == 5
        for a, b in zip((*after.keys, *after.values), (*before.keys, *before.values), strict=True):
            np.testing.assert_array_equal(a, b)
    for bad in (0, -3, True, 2.5, "512"):
        with pytest.raises(gemma_core.ConfigError, match="prefill_chunk_size"):
            model.prefill_chunk_size = bad  # type: ignore[assignment]
    assert model.prefill_chunk_size == 8  # a refused value leaves the setting as it was
