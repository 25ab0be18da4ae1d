"""The public API of `gemma_core.load` / `Model`, and its errors for bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gemma_core
from gemma_core.errors import BackendError, CheckpointError, ConfigError, InputError
from gemma_core.model import Float16OverflowWarning


@pytest.fixture(scope="module")
def g1() -> gemma_core.Model:
    return gemma_core.load("tiny-gemma")


def test_forward_shapes_and_dtype(g1: gemma_core.Model) -> None:
    out = g1.forward(np.array([[2, 5, 6]]))
    assert out.logits.shape == (1, 3, 512)
    assert out.logits.dtype == np.float32
    assert g1.to_numpy(out.logits).dtype == np.float32


def test_bf16_model_returns_float32_numpy() -> None:
    model = gemma_core.load("tiny-gemma3", dtype="bfloat16")
    logits = model.to_numpy(model.forward(np.array([[2, 5]])).logits)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits, logits.astype("bfloat16").astype(np.float32))


def test_preset_seed_is_reproducible() -> None:
    a = gemma_core.load("tiny-gemma", seed=1).forward(np.array([[4, 5]])).logits
    b = gemma_core.load("tiny-gemma", seed=1).forward(np.array([[4, 5]])).logits
    c = gemma_core.load("tiny-gemma", seed=2).forward(np.array([[4, 5]])).logits
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_preset_overrides() -> None:
    model = gemma_core.load("tiny-gemma", num_layers=1)
    assert model.config.num_layers == 1


def test_list_input_is_accepted(g1: gemma_core.Model) -> None:
    np.testing.assert_array_equal(g1.forward([2, 5]).logits, g1.forward(np.array([[2, 5]])).logits)


@pytest.mark.parametrize(("ids", "match"), [
    (np.array([[2, 512]]), "token id 512 is outside the vocabulary"),
    (np.array([[-1, 2]]), "token id -1 is outside the vocabulary"),
    (np.array([[1.5, 2.0]]), "integer token ids"),
    (np.zeros((1, 0), int), "non-empty"),
    (np.zeros((1, 2, 3), int), "non-empty"),
])
def test_bad_token_ids(g1: gemma_core.Model, ids: np.ndarray, match: str) -> None:
    with pytest.raises(InputError, match=match):
        g1.forward(ids)


def test_sequence_beyond_max_position_raises(g1: gemma_core.Model) -> None:
    limit = g1.config.max_position_embeddings
    with pytest.raises(InputError, match=f"exceeds max_position_embeddings {limit}"):
        g1.forward(np.full((1, limit + 1), 5))


def test_bad_attention_mask(g1: gemma_core.Model) -> None:
    with pytest.raises(InputError, match="shape"):
        g1.forward(np.array([[2, 5]]), np.array([[1, 1, 1]]))
    with pytest.raises(InputError, match="0 or 1"):
        g1.forward(np.array([[2, 5]]), np.array([[1, 2]]))


def test_float16_policy_gemma2_3_refused_gemma1_allowed() -> None:
    with pytest.raises(ConfigError, match="float16 overflows gemma3"):
        gemma_core.load("tiny-gemma3", dtype="float16")
    with pytest.warns(Float16OverflowWarning):
        gemma_core.load("tiny-gemma2", dtype="float16", allow_float16=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gemma_core.load("tiny-gemma", dtype="float16")


def test_unknown_dtype_device_backend_path() -> None:
    with pytest.raises(ConfigError, match="dtype: unsupported value 'int8'"):
        gemma_core.load("tiny-gemma", dtype="int8")
    with pytest.raises(BackendError, match="CPU only"):
        gemma_core.load("tiny-gemma", device="cuda")
    with pytest.raises(BackendError, match=r"unknown backend 'nope' \(known: .*numpy"):
        gemma_core.load("tiny-gemma", backend="nope")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        gemma_core.load("/nonexistent/model")


def test_weights_are_not_mutated_and_tied_embedding_held_once() -> None:
    from gemma_core.weights import random_weights

    config = gemma_core.get_preset("tiny-gemma")
    weights = random_weights(config, 0)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    before = {k: v.copy() for k, v in weights.items()}
    model = gemma_core.Model(config, weights)
    model.forward(np.array([[2, 3]]))
    assert "lm_head.weight" not in model.weights
    assert set(weights) == set(before)
    for k in before:
        np.testing.assert_array_equal(weights[k], before[k])


def test_batch_ids_left_pads() -> None:
    ids, mask = gemma_core.batch_ids([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    with pytest.raises(InputError):
        gemma_core.batch_ids([[5], []])
