"""A `gemma_core.Model` on the TensorFlow backend as a trainable `keras.Model`.

The Keras model holds the same Keras variables as the gemma model (a variable's path is its
canonical checkpoint name; float weights are trainable, quantised values and scales are not), so
`load_weights` on one changes the other, and so does training. Calling it runs the same op list
once over the whole input, without a cache (`build_graph(config, task, cache=False)`):

    keras_model = as_keras_model(gemma_core.load(path, backend="tensorflow"))
    logits = keras_model({"token_ids": ids, "padding_mask": mask})  # or keras_model(ids)
    keras_model.compile(optimizer=keras.optimizers.AdamW(1e-4))  # loss: CausalLMLoss()
    keras_model.fit(x={"token_ids": ids, "padding_mask": mask}, y=labels, batch_size=8)
    keras_model.save_weights("gemma.weights.h5")
    keras_model.export("saved_model")  # serving signature: token_ids, padding_mask -> logits

Training, in Keras's idiom: `call` returns predictions only (no `labels` input, no loss output:
the serving signature and `predict` stay as they are); the loss lives in `compile`, and `fit`
pairs it with `y`.

- `CausalLMLoss()` (the default of `compile(loss="auto")` for the causal LM) takes `y` = labels
  `[B, T]` aligned with `token_ids`, as transformers: `logits[:, :-1]` predict `labels[:, 1:]`,
  `-100` is ignored, the mean over the counted tokens, in float32 (0 when none is counted). So
  `fit(x={"token_ids": ids, "padding_mask": mask}, y=ids)` trains next-token prediction.
- The logits carry `padding_mask` as their Keras mask (`compute_mask`), and `CausalLMLoss` counts
  only predictions made at real positions: padding never enters the loss, and neither does the
  first real token of a left-padded row (a padding position would predict it), with or without
  `-100` there.
- `sample_weight` (`fit(..., sample_weight=w)`, `[B, T]` aligned with the labels, or `[B]` per
  row) weights each label: the loss is `sum(w * loss) / sum(w)` over the counted tokens.
- keras-hub's `GemmaCausalLM` convention also works unchanged: its preprocessor gives
  `x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}`, `y = ids[:, 1:]` (already
  shifted) and `sample_weight = mask[:, 1:]`, for
  `compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))` (its own default),
  which reads the same Keras mask. With that convention `weighted_metrics` (such as
  `SparseCategoricalAccuracy`) line up with `y`; with `CausalLMLoss`'s unshifted labels they
  would compare each logit with the current token, so leave them out.
- `causal_lm_loss(labels, logits)` is the same loss as a function, for `tf.GradientTape` loops;
  its arguments are in Keras's `(y_true, y_pred)` order (the torch and jax faces take
  `(logits, labels)`).

Precision: the compute dtype is the Keras dtype policy's. By default it is the gemma model's
dtype, or the global policy when that is a mixed one
(`keras.mixed_precision.set_global_policy("mixed_bfloat16")`); pass `dtype=` to choose
(`as_keras_model(model, dtype="mixed_bfloat16")`). The variables keep the gemma model's dtype
(they exist already): a float32 model under `mixed_bfloat16` computes in bfloat16 from float32
variables, and its gradients and optimizer updates are float32. The loss is float32 in every case.
float16 follows numerics rule 9 (refused for Gemma 2/3 unless `allow_float16=True`).

The gemma ops are TensorFlow ops, so the model runs (and trains) with Keras on TensorFlow only,
the one Keras backend the tensorflow backend accepts; the loss is written in `keras.ops`.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops
from keras.src.backend import get_keras_mask  # as keras-hub reads masks; no public accessor

from backends.tensorflow.ops import DTYPES
from gemma_core.errors import BackendError, ConfigError, InputError
from gemma_core.graph import bind, build_graph, run_bound
from gemma_core.masks import layer_kinds
from gemma_core.model import check_dtype
from gemma_core.step import step_inputs

OUTPUT = {"causal-lm": "logits", "sequence-classification": "logits",
          "token-classification": "logits", "base": "hidden"}
IGNORE_INDEX = -100  # label ids the loss skips, as transformers
_PER_TOKEN = ("causal-lm", "token-classification", "base")  # outputs with a T axis: masked
_REDUCTIONS = ("mean", "sum_over_batch_size", "sum", "none", None)


def causal_lm_loss(labels: Any, logits: Any, sample_weight: Any = None) -> Any:
    """transformers' causal-LM loss in float32: `logits[:, :-1]` (`[B, T, V]`) predict
    `labels[:, 1:]` (`[B, T]`), `-100` ignored, the mean over the counted tokens (0 when none
    is). `sample_weight` (`[B, T]` aligned with the labels, or `[B]`) weights each label:
    `sum(w * loss) / sum(w)`."""
    losses, weights = _token_losses(labels, logits, sample_weight, None)
    return _weighted_mean(losses, weights)


class CausalLMLoss(keras.losses.Loss):
    """`causal_lm_loss` as a Keras loss (`y_true` = labels `[B, T]`, `y_pred` = logits
    `[B, T, V]`), for `compile(loss=CausalLMLoss())`. It also reads the logits' Keras mask (the
    model's `padding_mask`): a prediction made at a padding position is not counted.

    `reduction`: "sum_over_batch_size" or "mean" (default: the weighted mean over the counted
    tokens), "sum" (their weighted sum), or "none" (`[B, T - 1]` weighted per-token losses, 0
    where not counted). Under `tf.distribute` the means are divided by the replicas in sync, as
    Keras's own losses are, since the replicas' gradients are summed."""

    def __init__(self, name: str = "causal_lm_loss", reduction: str | None = "sum_over_batch_size",
                 **kwargs: Any) -> None:
        if reduction not in _REDUCTIONS:
            raise ConfigError(f"reduction: {reduction!r} is not one of {_REDUCTIONS}")
        super().__init__(name=name, reduction=reduction, **kwargs)

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        # the whole call, not `call`: Keras's reduction would pair `sample_weight [B, T]` and the
        # mask with the unshifted positions, and casting y_pred to float32 drops its mask
        with keras.name_scope(self.name):
            losses, weights = _token_losses(y_true, y_pred, sample_weight, get_keras_mask(y_pred))
            if self.reduction in ("none", None):
                return losses * weights
            if self.reduction == "sum":
                return ops.sum(losses * weights)
            loss = _weighted_mean(losses, weights)
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            return loss / replicas if replicas > 1 else loss

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """The per-token losses `[B, T - 1]` (0 where not counted), without weights or mask."""
        losses, weights = _token_losses(y_true, y_pred, None, None)
        return losses * weights


def _token_losses(labels: Any, logits: Any, sample_weight: Any, padding_mask: Any) -> tuple[Any, Any]:
    """(float32 cross-entropies `[B, T-1]` of `logits[:, :-1]` against `labels[:, 1:]`, float32
    weights `[B, T-1]`: 0 where the label is -100 or the predicting position is padding, else the
    label's sample weight)."""
    if len(labels.shape) != 2 or len(logits.shape) != 3:
        raise InputError(f"labels: expected labels [B, T] and logits [B, T, V], got shapes "
                         f"{tuple(labels.shape)} and {tuple(logits.shape)}")
    if None not in (*labels.shape, *logits.shape[:2]) and tuple(labels.shape) != tuple(logits.shape[:2]):
        raise InputError(f"labels: shape {tuple(labels.shape)} differs from the logits' "
                         f"{tuple(logits.shape[:2])}")
    targets = ops.cast(labels, "int32")[:, 1:]  # [B, T-1]
    counted = targets != IGNORE_INDEX
    scores = ops.cast(logits[:, :-1], "float32")  # [B, T-1, V]
    losses = ops.sparse_categorical_crossentropy(ops.where(counted, targets, 0), scores,
                                                 from_logits=True)
    weights = ops.cast(counted, "float32")
    if padding_mask is not None:  # the position that predicts label t + 1 is t
        weights = weights * ops.cast(padding_mask, "float32")[:, :-1]
    if sample_weight is not None:
        sample_weight = ops.cast(sample_weight, "float32")
        weights = weights * (sample_weight[:, 1:] if len(sample_weight.shape) == 2
                             else ops.reshape(sample_weight, (-1, 1)))
    return losses, weights


def _weighted_mean(losses: Any, weights: Any) -> Any:
    total, count = ops.sum(losses * weights), ops.sum(weights)
    return total / ops.where(count > 0, count, 1.0)  # 0, not NaN, when nothing is counted


class GemmaKerasModel(keras.Model):
    """Inputs: token ids `[B, T]` (any integer dtype), or a dict with `token_ids` and an optional
    `padding_mask` (1 for real tokens, 0 for left padding, as keras-hub). Output: logits
    `[B, T, V]` (causal-lm), `[B, labels]` or `[B, T, labels]` (classifiers), or the final hidden
    states `[B, T, D]` (base), in the compute dtype of the dtype policy; outputs with a T axis
    carry `padding_mask` as their Keras mask. `dtype`: a Keras dtype policy or its name (see the
    module docstring); `allow_float16` as in `gemma_core.load`."""

    def __init__(self, model: Any, *, dtype: Any = None, allow_float16: bool = False,
                 **kwargs: Any) -> None:
        if model.backend.name != "tensorflow":
            raise BackendError(f"as_keras_model needs a model on the tensorflow backend, got "
                               f"{model.backend.name!r}")
        if dtype is None:  # a global mixed policy applies, as it would to any new layer
            default = keras.config.dtype_policy()
            dtype = default if default.name.startswith("mixed_") else model.dtype
        # autocast off: the casts are explicit (below), so quantisation scales stay float32
        super().__init__(name=kwargs.pop("name", "gemma"), dtype=dtype, autocast=False, **kwargs)
        compute = keras.backend.standardize_dtype(self.dtype_policy.compute_dtype)
        if compute not in DTYPES:
            raise ConfigError(f"dtype: compute dtype {compute!r} is not one of {', '.join(DTYPES)}")
        if compute != model.dtype:
            check_dtype(model.config, compute, allow_float16)
        # the step without a cache: one pass over the whole input
        graph = build_graph(model.config, model.task, cache=False)
        ops_table = model.ops if compute == model.dtype else model.backend.op_table(compute)
        self._gemma = (model.config, graph, ops_table, compute, model.task)
        self._names = tuple(model.weights)
        # one tracked list of distinct variables, in graph order (save_weights keeps this order)
        distinct = {id(v): v for v in model.weights.values()}
        self.gemma_variables = list(distinct.values())
        self._by_name = dict(model.weights)
        # the float weights read in the compute dtype (each distinct variable cast once per call)
        # (ids, not the variables: a tracked tuple would list them twice)
        self._cast_ids = frozenset(id(v) for v in self.gemma_variables
                                   if v.trainable and keras.backend.standardize_dtype(v.dtype) != compute)
        self.built = True  # every variable exists already

    def call(self, inputs: Any) -> tf.Tensor:
        if isinstance(inputs, dict):
            ids, mask = inputs["token_ids"], inputs.get("padding_mask")
        else:
            ids, mask = inputs, None
        config, graph, table, compute, task = self._gemma
        ids = tf.cast(ids, tf.int64)
        shape = tf.shape(ids)
        mask = tf.ones(shape, tf.bool) if mask is None else tf.cast(mask, tf.bool)
        # the forward pass's rule with no cache, in keras.ops (dynamic batch and length)
        env, _ = step_inputs(ids, mask, windows=layer_kinds(config), xp=keras.ops)
        run_bound(bind(graph, table, self._compute_weights(compute)), env)
        return env[OUTPUT[task]]

    def compute_mask(self, inputs: Any, previous_mask: Any = None) -> Any:
        """The Keras mask of the output: the input's `padding_mask` (outputs with a T axis)."""
        if self._gemma[4] in _PER_TOKEN and isinstance(inputs, dict) and "padding_mask" in inputs:
            return ops.cast(inputs["padding_mask"], "bool")
        return None

    def compile(self, optimizer: Any = "rmsprop", loss: Any = "auto", **kwargs: Any) -> None:
        """`keras.Model.compile`, with `loss="auto"` (the default) meaning `CausalLMLoss()` for
        the causal LM, `SparseCategoricalCrossentropy(from_logits=True)` for the classifiers and
        no loss for the base model, as keras-hub's task models default theirs."""
        if isinstance(loss, str) and loss == "auto":
            task = self._gemma[4]
            loss = (CausalLMLoss() if task == "causal-lm" else None if task == "base"
                    else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def _compute_weights(self, compute: str) -> dict[str, Any]:
        """The weights by canonical name, float ones in the compute dtype: a cast of a float32
        variable passes its gradient back in float32 (mixed precision)."""
        if not self._cast_ids:
            return self._by_name
        cast = {id(v): tf.cast(v, DTYPES[compute]) for v in self.gemma_variables if id(v) in self._cast_ids}
        return {name: cast.get(id(v), v) for name, v in self._by_name.items()}

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
