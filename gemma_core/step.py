"""A step's inputs from (ids, mask, cache): the one place where RoPE positions, cache slots, the
valid-slot mask, the attention masks and the logit index are computed.

The rule is written once against an array namespace `xp` (numpy on the host by default; jax.numpy
inside a traced decode loop, `keras.ops` inside a Keras model) and uses only functional array
operations, so it runs unchanged under tracing:

- positions: the running count of real tokens, `seen + cumsum(mask) - 1`, 0 at pads (as
  transformers' generate computes them for left padding);
- query_slots: `arange(start, start + T)`, the cache slots the new tokens take (pads included);
- valid (bookkeeping, read by the masks): the cache's valid slots with `valid[:, start:start + T] = mask`;
- logit_index: `[T - 1]` when only the last position's logits are wanted, else `arange(T)`;
- one attention mask `[B,1,T,S]` per layer kind (`gemma_core.masks`: the cache layout and the
  mask rule), named `masks.mask_name(window)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from gemma_core import masks


class Bookkeeping(NamedTuple):
    """A cache's host-side counters (`KVCache.length/valid/seen`), the state a step advances.
    A NamedTuple, so it is also a pytree a jitted loop can carry."""

    length: Any  # slots written so far (int, or a traced scalar)
    valid: Any  # [B, max_length] bool: slot holds a real (non-pad) token
    seen: Any  # [B] int: real tokens per row so far (the next RoPE position)

    @property
    def max_length(self) -> int:
        """Slots the cache holds."""
        return int(self.valid.shape[1])


def step_inputs(ids: Any, mask: Any, book: Bookkeeping | None = None, *, last_only: bool = False,
                windows: Sequence[int | None] = (), xp: Any = np) -> tuple[dict[str, Any], Bookkeeping]:
    """The step inputs (`gemma_core.graph.GRAPH_INPUTS` and the masks of `windows`, the layer
    kinds `masks.layer_kinds(config)`) of `ids [B,T]` with `mask [B,T]` (bool, True for real
    tokens) fed after `book`, and the bookkeeping after the step. `book=None` means no cache:
    the step's own T slots, nothing seen before, each layer attending over its new keys only.
    Arrays are `xp`'s; the caller checks that T new slots fit."""
    t = xp.shape(ids)[1]
    count = xp.cumsum(xp.where(mask, 1, 0), axis=1)  # [B,T] real tokens up to each position
    if book is None:
        start, seen, valid = 0, 0, mask
    else:
        start, seen = book.length, book.seen[:, None]
        cols = xp.arange(xp.shape(book.valid)[1])  # [M]
        fresh = (cols >= start) & (cols < start + t)
        placed = xp.take(mask, xp.clip(cols - start, 0, t - 1), axis=1)  # [B,M]: mask[:, col - start]
        valid = xp.where(fresh[None, :], placed, book.valid)  # [B,M]
    query_slots = start + xp.arange(t)  # [T]
    inputs = {
        "ids": ids,
        "positions": xp.where(mask, seen + count - 1, 0),  # [B,T]
        "query_slots": query_slots,
        "logit_index": xp.arange(t - 1, t) if last_only else xp.arange(t),  # [P]
    }
    for window in windows:
        if book is None:  # no cache: the new keys only
            keys = query_slots
        else:
            keys = masks.key_slots(start, t, masks.capacity(window, book.max_length), window, xp)
        inputs[masks.mask_name(window)] = masks.visible(keys, query_slots, valid, window, xp)
    new_seen = count[:, -1] if book is None else book.seen + count[:, -1]
    return inputs, Bookkeeping(start + t, valid, new_seen)
