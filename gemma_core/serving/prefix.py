"""Prefix caching for the engine: recent prompts' caches, so a prompt that begins like one of
them (a shared system prompt, the next turn of a chat) prefills only what differs.

An entry is a one-row cache of the engine's slot count holding a prompt at slots `[0, P)`. A
hit on `c` common tokens copies the entry, crops it to `c` (`Model.crop_cache`: possible while
no sliding ring has wrapped, i.e. `c` within the window, or with no crop at all when the whole
entry is the prefix), moves it to where the request's prompt must end (`shift_slots`), and
feeds the rest of the prompt. Keys hold their RoPE positions, so the result equals a full
prefill of the prompt.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from gemma_core.cache import KVCache, crop_length
from gemma_core.errors import InputError

if TYPE_CHECKING:
    from gemma_core.model import Model


class PrefixCache:
    """The `capacity` most recently used prompt caches (least recently used evicted first);
    hits need at least `smallest` common tokens and leave at least one token to feed."""

    def __init__(self, model: Model, capacity: int, smallest: int = 16) -> None:
        self.model, self.capacity, self.smallest = model, capacity, smallest
        self._entries: collections.OrderedDict[tuple[int, ...], KVCache] = collections.OrderedDict()
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
        entry = self._entries[best_key]
        try:
            crop_length(self.model.config, entry, c)
        except InputError:  # a ring wrapped past the common prefix: the window's keys are gone
            return None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.tokens_saved += c
        copy = self.model.copy_cache(entry)
        return c, self.model.crop_cache(copy, c, donate_cache=True)

    def store(self, ids: Sequence[int], cache: KVCache) -> None:
        """Keep `cache` (one row, the prompt `ids` at slots [0, len(ids))) as an entry."""
        key = tuple(int(t) for t in ids)
        if self.capacity <= 0 or len(key) < self.smallest:
            return
        self._entries[key] = cache
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
