"""The KV-cache contract: static slots, sliding ring buffers, export layout, decode == full forward."""

from __future__ import annotations

import numpy as np
import pytest

import gemma_core
from gemma_core.cache import layer_capacity, ring_order
from gemma_core.config import AttentionKind
from gemma_core.errors import InputError
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights


def test_ring_order_literal() -> None:
    np.testing.assert_array_equal(ring_order(3, 4), [0, 1, 2])
    np.testing.assert_array_equal(ring_order(4, 4), [0, 1, 2, 3])
    np.testing.assert_array_equal(ring_order(6, 4), [2, 3, 0, 1])
    np.testing.assert_array_equal(ring_order(0, 4), [])


def test_layer_capacity() -> None:
    c = get_preset("tiny-gemma3")  # window 8, globals at layer 5
    assert layer_capacity(c, 0, 100) == 8
    assert layer_capacity(c, 0, 5) == 5
    assert layer_capacity(c, 5, 100) == 100


@pytest.fixture(scope="module")
def g3() -> gemma_core.Model:
    return gemma_core.load("tiny-gemma3", seed=4)


def _decode_one_by_one(model: gemma_core.Model, ids: np.ndarray, prefill: int):  # type: ignore[no-untyped-def]
    out = model.forward(ids[:, :prefill], max_length=ids.shape[1])
    logits, cache = [out.logits], out.cache
    for t in range(prefill, ids.shape[1]):
        out = model.forward(ids[:, t:t + 1], cache=cache)
        logits.append(out.logits)
        cache = out.cache
    return np.concatenate(logits, axis=1), cache


def test_decode_2w_tokens_equals_full_forward(g3: gemma_core.Model) -> None:
    window = g3.config.sliding_window
    assert window is not None
    ids = np.random.default_rng(0).integers(3, 512, (2, 3 * window))
    full = g3.forward(ids)
    inc, cache = _decode_one_by_one(g3, ids, prefill=3)
    assert np.abs(inc - full.logits).max() <= 5e-5 * full.logits.std()
    a, b = g3.export_cache(cache), g3.export_cache(full.cache)
    for layer in range(g3.config.num_layers):
        np.testing.assert_allclose(a.keys[layer], b.keys[layer], atol=1e-5)
        np.testing.assert_allclose(a.values[layer], b.values[layer], atol=1e-5)


def test_sliding_layer_keeps_the_last_w_keys() -> None:
    """Layer 0's keys depend only on the embeddings (Gemma 2: one RoPE theta for all layers), so
    a copy of the model whose layer 0 is global gives the unwindowed keys; the sliding export
    must be their last W."""
    g2 = gemma_core.load("tiny-gemma2", seed=4)
    c = g2.config
    window = c.sliding_window
    assert window is not None
    types = (AttentionKind.GLOBAL, *c.layer_types[1:])
    unwindowed = gemma_core.Model(c.replace(layer_types=types), random_weights(c, 4))
    ids = np.random.default_rng(1).integers(3, 512, (1, 2 * window + 3))
    _, cache = _decode_one_by_one(g2, ids, prefill=2)
    ours = g2.export_cache(cache)
    ref = unwindowed.export_cache(unwindowed.forward(ids).cache)
    assert ours.keys[0].shape == (1, c.num_kv_heads, window, c.head_dim)
    assert ref.keys[0].shape[2] == ids.shape[1]
    np.testing.assert_allclose(ours.keys[0], ref.keys[0][:, :, -window:], atol=1e-5)
    np.testing.assert_allclose(ours.values[0], ref.values[0][:, :, -window:], atol=1e-5)
    assert ours.keys[1].shape[2] == ids.shape[1]  # a global layer keeps everything
    assert ours.length == ids.shape[1]


def test_prefill_longer_than_window_into_ring(g3: gemma_core.Model) -> None:
    ids = np.random.default_rng(2).integers(3, 512, (1, 19))
    out = g3.forward(ids, max_length=25)
    nxt = np.array([[7]])
    step = g3.forward(nxt, cache=out.cache).logits
    full = g3.forward(np.concatenate([ids, nxt], axis=1)).logits[:, -1:]
    assert np.abs(step - full).max() <= 5e-5 * full.std()


def test_cache_bookkeeping_with_left_padding(g3: gemma_core.Model) -> None:
    ids, mask = gemma_core.batch_ids([[5, 6, 7, 8], [9, 10]])
    out = g3.forward(ids, mask, max_length=6)
    assert out.cache.length == 4
    np.testing.assert_array_equal(out.cache.seen, [4, 2])
    np.testing.assert_array_equal(out.cache.valid[:, :4], mask.astype(bool))


def test_cache_overflow_and_batch_mismatch_raise(g3: gemma_core.Model) -> None:
    out = g3.forward(np.array([[5, 6, 7]]), max_length=4)
    g3.forward(np.array([[8]]), cache=out.cache)
    with pytest.raises(InputError, match="max_length 4"):
        g3.forward(np.array([[8, 9]]), cache=out.cache)
    with pytest.raises(InputError, match="batch of 2 rows"):
        g3.forward(np.array([[8], [9]]), cache=out.cache)


def test_last_only_logits(g3: gemma_core.Model) -> None:
    ids = np.array([[5, 6, 7]])
    out = g3.forward(ids, last_only=True)
    assert out.logits.shape == (1, 1, 512)
    np.testing.assert_allclose(out.logits[0, 0], g3.forward(ids).logits[0, -1], atol=1e-6)
