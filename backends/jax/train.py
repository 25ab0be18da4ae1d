"""The jax trainer of `gemma_core.finetune`: the adapter on the jax face
(`backends.jax.function.as_function(model, lora=...)`), gradients by `jax.value_and_grad` with
respect to the adapter's weights alone (one jitted function for every micro-batch of a run's
shape), and the shared AdamW (`gemma_core.finetune.adamw_update`), jitted too. Over a quantised base
(QLoRA) the face's params hold its integer values and float32 scales, frozen with the rest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from backends.jax.function import as_function
from gemma_core.data import Batch
from gemma_core.finetune import TrainConfig, adamw_update, counted_tokens, moments_state, saved_moments
from gemma_core.lora import lora_shapes


class Trainer:
    """One adapter in training: its weights, their AdamW moments and the step count."""

    def __init__(self, model: Any, cfg: TrainConfig, lora_weights: Mapping[str, np.ndarray],
                 optimizer_state: Mapping[str, np.ndarray] | None = None) -> None:
        self.cfg = cfg
        apply, params = as_function(model, lora=cfg.lora, lora_weights=lora_weights)
        names = set(lora_shapes(model.config, cfg.lora))
        self.train = {n: w for n, w in params.items() if n in names}
        frozen = {n: w for n, w in params.items() if n not in names}
        self.count, m, v = saved_moments(optimizer_state, {n: tuple(w.shape) for n, w in self.train.items()})
        self.m = {n: jnp.asarray(x) for n, x in m.items()}
        self.v = {n: jnp.asarray(x) for n, x in v.items()}
        self.key = jax.random.PRNGKey(cfg.seed)  # the adapter's dropout draws
        dropout = cfg.lora.dropout > 0

        def loss(train: Any, ids: Any, mask: Any, labels: Any, key: Any) -> Any:
            return apply({**frozen, **train}, ids, mask, labels, dropout_rng=key if dropout else None)["loss"]

        self._grad = jax.jit(jax.value_and_grad(loss))
        self._loss = jax.jit(lambda train, ids, mask, labels: loss(train, ids, mask, labels, None))

        def update(train: Any, grads: Any, m: Any, v: Any, step: Any, lr: Any) -> Any:
            out = {n: adamw_update(jnp, train[n].astype(jnp.float32), grads[n].astype(jnp.float32),
                                   m[n], v[n], step, lr, cfg) for n in train}
            return ({n: o[0].astype(train[n].dtype) for n, o in out.items()},
                    {n: o[1] for n, o in out.items()}, {n: o[2] for n, o in out.items()})

        self._update = jax.jit(update, static_argnums=(4,))  # the bias corrections are Python floats

    def step(self, micro: Sequence[Batch], lr: float) -> float:
        """One AdamW step over the micro-batches' token-weighted mean loss."""
        total = sum(counted_tokens(b.labels) for b in micro)
        grads: Any = None
        value = 0.0
        self.count += 1
        for i, batch in enumerate(micro):
            n = counted_tokens(batch.labels)
            if n == 0:
                continue
            key = jax.random.fold_in(jax.random.fold_in(self.key, self.count), i)
            loss, g = self._grad(self.train, batch.ids, batch.mask, batch.labels, key)
            weight = n / total
            g = jax.tree.map(lambda x, w=weight: x * w, g)
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            value += float(loss) * weight
        if grads is not None:
            self.train, self.m, self.v = self._update(self.train, grads, self.m, self.v, self.count, lr)
        return value

    def loss(self, batch: Batch) -> tuple[float, int]:
        """(summed token loss, counted tokens) of `batch`, without dropout."""
        n = counted_tokens(batch.labels)
        if n == 0:
            return 0.0, 0
        return float(self._loss(self.train, batch.ids, batch.mask, batch.labels)) * n, n

    def lora_weights(self) -> dict[str, np.ndarray]:
        """The adapter's weights, float32 numpy."""
        return {n: np.asarray(w, np.float32).copy() for n, w in self.train.items()}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The AdamW moments of every adapter weight and the step count."""
        return moments_state(self.count, {n: np.asarray(x) for n, x in self.m.items()},
                             {n: np.asarray(x) for n, x in self.v.items()})
