"""Prefix caching for the engine: recent prompts' caches, so a prompt that begins like one of
them (a shared system prompt, the next turn of a chat) prefills only what differs.

An entry is a row of the prefill cache a prompt was computed in, kept as it is (storing costs
nothing; the prefill caches of the two latest admissions at most stay alive). A hit on `c`
common tokens gathers that row (`reorder_cache`), moves its tokens to slots `[0, P)`
(`shift_slots`), crops it to `c` (`Model.crop_cache`: possible while no sliding ring has
wrapped, i.e. `c` within the window, or with no crop at all when the whole entry is the
prefix); the engine then moves it to where the request's prompt must end and feeds the rest.
Keys hold their RoPE positions, so the result equals a full prefill of the prompt.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from gemma_core.cache import KVCache, layer_capacity, reorder_cache, shift_slots

if TYPE_CHECKING:
    from gemma_core.model import Model


class PrefixCache:
    """The `capacity` most recently used prompt caches (least recently used evicted first);
    hits need at least `smallest` common tokens and leave at least one token to feed."""

    def __init__(self, model: Model, capacity: int, smallest: int = 16, sources: int = 2) -> None:
        self.model, self.capacity, self.smallest, self.sources = model, capacity, smallest, sources
        # prompt -> (the prefill cache, its row, the prompt's first slot)
        self._entries: collections.OrderedDict[tuple[int, ...], tuple[KVCache, int, int]] = \
            collections.OrderedDict()
        self.hits = self.tokens_saved = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int], bucket: Callable[[int], int] | None = None
               ) -> tuple[int, KVCache] | None:
        """`(c, cache)`: an independent copy of the best entry cropped to the `c` first tokens
        of `ids` it shares, or None. `bucket(n)`: the rest of the prompt is fed in that many tokens
        (compiled steps' shape buckets), reached by feeding more of the prompt again, never by
        padding (pads between the prefix and the rest would break the row's contiguous slots)."""
        if not self._entries:
            return None
        prompt = np.asarray(ids)
        best, best_key = 0, None
        for key in self._entries:
            n = min(len(key), len(prompt) - 1)
            same = np.asarray(key[:n]) == prompt[:n]
            c = n if same.all() else int(np.argmin(same))
            if c > best:
                best, best_key = c, key
        if best_key is None:
            return None
        rest = len(prompt) - best
        rest = min(len(prompt), bucket(rest)) if bucket is not None else rest
        c = len(prompt) - rest
        if c < self.smallest:
            return None
        source, row, first = self._entries[best_key]
        model, config = self.model, self.model.config
        if c < len(best_key) and any(len(best_key) > layer_capacity(config, i, source.max_length)
                                     for i in range(config.num_layers)):
            return None  # a ring wrapped past the common prefix: the window's keys are gone
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.tokens_saved += c
        one = reorder_cache(model.backend, source, np.array([row]), model.dtype, model.device)
        one = shift_slots(model.backend, one, first, model.dtype, model.device)  # at [0, P)
        return c, model.crop_cache(one, c, donate_cache=True)

    def store(self, ids: Sequence[int], cache: KVCache, row: int, first: int) -> None:
        """Keep row `row` of `cache` (the prompt `ids` at slots [first, first + len(ids))) as an
        entry; `cache` must not change afterwards (the engine's prefill caches never do)."""
        key = tuple(int(t) for t in ids)
        if self.capacity <= 0 or len(key) < self.smallest:
            return
        self._entries[key] = (cache, row, first)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity or len(
                {id(v[0]) for v in self._entries.values()}) > self.sources:
            self._entries.popitem(last=False)
