"""Training the Keras face (`backends.tensorflow.as_keras_model`) on random weights of the tiny
presets: its float weights are its trainable variables; `CausalLMLoss` and every weight's
gradient (tf.GradientTape, float32) equal transformers' loss and autograd on the same weights and
labels (left padding, -100); the padding mask keeps padding out of the loss; sample weights and
keras-hub's pre-shifted convention; `fit` lowers the loss and its weights survive
`save_weights`/`load_weights`; mixed bfloat16 computes in bfloat16 with float32 gradients."""

from __future__ import annotations

import functools
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hf_reference import face_configs, left_padded_batch

import gemma_core
from gemma_core.errors import ConfigError
from gemma_core.weights import random_weights

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from backends.tensorflow import as_keras_model  # noqa: E402  (after the skip: needs keras)
from backends.tensorflow.keras_model import CausalLMLoss, GemmaKerasModel, causal_lm_loss  # noqa: E402

CONFIGS = face_configs()
B, T, PAD = 2, 12, 3  # row 1 is left-padded by PAD tokens: longer than tiny-gemma2/3's window 8


def _batch(config: gemma_core.GemmaConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # the Keras loss never counts a prediction made at a pad (the logits' Keras mask)
    return left_padded_batch(config, B, T, PAD, count_first=False)


class Face:
    """One config's Keras model on `random_weights(config, 0)`, its batch, and the logits, loss
    and gradients (by variable path) of one taped pass."""

    def __init__(self, key: str) -> None:
        self.config = CONFIGS[key]
        self.gemma = gemma_core.Model(self.config, random_weights(self.config, 0), backend="tensorflow")
        self.keras = as_keras_model(self.gemma)
        self.ids, self.mask, self.labels = _batch(self.config)
        self.x = {"token_ids": self.ids, "padding_mask": self.mask}
        with tf.GradientTape() as tape:
            self.logits = self.keras(self.x)
            self.loss = CausalLMLoss()(self.labels, self.logits)
        variables = self.keras.trainable_variables
        self.grads = {v.path: tf.convert_to_tensor(g).numpy()
                      for v, g in zip(variables, tape.gradient(self.loss, variables), strict=True)}


# one Face per config and module run (tests that change no variable share it)
_shared = functools.lru_cache(maxsize=None)(Face)


@pytest.fixture(scope="module", params=list(CONFIGS))
def face(request: pytest.FixtureRequest) -> Face:
    return _shared(request.param)


def test_weights_are_the_trainable_variables(face: Face) -> None:
    variables = face.keras.trainable_variables
    assert sorted(v.path for v in variables) == sorted(face.gemma.weights)  # a tied embedding once
    assert not face.keras.non_trainable_variables
    assert all(v.dtype == "float32" for v in variables)


def test_loss_equals_transformers(face: Face, hf: tuple[float, dict[str, np.ndarray]]) -> None:
    assert face.loss.dtype == tf.float32
    assert float(face.loss) == pytest.approx(hf[0], rel=1e-5)
    assert float(causal_lm_loss(face.labels, face.logits)) == pytest.approx(hf[0], rel=1e-5)


def test_gradients_equal_transformers_autograd(face: Face, hf: tuple[float, dict[str, np.ndarray]]) -> None:
    want = hf[1]
    assert set(face.grads) == set(want)  # every weight gets a gradient (a tied head: the embedding)
    for name, g in face.grads.items():
        scale = np.abs(want[name]).max()
        assert scale > 0, name
        np.testing.assert_allclose(g, want[name], rtol=0, atol=2e-5 * scale, err_msg=name)


def test_the_padding_mask_keeps_padding_out_of_the_loss(face: Face,
                                                         hf: tuple[float, dict[str, np.ndarray]]) -> None:
    """Labels without -100 at the padding: the logits' Keras mask drops the predictions made at
    padding positions (the plain function, which sees no mask, counts them)."""
    ids_as_labels = face.ids.copy()
    ids_as_labels[0, 5] = ids_as_labels[1, 8] = -100  # the batch's two other ignored labels
    assert float(CausalLMLoss()(ids_as_labels, face.logits)) == pytest.approx(hf[0], rel=1e-5)
    assert float(causal_lm_loss(ids_as_labels, face.logits)) != pytest.approx(hf[0], rel=1e-3)


def test_sample_weights() -> None:
    """0/1 weights [B, T] act as -100; row weights [B] weight whole rows; no weight: loss 0."""
    face = _shared("tiny-gemma3")
    loss = CausalLMLoss()
    as_weights = (face.labels != -100).astype(np.float32)
    weighted = float(loss(face.ids, face.logits, sample_weight=as_weights))
    assert weighted == pytest.approx(float(face.loss), rel=1e-6)
    row_1 = float(loss(face.labels[1:], face.logits[1:]))
    by_row = float(loss(face.labels, face.logits, sample_weight=np.array([0.0, 2.0])))
    assert by_row == pytest.approx(row_1, rel=1e-6)
    assert float(loss(face.labels, face.logits, sample_weight=np.zeros(B))) == 0.0
    per_token = CausalLMLoss(reduction="none")(face.labels, face.logits)
    assert per_token.shape == (B, T - 1)
    assert float(tf.reduce_sum(per_token)) == pytest.approx(
        float(CausalLMLoss(reduction="sum")(face.labels, face.logits)), rel=1e-6)
    with pytest.raises(ConfigError, match="reduction"):
        CausalLMLoss(reduction="median")


def test_keras_hubs_shifted_convention_gives_the_same_loss() -> None:
    """keras-hub's preprocessor: x = ids[:, :-1], y = ids[:, 1:], sample_weight = mask[:, 1:],
    with Keras's SparseCategoricalCrossentropy, which reads the logits' mask."""
    face = _shared("tiny-gemma3")
    logits = face.keras({"token_ids": face.ids[:, :-1], "padding_mask": face.mask[:, :-1]})
    scce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    weights = (face.labels[:, 1:] != -100).astype(np.float32)  # mask[:, 1:], the other ignored labels 0
    got = float(scce(face.ids[:, 1:], logits, sample_weight=weights))
    # Keras divides by the unmasked positions; CausalLMLoss by the counted tokens
    real = face.mask[:, :-1].sum()
    assert got * real / weights[face.mask[:, :-1] == 1].sum() == pytest.approx(float(face.loss), rel=1e-5)


DISTRIBUTED = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from backends.tensorflow.keras_model import CausalLMLoss
rng = np.random.default_rng(0)
logits = tf.constant(rng.normal(size=(2, 5, 7)), tf.float32)
labels = tf.constant(rng.integers(0, 7, (2, 5)), tf.int32)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
replicas = strategy.experimental_local_results(strategy.run(lambda: CausalLMLoss()(labels, logits)))
print(float(CausalLMLoss()(labels, logits)), *(float(x) for x in replicas))
"""


def test_under_tf_distribute_each_replica_takes_its_share() -> None:
    """As Keras's own losses: the replicas' gradients are summed, so each replica's mean is divided
    by their number (two logical CPUs, in a process of its own: they must precede TF's start)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", DISTRIBUTED], capture_output=True, text=True,
                         check=True, cwd=root)
    full, *replicas = (float(v) for v in out.stdout.split())
    assert replicas == pytest.approx([full / 2, full / 2], rel=1e-6)


def test_fit_lowers_the_loss_and_its_weights_round_trip(tmp_path: Path) -> None:
    """3 SGD steps of `fit` with the default loss (CausalLMLoss); the first step's loss is the
    taped loss; save_weights / load_weights into a fresh model gives the trained logits."""
    config = CONFIGS["tiny-gemma3"]
    face = Face("tiny-gemma3")  # its own: fit changes the variables
    face.keras.compile(optimizer=keras.optimizers.SGD(0.5))
    history = face.keras.fit(face.x, face.labels, batch_size=B, epochs=3, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert losses[0] == pytest.approx(float(face.loss), rel=1e-5)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    trained = face.keras(face.x).numpy()
    assert not np.allclose(trained, face.logits.numpy())
    # the gemma model shares the variables: its forward pass follows the training
    real = face.mask == 1
    np.testing.assert_allclose(face.gemma.to_numpy(face.gemma.forward(face.ids, face.mask).logits)[real],
                               trained[real], rtol=0, atol=1e-4 * np.abs(trained).max())
    path = str(tmp_path / "trained.weights.h5")
    face.keras.save_weights(path)
    fresh = as_keras_model(gemma_core.Model(config, random_weights(config, 5), backend="tensorflow"))
    fresh.load_weights(path)
    np.testing.assert_array_equal(fresh(face.x).numpy(), trained)


def test_mixed_bfloat16_computes_in_bfloat16_with_float32_gradients() -> None:
    face = _shared("tiny-gemma3")
    mixed = as_keras_model(face.gemma, dtype="mixed_bfloat16")
    assert mixed.dtype_policy.name == "mixed_bfloat16"
    with tf.GradientTape() as tape:
        logits = mixed(face.x)
        loss = CausalLMLoss()(face.labels, logits)
    variables = mixed.trainable_variables
    grads = {v.path: tf.convert_to_tensor(g)
             for v, g in zip(variables, tape.gradient(loss, variables), strict=True)}
    assert logits.dtype == tf.bfloat16 and loss.dtype == tf.float32
    assert all(v.dtype == "float32" for v in variables)
    assert float(loss) == pytest.approx(float(face.loss), rel=0.05)
    for name, g in grads.items():
        want = face.grads[name]
        assert g.dtype == tf.float32, name
        cosine = np.sum(g.numpy() * want) / (np.linalg.norm(g.numpy()) * np.linalg.norm(want))
        assert cosine > 0.98, (name, cosine)  # bfloat16 rounding: the same direction


def test_dtype_policies() -> None:
    """A bfloat16 gemma model computes and trains in bfloat16; a global mixed policy applies; float16
    for Gemma 2 is refused (numerics rule 9)."""
    face = _shared("tiny-gemma3")
    bf16 = gemma_core.Model(face.config, random_weights(face.config, 0), backend="tensorflow",
                            dtype="bfloat16")
    keras_bf16 = as_keras_model(bf16)
    assert keras_bf16.dtype_policy.name == "bfloat16"
    with tf.GradientTape() as tape:
        loss = CausalLMLoss()(face.labels, keras_bf16(face.x))
    grad = tape.gradient(loss, keras_bf16.trainable_variables)[0]
    assert loss.dtype == tf.float32 and tf.convert_to_tensor(grad).dtype == tf.bfloat16
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        assert as_keras_model(face.gemma).dtype_policy.name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert as_keras_model(face.gemma).dtype_policy.name == "float32"
    gemma2 = gemma_core.Model(CONFIGS["tiny-gemma2-untied"], random_weights(CONFIGS["tiny-gemma2-untied"], 0),
                              backend="tensorflow")
    with pytest.raises(ConfigError, match="float16"):
        GemmaKerasModel(gemma2, dtype="mixed_float16")
