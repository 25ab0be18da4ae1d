"""The TensorFlow backend's own properties: XLA-compiled steps that do not retrace, eager equal to
compiled, and the Keras model (variable paths, save/load of weights, SavedModel export)
(conformance and transformers parity: test_backends.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gemma_core

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras")

from backends.tensorflow import as_keras_model  # noqa: E402


def _tracings(model: gemma_core.Model) -> int:
    return model._step.traced(model.weights).experimental_get_tracing_count()  # type: ignore[attr-defined]


def test_compiled_decode_does_not_retrace() -> None:
    model = gemma_core.load("tiny-gemma3", backend="tensorflow")
    cache = model.forward(np.array([[2, 5, 6, 7]]), max_length=16, last_only=True).cache
    assert _tracings(model) == 1
    for token in range(8, 18):
        cache = model.forward(np.array([[token]]), cache=cache, last_only=True).cache
    assert _tracings(model) == 2  # one prefill trace, one decode trace for ten steps


def test_eager_equals_compiled() -> None:
    compiled = gemma_core.load("tiny-gemma2", backend="tensorflow", tie_word_embeddings=False)
    eager = gemma_core.load("tiny-gemma2", backend="tensorflow", compile=False, tie_word_embeddings=False)
    ids = np.array([[2, 5, 6, 7, 8]])
    np.testing.assert_allclose(compiled.to_numpy(compiled.forward(ids).logits),
                               eager.to_numpy(eager.forward(ids).logits), atol=1e-5)


def test_generation_buckets_prompt_lengths() -> None:
    """Prompts of 5 and 7 tokens share one compiled prefill and decode step, and give the
    reference's tokens."""
    model = gemma_core.load("tiny-gemma3", backend="tensorflow", tie_word_embeddings=False)
    ref = gemma_core.load("tiny-gemma3", tie_word_embeddings=False)
    kw = {"max_new_tokens": 5, "eos_token_ids": []}
    first = model.generate([list(range(2, 7))], **kw)
    traces = _tracings(model)
    second = model.generate([list(range(2, 9))], **kw)
    assert _tracings(model) == traces
    assert first.token_ids == ref.generate([list(range(2, 7))], **kw).token_ids
    assert second.token_ids == ref.generate([list(range(2, 9))], **kw).token_ids


@pytest.fixture(scope="module")
def gemma2() -> gemma_core.Model:
    return gemma_core.load("tiny-gemma2", backend="tensorflow", seed=3)


def _batch() -> tuple[np.ndarray, np.ndarray]:
    return gemma_core.batch_ids([list(range(3, 15)), list(range(20, 27))])


def test_keras_model_variables_and_logits(gemma2: gemma_core.Model) -> None:
    keras_model = as_keras_model(gemma2)
    paths = sorted(v.path for v in keras_model.weights)
    assert paths == sorted(gemma2.weights)  # the canonical names, the tied embedding once
    assert "model.embed_tokens.weight" in paths and "lm_head.weight" not in paths
    ids, mask = _batch()
    ours = keras_model({"token_ids": ids, "padding_mask": mask}).numpy()
    ref = gemma_core.load("tiny-gemma2", seed=3)
    expected = np.asarray(ref.forward(ids, mask).logits)
    real = mask.astype(bool)
    assert ours.shape == expected.shape
    assert np.abs(ours[real] - expected[real]).max() <= 1e-4 * expected[real].std()
    np.testing.assert_allclose(keras_model(ids[:1]).numpy(), ours[:1], atol=1e-5)  # ids alone


def test_keras_weights_round_trip(gemma2: gemma_core.Model, tmp_path: Path) -> None:
    """save_weights / load_weights into a model of other random weights gives the same logits,
    and the gemma model sharing the variables follows."""
    source = as_keras_model(gemma2)
    path = str(tmp_path / "gemma.weights.h5")
    source.save_weights(path)
    other = gemma_core.load("tiny-gemma2", backend="tensorflow", seed=9)
    ids = np.array([[2, 8, 9, 10]])
    before = other.to_numpy(other.forward(ids).logits)
    target = as_keras_model(other)
    target.load_weights(path)
    for a, b in zip(source.weights, target.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    after = other.to_numpy(other.forward(ids).logits)
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, gemma2.to_numpy(gemma2.forward(ids).logits), atol=1e-6)


def test_saved_model_serving_signature(gemma2: gemma_core.Model, tmp_path: Path) -> None:
    keras_model = as_keras_model(gemma2)
    ids, mask = _batch()
    expected = keras_model({"token_ids": ids, "padding_mask": mask}).numpy()
    keras_model.export(str(tmp_path / "saved"), verbose=False)
    serve = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    out = serve(token_ids=tf.constant(ids, tf.int32), padding_mask=tf.constant(mask, tf.int32))
    assert list(out) == ["logits"]
    np.testing.assert_allclose(out["logits"].numpy(), expected, atol=1e-5)
    longer = np.arange(3, 23)[None]  # another length through the same signature
    logits = serve(token_ids=tf.constant(longer, tf.int32),
                   padding_mask=tf.ones_like(longer, tf.int32))["logits"]
    assert logits.shape == (1, 20, gemma2.config.vocab_size)


def test_keras_model_needs_the_tensorflow_backend() -> None:
    with pytest.raises(gemma_core.BackendError, match="tensorflow backend"):
        as_keras_model(gemma_core.load("tiny-gemma"))
