"""The KV-cache contract, shared by every backend.

Per layer, keys and values `[B, K, S, H]` in the compute dtype, keys after RoPE (and after the
Gemma 3 key norm), plus the number of cache slots written. A global layer holds `max_length`
slots; a sliding layer holds `min(window, max_length)` slots used as a ring buffer: token `t`
lives in slot `t % capacity`. The exported (numpy) form of a layer is its last
`min(length, capacity)` tokens in chronological order, the same for every backend.

Slots count every token fed, left padding included, as in transformers; `valid` records which
slots are real tokens and `seen` how many real tokens each row has had (its next RoPE position).

A cache is a value: `Model.forward(ids, cache=c)` never changes `c` (a backend whose step updates
buffers in place, or donates them, runs on a copy), so `c` can be continued twice (a forked
prefix). `forward(..., donate_cache=True)` skips the copy for speed and leaves `c` spent: any
later use of it is refused with an `InputError` rather than computing on clobbered buffers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_core.config import GemmaConfig
from gemma_core.errors import InputError


def layer_capacity(config: GemmaConfig, layer: int, max_length: int) -> int:
    """Slots a layer's static cache needs: `max_length`, or the window for sliding layers."""
    window = config.window(layer)
    return max_length if window is None else min(window, max_length)


def ring_order(length: int, capacity: int) -> np.ndarray:
    """Slot indices of the last `min(length, capacity)` tokens, oldest first."""
    start = max(0, length - capacity)
    return np.arange(start, length) % capacity


@dataclasses.dataclass
class KVCache:
    """A static cache: backend layer states plus host-side bookkeeping (small numpy arrays).

    A value: a forward pass returns a new `KVCache` and leaves the one passed in as it was, so
    one prefix cache can feed several continuations. Only `forward(..., donate_cache=True)` (the
    decode loops of `gemma_core.generation` and `chat`, which own their caches) lets the step
    reuse the buffers in place; it marks the cache passed `spent`, and a spent cache is refused
    everywhere after (`Model.copy_cache` first to keep a fork).
    """

    layers: list[Any]
    length: int
    max_length: int
    valid: np.ndarray  # [B, max_length] bool: slot holds a real (non-pad) token
    seen: np.ndarray  # [B] int: real tokens per row so far
    spent: bool = dataclasses.field(default=False, compare=False)  # handed to a step to reuse

    @property
    def batch_size(self) -> int:
        """Rows in the cache."""
        return int(self.valid.shape[0])

    def check_usable(self) -> None:
        """Raise `InputError` if this cache was handed over (`donate_cache=True`) already."""
        if self.spent:
            raise InputError("cache: this cache was handed to forward(donate_cache=True), which may "
                             "have overwritten or freed its buffers; continue from the cache that call "
                             "returned, or pass a copy (Model.copy_cache) to fork it")


@dataclasses.dataclass(frozen=True)
class CacheState:
    """A cache exported to the contract layout, in numpy, for comparisons across backends."""

    keys: tuple[np.ndarray, ...]  # per layer [B, K, S_layer, H]
    values: tuple[np.ndarray, ...]
    length: int
    seen: np.ndarray
    real: tuple[np.ndarray, ...]  # per layer [B, S_layer] bool: the slot holds a real token, not a pad


def available_memory() -> int | None:
    """Bytes of memory the OS says are available (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_cache_fits(config: GemmaConfig, batch: int, max_length: int, dtype: str,
                      device: str | None) -> None:
    """Refuse a host cache larger than the memory available, before allocating any of it."""
    if device not in (None, "cpu"):
        return
    width = np.dtype(np.float64 if dtype == "float64" else np.float32 if dtype == "float32" else np.float16)
    slots = sum(layer_capacity(config, i, max_length) for i in range(config.num_layers))
    need = 2 * batch * config.num_kv_heads * config.head_dim * slots * width.itemsize
    free = available_memory()
    if free is not None and need > free:
        raise InputError(f"max_length: a KV cache of {batch} x {max_length} tokens needs "
                         f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB of memory "
                         "available; ask for fewer new tokens or a smaller batch")


def batch_ids(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token id lists into `(ids [B, T], attention_mask [B, T])`."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise InputError("sequences: expected one or more non-empty token lists")
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, np.int64)
    mask = np.zeros((len(sequences), width), np.int64)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    return ids, mask
