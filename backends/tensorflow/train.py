"""The tensorflow trainer of `gemma_core.finetune`: the op list with the adapter
(`gemma_core.lora.apply_lora` over `build_graph(config, cache=False)`) on the tensorflow op table,
the adapter's weights as `tf.Variable`s and the base weights as constants, gradients by
`tf.GradientTape` inside one `tf.function`, and the shared AdamW
(`gemma_core.finetune.adamw_update`). A quantised base (QLoRA) is held as the tensorflow backend
holds it (integer values and float32 scales, read by `qlinear`/`qembed`): constants too, frozen."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from backends.tensorflow import backend
from backends.tensorflow.keras_model import causal_lm_loss
from backends.tensorflow.ops import DTYPES
from gemma_core.data import Batch
from gemma_core.finetune import TrainConfig, adamw_update, counted_tokens, moments_state, saved_moments
from gemma_core.graph import bind, build_graph, run_bound
from gemma_core.lora import apply_lora, check_lora_weights
from gemma_core.masks import layer_kinds
from gemma_core.model import check_dtype
from gemma_core.quant import SCALE_SUFFIX
from gemma_core.step import step_inputs
from gemma_core.weights import canonical_weights


class Trainer:
    """One adapter in training: its variables, their AdamW moments and the step count."""

    def __init__(self, model: Any, cfg: TrainConfig, lora_weights: Mapping[str, np.ndarray],
                 optimizer_state: Mapping[str, np.ndarray] | None = None) -> None:
        config = model.config
        check_dtype(config, model.dtype)
        check_lora_weights(config, cfg.lora, lora_weights)
        self.cfg, dt = cfg, DTYPES[model.dtype]
        graph = apply_lora(build_graph(config, cache=False), config, cfg.lora)
        kinds = layer_kinds(config)
        frozen = _frozen_weights(model, dt)
        self.train = {n: tf.Variable(tf.cast(np.asarray(w, np.float32), dt), name=n.replace(".", "_"))
                      for n, w in lora_weights.items()}
        self.count, m, v = saved_moments(optimizer_state, {n: tuple(x.shape) for n, x in self.train.items()})
        self.m = {n: tf.Variable(x) for n, x in m.items()}
        self.v = {n: tf.Variable(x) for n, x in v.items()}
        table = backend.op_table(model.dtype)
        if cfg.lora.dropout > 0:
            table = {**table, "lora": _lora_with_dropout(table["lora"], cfg.lora.dropout)}
        tf.random.set_seed(cfg.seed)  # the adapter's dropout draws
        self._kinds = kinds

        def loss(env: dict[str, Any], labels: Any) -> Any:
            run_bound(bind(graph, table, {**frozen, **self.train}), env)
            return causal_lm_loss(labels, env["logits"])

        @tf.function(reduce_retracing=True)
        def grad(env: dict[str, Any], labels: Any) -> Any:
            with tf.GradientTape() as tape:
                value = loss(dict(env), labels)
            return value, tape.gradient(value, self.train)

        self._grad = grad
        self._eval = tf.function(lambda env, labels: loss(dict(env), labels), reduce_retracing=True)

    def _env(self, batch: Batch) -> dict[str, Any]:
        inputs, _ = step_inputs(batch.ids, batch.mask, windows=self._kinds)
        return {k: tf.constant(v) for k, v in inputs.items()}

    def step(self, micro: Sequence[Batch], lr: float) -> float:
        """One AdamW step over the micro-batches' token-weighted mean loss."""
        total = sum(counted_tokens(b.labels) for b in micro)
        grads: dict[str, Any] | None = None
        value = 0.0
        for batch in micro:
            n = counted_tokens(batch.labels)
            if n == 0:
                continue
            loss, g = self._grad(self._env(batch), tf.constant(batch.labels))
            g = {k: tf.cast(x, tf.float32) * (n / total) for k, x in g.items()}
            grads = g if grads is None else {k: grads[k] + g[k] for k in g}
            value += float(loss) * n / total
        self.count += 1
        if grads is not None:
            for name, var in self.train.items():
                w, m, v = adamw_update(tf.math, tf.cast(var, tf.float32), grads[name], self.m[name],
                                       self.v[name], self.count, lr, self.cfg)
                var.assign(tf.cast(w, var.dtype))
                self.m[name].assign(m)
                self.v[name].assign(v)
        return value

    def loss(self, batch: Batch) -> tuple[float, int]:
        """(summed token loss, counted tokens) of `batch`, without dropout."""
        n = counted_tokens(batch.labels)
        if n == 0:
            return 0.0, 0
        return float(self._eval(self._env(batch), tf.constant(batch.labels))) * n, n

    def lora_weights(self) -> dict[str, np.ndarray]:
        """The adapter's weights, float32 numpy."""
        return {n: np.asarray(tf.cast(v, tf.float32)).copy() for n, v in self.train.items()}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The AdamW moments of every adapter weight and the step count."""
        return moments_state(self.count, {n: x.numpy() for n, x in self.m.items()},
                             {n: x.numpy() for n, x in self.v.items()})


def _frozen_weights(model: Any, dt: Any) -> dict[str, Any]:
    """The base weights as constants: floats in the compute dtype `dt`, a quantised weight's
    values and scale as the tensorflow backend's `prepare_quantized` gives them."""
    quant, weights = model.config.quantization, canonical_weights(model)
    out: dict[str, Any] = {}
    for name, w in weights.items():
        scheme = quant.scheme_for(name) if quant is not None else None
        if quant is not None and scheme is not None and name + SCALE_SUFFIX in weights:
            out[name], out[name + SCALE_SUFFIX] = backend.prepare_quantized(
                w, weights[name + SCALE_SUFFIX], scheme, quant.group_for(scheme), model.dtype, None, name)
        elif name not in out:
            out[name] = tf.constant(w, dt)
    return out


def _lora_with_dropout(lora: Any, p: float) -> Any:
    """The `lora` op with PEFT's dropout of its input (the trainer's steps are training)."""

    def op(x: Any, a: Any, b: Any, *, scale: float) -> Any:
        return lora(tf.nn.dropout(x, rate=p), a, b, scale=scale)

    return op
