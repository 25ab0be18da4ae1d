"""The TensorFlow backend, delivered as Keras 3 objects: float32, bfloat16 and float16 (and
float64); every weight a Keras variable whose path is its canonical name (for example
`model.layers.0.self_attn.q_proj.weight`); the whole step in `tf.function(jit_compile=True)`
(XLA) by default. `as_keras_model(model)` gives the same variables as a `keras.Model`
(`save_weights`/`load_weights`, `export` to a SavedModel with a logits serving signature)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up notices off stderr

from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from backends.tensorflow.ops import DTYPES, make_op_table
from gemma_core.backend import FLOAT16_REFUSED, Backend, StepFn, per_weights
from gemma_core.errors import BackendError
from gemma_core.quant import keeps_dtype


class TensorflowBackend(Backend):
    """Realises the op vocabulary with TensorFlow ops on Keras variables."""

    name = "tensorflow"
    dtypes = tuple(DTYPES)
    op_groups = ("core", "quantized", "classification", "lora")
    devices = ("default", "cpu", "gpu")
    gaps = FLOAT16_REFUSED
    cache_in_place = False  # kv_cache returns new tensors; the ones passed in are never changed

    def make_op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        return make_op_table(dtype)

    def device(self, device: str | None) -> str | None:
        """A TensorFlow device string for a user's `device` ("cpu", "gpu", "gpu:1"), or None."""
        if device in (None, "default"):
            return None
        kind, _, index = device.lower().partition(":")
        name = f"/{kind.upper()}:{index or 0}"
        if not any(d.name.endswith(name.lstrip("/")) for d in tf.config.list_logical_devices()):
            raise BackendError(f"device: {device!r} is not available to TensorFlow")
        return name

    def prepare_weights(self, weights: Mapping[str, np.ndarray], dtype: str,
                        device: str | None, quant: Any = None) -> dict[str, Any]:
        """One Keras variable per distinct array (a tied embedding is one variable), named by
        its canonical checkpoint name. Quantised values keep their integer dtype and scales
        stay float32 (neither trainable)."""
        _check_keras()
        made: dict[int, keras.Variable] = {}
        out = {}
        with tf.device(self.device(device)):
            for name, w in weights.items():
                if id(w) not in made:
                    array = np.asarray(w)
                    if keeps_dtype(name, array):
                        made[id(w)] = keras.Variable(array, dtype=array.dtype.name, name=name,
                                                     trainable=False)
                    else:
                        made[id(w)] = keras.Variable(np.asarray(array, np.float32), dtype=dtype, name=name)
                out[name] = made[id(w)]
        return out

    def convert_weight(self, w: np.ndarray, dtype: str, device: str | None) -> Any:
        with tf.device(self.device(device)):
            return tf.constant(np.asarray(w, np.float32), DTYPES[dtype])

    def asarray(self, x: np.ndarray, device: str | None) -> Any:
        with tf.device(self.device(device)):
            return tf.constant(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, keras.Variable):
            x = x.value
        if isinstance(x, (tf.Tensor, tf.Variable)):
            if x.dtype.is_floating and x.dtype.size < 4:
                x = tf.cast(x, tf.float32)
            return x.numpy()
        return np.asarray(x)

    def new_cache_layer(self, batch: int, kv_heads: int, capacity: int, head_dim: int,
                        dtype: str, device: str | None) -> Any:
        shape = (batch, kv_heads, capacity, head_dim)
        with tf.device(self.device(device)):
            return tf.zeros(shape, DTYPES[dtype]), tf.zeros(shape, DTYPES[dtype])

    def export_cache_layer(self, state: Any) -> tuple[np.ndarray, np.ndarray]:
        k, v = state
        return self.to_numpy(k), self.to_numpy(v)

    def copy_cache_layer(self, state: Any) -> Any:
        return state  # tensors are immutable: sharing them is a copy

    def reorder_cache_layer(self, state: Any, rows: np.ndarray) -> Any:
        k, v = state
        return tf.gather(k, rows, axis=0), tf.gather(v, rows, axis=0)

    def write_cache_row(self, state: Any, row: int, source: Any, source_row: int) -> Any:
        (k, v), (sk, sv) = state, source
        return (tf.tensor_scatter_nd_update(k, [[row]], sk[source_row][None]),
                tf.tensor_scatter_nd_update(v, [[row]], sv[source_row][None]))

    def shift_cache_layer(self, state: Any, shift: int) -> Any:
        k, v = state
        roll = -(shift % int(k.shape[2]))
        return tf.roll(k, roll, axis=2), tf.roll(v, roll, axis=2)

    def static_shapes(self, options: Mapping[str, Any]) -> bool:
        return options.get("compile") is not False

    def compile_step(self, step: StepFn, options: Mapping[str, Any]) -> StepFn:
        """The whole step as one `tf.function(jit_compile=True)` (XLA) per weight set, the
        weights captured as variables rather than passed per call; eager when `compile=False`.
        `run.traced(weights)` is the compiled function (for its tracing count)."""
        if options.get("compile") is False:
            return step
        traced = per_weights(lambda weights: tf.function(
            lambda env: step(weights, dict(env)), jit_compile=True, reduce_retracing=False))

        def run(weights: Mapping[str, Any], env: dict[str, Any]) -> dict[str, Any]:
            with tf.device(self.device(options.get("device"))):
                return traced(weights)(env)

        run.traced = traced  # type: ignore[attr-defined]
        return run


def _check_keras() -> None:
    if keras.backend.backend() != "tensorflow":
        raise BackendError(f"backend 'tensorflow' needs Keras on TensorFlow, but KERAS_BACKEND is "
                           f"{keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow before "
                           "importing keras")


backend = TensorflowBackend()


def as_keras_model(model: Any, **kwargs: Any) -> Any:
    """The model (a `gemma_core.Model` on this backend) as a `keras.Model` sharing its variables
    (`kwargs`, such as `dtype="mixed_bfloat16"`: `keras_model.GemmaKerasModel`'s)."""
    from backends.tensorflow.keras_model import GemmaKerasModel

    return GemmaKerasModel(model, **kwargs)
