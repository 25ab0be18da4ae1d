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

A dynamic cache (the one `forward` makes when given neither a cache nor a max_length) grows
when a step overflows it: a new static cache of `grown_length` slots takes the old contents.
Only layers whose capacity changes are rewritten, and those never wrapped (a ring that wrapped
is at its full window, whose size does not depend on `max_length`), so token `t` stays in slot
`t`. `crop_length` checks that a cache can drop its tokens after the first `n` (transformers'
`DynamicCache.crop`).
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
    # grows when a step overflows it (`grown_length`), as transformers' DynamicCache: the caches
    # `Model.forward` makes unsized; sized ones (`new_cache(batch, max_length)`) refuse overflow
    dynamic: bool = dataclasses.field(default=False, compare=False)

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


def reorder_cache(backend: Any, cache: KVCache, rows: np.ndarray, dtype: str,
                  device: str | None) -> KVCache:
    """A new cache whose row `i` is row `rows[i]` of `cache` (beam search: each beam continues
    its parent's cache; `rows` may repeat rows or change the batch size). `cache` is untouched.

    A backend may offer `reorder_cache_layer(state, rows) -> state` to gather on its device;
    otherwise each layer goes through numpy (`export_cache_layer`, then `convert_weight`, or
    `asarray` for float64, whose values `convert_weight` would round through float32), which
    needs the layer state to be a (keys, values) pair as every built-in backend keeps it."""
    cache.check_usable()
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= cache.batch_size)):
        raise InputError(f"rows: expected indices of the cache's {cache.batch_size} rows, got {rows!r}")
    hook = getattr(backend, "reorder_cache_layer", None)
    layers = []
    for state in cache.layers:
        if hook is not None:
            layers.append(hook(state, rows))
            continue
        if not (isinstance(state, tuple) and len(state) == 2):
            raise InputError(f"backend {backend.name!r}: its cache layers are not (keys, values) "
                             "pairs; it needs a reorder_cache_layer method for beam search")
        k, v = backend.export_cache_layer(state)  # [B, K, S, H] numpy
        if dtype == "float64":
            layers.append((backend.asarray(k[rows], device), backend.asarray(v[rows], device)))
        else:
            layers.append((backend.convert_weight(k[rows], dtype, device),
                           backend.convert_weight(v[rows], dtype, device)))
    return dataclasses.replace(cache, layers=layers, valid=cache.valid[rows].copy(),
                               seen=cache.seen[rows].copy())


def grown_length(max_length: int, needed: int, max_positions: int) -> int:
    """The `max_length` a dynamic cache of `max_length` slots grows to for `needed` tokens: the
    next power of two (amortised growth, few compiled shapes), capped at `max_positions`."""
    if needed > max_positions:
        raise InputError(f"input_ids: {needed} tokens exceed max_position_embeddings {max_positions}")
    size = 1 << max(needed - 1, 1).bit_length()
    return max(min(size, max_positions), needed, max_length)


def crop_length(config: GemmaConfig, cache: KVCache, n: int) -> int:
    """The length a crop to `n` leaves (`n < 0` drops the last `-n` tokens; past the length it is
    the length). Raises `InputError` where a sliding ring has wrapped: the tokens the crop's
    window needs were overwritten."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
        raise InputError(f"crop: expected an integer token count, got {n!r}")
    length = cache.length
    keep = length + int(n) if n < 0 else min(int(n), length)
    if keep < 0:
        raise InputError(f"crop: cannot drop {-int(n)} tokens from a cache of {length}")
    if keep == length:
        return keep
    for layer in range(config.num_layers):
        capacity = layer_capacity(config, layer, cache.max_length)
        if length > capacity:  # only sliding layers: a global one holds max_length >= length
            raise InputError(
                f"crop: layer {layer} is a sliding ring of {capacity} slots that has wrapped ({length} "
                f"tokens fed), so tokens before {length - capacity} are overwritten and a crop to {keep} "
                f"cannot restore its window; crop while the cache holds at most {capacity} tokens")
    return keep
