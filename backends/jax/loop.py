"""Whole-loop decoding for the JAX backend: after the prefill, N tokens are generated inside one
compiled `lax.fori_loop` (no host round trip per token). Greedy, or sampling with temperature and
top-k from `jax.random` keys (reproducible for a seed). The loop body is the model's own step
function: the op list is traced once, inside the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma_core.cache import batch_ids
from gemma_core.errors import InputError
from gemma_core.graph import cache_name
from gemma_core.model import Model
from gemma_core.step import Bookkeeping, step_inputs


def _choose(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
    scores = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(scores, axis=-1)
    scores = scores / temperature
    if top_k is not None:
        kth = jax.lax.top_k(scores, top_k)[0][:, -1:]
        scores = jnp.where(scores < kth, -jnp.inf, scores)
    return jax.random.categorical(key, scores, axis=-1)


def generate_loop(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                  temperature: float = 0.0, top_k: int | None = None, seed: int = 0) -> np.ndarray:
    """Token ids `[B, max_new_tokens]` for left-padded `prompts`, decoded in one compiled loop."""
    if model.backend.name != "jax":
        raise InputError(f"generate_loop: needs a jax model, got backend {model.backend.name!r}")
    if temperature < 0 or max_new_tokens < 1:
        raise InputError("generate_loop: temperature must be >= 0 and max_new_tokens >= 1")
    ids, mask = batch_ids([list(p) for p in prompts], model.config.pad_token_id)
    length = ids.shape[1] + max_new_tokens
    # the loop's own cache: handed over, so the jitted prefill donates it rather than a copy
    out = model.forward(ids, mask, model.new_cache(len(ids), length), last_only=True, donate_cache=True)
    cache = out.cache
    layers = model.config.num_layers
    book = Bookkeeping(jnp.asarray(cache.length), jnp.asarray(cache.valid), jnp.asarray(cache.seen))
    state = {
        "logits": out.logits[:, -1], "caches": tuple(cache.layers), "book": book,
        "tokens": jnp.zeros((len(ids), max_new_tokens), jnp.int32), "key": jax.random.PRNGKey(seed),
    }

    def body(i: jax.Array, s: dict[str, Any], weights: Any) -> dict[str, Any]:
        key, sub = jax.random.split(s["key"])
        token = _choose(s["logits"], sub, temperature, top_k).astype(jnp.int32)
        # the forward pass's rule, traced: one real token per row
        env, book = step_inputs(token[:, None], jnp.ones((len(ids), 1), bool), s["book"],
                                last_only=True, windows=model.layer_kinds, xp=jnp)
        env.update({cache_name(j): s["caches"][j] for j in range(layers)})
        outs = model.raw_step(weights, env)
        return {"logits": outs["logits"][:, -1], "caches": tuple(outs[cache_name(j)] for j in range(layers)),
                "book": book, "tokens": s["tokens"].at[:, i].set(token), "key": key}

    @jax.jit
    def loop(weights: Any, s: dict[str, Any]) -> jax.Array:
        return jax.lax.fori_loop(0, max_new_tokens, lambda i, st: body(i, st, weights), s)["tokens"]

    return np.asarray(loop(model.weights, state))
