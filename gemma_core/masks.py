"""The attention bookkeeping, written once for every backend: where each key of a layer's
attention comes from (the cache layout), and which keys each query may see (the mask rule).

`gemma_core.step.step_inputs` evaluates the mask once per layer kind (global, or one sliding
window) per step, in whatever array namespace runs the step (numpy on the host, jax.numpy inside a
traced decode loop, keras.ops inside a Keras model); the graph turns each mask into the compute
dtype's additive bias once (`attention_bias`), and every layer of that kind reads it. Backends
never re-derive the rule: `kv_cache` lays its keys out as `reads_after_write` says, and
`attention` adds the bias it is given (so it can call a native fused kernel).

The cache layout. A layer's cache holds `capacity(window, max_length)` slots, token `t` in ring
position `t % capacity`. A step of `t` tokens starting at slot `start`:
- writes first, then attends over the whole buffer (`S = capacity` keys), when the ring cannot
  lose a key some query of the step still needs: one new token (decode: the slot overwritten
  held a token outside every window), or a ring that never wraps (a global layer, whose
  capacity is `max_length`, or a window longer than `max_length`);
- otherwise (a chunk on a sliding ring) attends over the buffer as it was plus the `t` new keys
  (`S = capacity + t`), then writes the last `capacity` of them.
Without a cache (training, one-shot scoring) a layer attends over its `t` new keys only.

The mask rule. Key `j` (cache slot `k_j`, -1 for an empty ring position) is visible to query
`i` (slot `q_i`) iff `k_j >= 0`, `k_j <= q_i`, `k_j > q_i - window` (sliding layers: W keys
including the query itself) and `valid[b, k_j]` (the slot holds a real token, not left padding).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gemma_core.config import GemmaConfig


def layer_kinds(config: GemmaConfig) -> tuple[int | None, ...]:
    """The distinct attention windows of `config`'s layers (None: global), in layer order."""
    return tuple(dict.fromkeys(config.window(i) for i in range(config.num_layers)))


def mask_name(window: int | None) -> str:
    """Step-input name of the boolean mask `[B,1,T,S]` of layers with `window`."""
    return "mask[global]" if window is None else f"mask[window={window}]"


def bias_name(window: int | None) -> str:
    """Graph name of the additive bias made from `mask_name(window)`."""
    return "bias" + mask_name(window)[4:]


def capacity(window: int | None, max_length: int) -> int:
    """Slots a layer's cache holds: `max_length`, or the window for sliding layers."""
    return max_length if window is None else min(window, max_length)


def reads_after_write(t: int, capacity: int, window: int | None) -> bool:
    """Whether a step of `t` tokens writes its keys into a layer's ring before attending over the
    buffer (`S = capacity`), rather than attending over the old buffer plus the new keys
    (`S = capacity + t`). True for decode and for rings that never wrap (see the module text)."""
    return t == 1 or window is None or capacity < window


def key_slots(start: Any, t: int, capacity: int, window: int | None, xp: Any = np) -> Any:
    """`[S]` int: the cache slot of each key a layer's attention reads after `start` slots were
    written, in the layout `reads_after_write` gives, -1 for an empty ring position. `start` may
    be a traced scalar; `t` and `capacity` are static."""
    if reads_after_write(t, capacity, window):
        j = xp.arange(capacity)
        held = j + capacity * ((start + t - 1 - j) // capacity)  # the newest slot at ring position j
        return xp.where(held < 0, -1, held)
    j = xp.arange(capacity + t)
    held = j + capacity * ((start - 1 - j) // capacity)  # ring position j before the write
    return xp.where(j < capacity, xp.where(held < 0, -1, held), start + j - capacity)


def visible(key_slots: Any, query_slots: Any, valid: Any, window: int | None, xp: Any = np) -> Any:
    """Boolean `[B,1,T,S]`: key `j` visible to query `i` of row `b` (the mask rule)."""
    q = query_slots[:, None]  # [T,1]
    k = key_slots[None, :]  # [1,S]
    seen = (k >= 0) & (k <= q)
    if window is not None:
        seen = seen & (k > q - window)
    real = xp.take(valid, xp.maximum(key_slots, 0), axis=1) & (key_slots >= 0)[None, :]  # [B,S]
    return seen[None, None] & real[:, None, None, :]


def attention_mask(key_slots: np.ndarray, query_slots: np.ndarray, valid: np.ndarray,
                   window: int | None) -> np.ndarray:
    """The mask rule in numpy (`gemma mask`, tests): boolean `[B, 1, T, S]`."""
    return visible(np.asarray(key_slots), np.asarray(query_slots), np.asarray(valid), window)
