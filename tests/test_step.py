"""The step inputs rule (gemma_core.step): literal expectations, the same rule under jax tracing,
and Model.forward built on it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gemma_core
from gemma_core import masks
from gemma_core.graph import GRAPH_INPUTS, cache_name
from gemma_core.step import Bookkeeping, step_inputs

F, T = False, True


def _after_prefix() -> Bookkeeping:
    # row 0 had one left pad then two tokens; row 1 three tokens; 8 slots
    valid = np.array([[F, T, T, F, F, F, F, F], [T, T, T, F, F, F, F, F]])
    return Bookkeeping(length=3, valid=valid, seen=np.array([2, 3]))


def test_step_inputs_left_padding_after_a_non_empty_cache() -> None:
    book = _after_prefix()
    before = book.valid.copy()
    ids = np.array([[0, 7, 8], [4, 5, 6]])
    mask = np.array([[F, T, T], [T, T, T]])
    inputs, after = step_inputs(ids, mask, book, windows=(None, 2))
    assert tuple(inputs) == (*GRAPH_INPUTS, "mask[global]", "mask[window=2]")
    np.testing.assert_array_equal(inputs["ids"], ids)
    np.testing.assert_array_equal(inputs["positions"], [[0, 2, 3], [3, 4, 5]])  # 0 at the pad
    np.testing.assert_array_equal(inputs["query_slots"], [3, 4, 5])  # pads take slots too
    np.testing.assert_array_equal(inputs["logit_index"], [0, 1, 2])
    assert after.length == 6 and after.max_length == 8
    np.testing.assert_array_equal(after.seen, [4, 6])
    np.testing.assert_array_equal(after.valid, [[F, T, T, F, T, T, F, F], [T, T, T, T, T, T, F, F]])
    np.testing.assert_array_equal(book.valid, before)  # the cache's bookkeeping is left as it was
    # global: written first, the 8-slot buffer read (slots 0..5 held); pads invisible
    np.testing.assert_array_equal(inputs["mask[global]"][:, 0], [
        [[F, T, T, F, F, F, F, F], [F, T, T, F, T, F, F, F], [F, T, T, F, T, T, F, F]],
        [[T, T, T, T, F, F, F, F], [T, T, T, T, T, F, F, F], [T, T, T, T, T, T, F, F]]])
    # a ring of 2 the chunk wraps: the ring as it was (slots 2, 1), then the new slots 3, 4, 5;
    # each query sees itself and the slot before it
    np.testing.assert_array_equal(inputs["mask[window=2]"][:, 0], [
        [[T, F, F, F, F], [F, F, F, T, F], [F, F, F, T, T]],
        [[T, F, T, F, F], [F, F, T, T, F], [F, F, F, T, T]]])  # the cache's bookkeeping is left as it was
    last, _ = step_inputs(ids, mask, book, last_only=True)
    np.testing.assert_array_equal(last["logit_index"], [2])


def test_step_inputs_without_a_cache() -> None:
    mask = np.array([[F, F, T, T], [T, T, T, T]])
    inputs, after = step_inputs(np.zeros((2, 4), np.int64), mask, windows=(None, 2))
    np.testing.assert_array_equal(inputs["positions"], [[0, 0, 0, 1], [0, 1, 2, 3]])
    np.testing.assert_array_equal(inputs["query_slots"], [0, 1, 2, 3])
    np.testing.assert_array_equal(after.valid, mask)
    causal = np.tril(np.ones((4, 4), bool))
    np.testing.assert_array_equal(inputs["mask[global]"][:, 0], causal[None] & mask[:, None, :])
    np.testing.assert_array_equal(inputs["mask[window=2]"][:, 0], (causal & ~np.tril(causal, -2))[None]
                                  & mask[:, None, :])
    assert after.length == 4
    np.testing.assert_array_equal(after.seen, [2, 4])


def test_step_inputs_in_jax_equal_numpy_and_trace() -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    book = _after_prefix()
    ids, mask = np.array([[9], [9]]), np.array([[T], [T]])
    expected, after = step_inputs(ids, mask, book, last_only=True, windows=(None, 2))

    @jax.jit
    def traced(length: jax.Array, valid: jax.Array, seen: jax.Array) -> tuple[dict[str, Any], Bookkeeping]:
        return step_inputs(jnp.asarray(ids), jnp.asarray(mask), Bookkeeping(length, valid, seen),
                           last_only=True, windows=(None, 2), xp=jnp)

    got, got_after = traced(jnp.asarray(book.length), jnp.asarray(book.valid), jnp.asarray(book.seen))
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(np.asarray(got[name]), expected[name], err_msg=name)
    assert int(got_after.length) == after.length == 4
    np.testing.assert_array_equal(np.asarray(got_after.seen), after.seen)
    np.testing.assert_array_equal(np.asarray(got_after.valid), after.valid)


def _hand_env(model: gemma_core.Model, ids: np.ndarray, mask: np.ndarray,
              cache: gemma_core.KVCache) -> dict[str, object]:
    """The step inputs as Model.forward assembled them by hand before gemma_core.step."""
    t, start = ids.shape[1], cache.length
    valid = cache.valid.copy()
    valid[:, start:start + t] = mask
    positions = np.where(mask, cache.seen[:, None] + np.cumsum(mask, axis=1) - 1, 0)
    slots = np.arange(start, start + t)
    env: dict[str, object] = {"ids": ids, "positions": positions, "query_slots": slots,
                              "logit_index": np.arange(t)}
    for window in masks.layer_kinds(model.config):
        keys = masks.key_slots(start, t, masks.capacity(window, cache.max_length), window)
        env[masks.mask_name(window)] = masks.attention_mask(keys, slots, valid, window)
    env.update({cache_name(i): layer for i, layer in enumerate(model.copy_cache(cache).layers)})
    return env


def test_forward_equals_the_hand_assembled_step() -> None:
    model = gemma_core.load("tiny-gemma3", seed=1)
    ids, mask = gemma_core.batch_ids([[2, 5, 6, 7, 8], [2, 9, 10]])
    mask = mask.astype(bool)
    prefix = model.forward(ids, mask, max_length=12)
    more = np.array([[11, 12], [0, 13]])
    more_mask = np.array([[T, T], [F, T]])
    ours = model.forward(more, more_mask, prefix.cache)
    hand = model._step(model.weights, _hand_env(model, more, more_mask, prefix.cache))
    np.testing.assert_array_equal(model.to_numpy(ours.logits), model.to_numpy(hand["logits"]))
    np.testing.assert_array_equal(ours.cache.seen, [7, 4])
    assert ours.cache.length == 7
