"""A `gemma_core.Model` on the TensorFlow backend as a `keras.Model`.

The Keras model holds the same Keras variables as the gemma model (a variable's path is its
canonical checkpoint name), so `load_weights` on one changes the other. Calling it runs the same
op list once over the whole input, without a cache:

    keras_model = as_keras_model(gemma_core.load(path, backend="tensorflow"))
    logits = keras_model({"token_ids": ids, "padding_mask": mask})  # or keras_model(ids)
    keras_model.save_weights("gemma.weights.h5")
    keras_model.export("saved_model")  # serving signature: token_ids, padding_mask -> logits
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from gemma_core.errors import BackendError
from gemma_core.graph import bind, build_graph, run_bound
from gemma_core.masks import layer_kinds
from gemma_core.step import step_inputs

OUTPUT = {"causal-lm": "logits", "sequence-classification": "logits",
          "token-classification": "logits", "base": "hidden"}


class GemmaKerasModel(keras.Model):
    """Inputs: token ids `[B, T]` (any integer dtype), or a dict with `token_ids` and an optional
    `padding_mask` (1 for real tokens, 0 for left padding, as keras-hub). Output: logits
    `[B, T, V]` (causal-lm), `[B, labels]` or `[B, T, labels]` (classifiers), or the final hidden
    states `[B, T, D]` (base), in the model's compute dtype."""

    def __init__(self, model: Any, **kwargs: Any) -> None:
        if model.backend.name != "tensorflow":
            raise BackendError(f"as_keras_model needs a model on the tensorflow backend, got "
                               f"{model.backend.name!r}")
        super().__init__(name=kwargs.pop("name", "gemma"), **kwargs)
        # the step without a cache: one pass over the whole input
        graph = build_graph(model.config, model.task, cache=False)
        self._gemma = (model.config, graph, model.ops, model.dtype, model.task)
        self._names = tuple(model.weights)
        # one tracked list of distinct variables, in graph order (save_weights keeps this order)
        distinct = {id(v): v for v in model.weights.values()}
        self.gemma_variables = list(distinct.values())
        self._by_name = dict(model.weights)
        self.built = True  # every variable exists already

    def call(self, inputs: Any) -> tf.Tensor:
        if isinstance(inputs, dict):
            ids, mask = inputs["token_ids"], inputs.get("padding_mask")
        else:
            ids, mask = inputs, None
        config, graph, ops, _, task = self._gemma
        ids = tf.cast(ids, tf.int64)
        shape = tf.shape(ids)
        mask = tf.ones(shape, tf.bool) if mask is None else tf.cast(mask, tf.bool)
        # the forward pass's rule with no cache, in keras.ops (dynamic batch and length)
        env, _ = step_inputs(ids, mask, windows=layer_kinds(config), xp=keras.ops)
        run_bound(bind(graph, ops, self._by_name), env)
        return env[OUTPUT[task]]

    def export(self, filepath: str, format: str = "tf_saved_model", verbose: bool | None = None,
               **kwargs: Any) -> Any:
        """A SavedModel whose `serve` endpoint (also the `serving_default` signature) maps
        `token_ids` and `padding_mask` (int32 `[B, T]`, any batch and length) to
        `{"logits": ...}` (`{"hidden": ...}` for the base task). Other formats: `keras.Model.export`."""
        if format != "tf_saved_model" or kwargs:
            return super().export(filepath, format=format, verbose=verbose, **kwargs)
        output = OUTPUT[self._gemma[4]]

        def serve(token_ids: tf.Tensor, padding_mask: tf.Tensor) -> dict[str, tf.Tensor]:
            return {output: self({"token_ids": token_ids, "padding_mask": padding_mask})}

        spec = tf.TensorSpec([None, None], tf.int32)
        archive = keras.export.ExportArchive()
        archive.track(self)
        archive.add_endpoint("serve", tf.function(serve), input_signature=[spec, spec])
        archive.write_out(filepath, verbose=bool(verbose))
        return archive
