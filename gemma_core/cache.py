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
        k, v = _host_pair(backend, state, "reorder_cache_layer method for beam search")  # [B,K,S,H]
        layers.append(import_cache_layer(backend, k[rows], v[rows], dtype, device))
    return dataclasses.replace(cache, layers=layers, valid=cache.valid[rows].copy(),
                               seen=cache.seen[rows].copy())


def import_cache_layer(backend: Any, keys: np.ndarray, values: np.ndarray, dtype: str,
                       device: str | None) -> Any:
    """A built-in `(keys, values)` layer state from host arrays: `convert_weight` rounds to the
    compute dtype, `asarray` for float64 (which `convert_weight` would round through float32)."""
    if dtype == "float64":
        return backend.asarray(keys, device), backend.asarray(values, device)
    return backend.convert_weight(keys, dtype, device), backend.convert_weight(values, dtype, device)


def _host_pair(backend: Any, state: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(state, tuple) and len(state) == 2):
        raise InputError(f"backend {backend.name!r}: its cache layers are not (keys, values) pairs; "
                         f"it needs a {what}")
    k, v = backend.export_cache_layer(state)
    return np.array(k), np.array(v)


def write_row(backend: Any, cache: KVCache, row: int, source: KVCache, source_row: int, dtype: str,
              device: str | None) -> KVCache:
    """`cache` with row `row` replaced by row `source_row` of `source` (a cache of the same
    `max_length` and length): its slots, valid slots and seen count. The continuous-batching
    engine (`gemma_core.serving`) prefills a joining request apart and splices it in. The layers
    of `cache` may be written in place (the caller owns it); `source` is left as it was.

    A backend may offer `write_cache_row(state, row, source_state, source_row) -> state` to copy
    on its device; otherwise each layer goes through numpy."""
    cache.check_usable()
    if source.max_length != cache.max_length or source.length != cache.length:
        raise InputError(f"write_row: a source of {source.length}/{source.max_length} slots for a cache "
                         f"of {cache.length}/{cache.max_length}")
    hook = getattr(backend, "write_cache_row", None)
    layers = []
    for state, src in zip(cache.layers, source.layers, strict=True):
        if hook is not None:
            layers.append(hook(state, row, src, source_row))
            continue
        k, v = _host_pair(backend, state, "write_cache_row method")
        sk, sv = backend.export_cache_layer(src)
        k[row], v[row] = sk[source_row], sv[source_row]
        layers.append(import_cache_layer(backend, k, v, dtype, device))
    valid, seen = cache.valid.copy(), cache.seen.copy()
    valid[row], seen[row] = source.valid[source_row], source.seen[source_row]
    return dataclasses.replace(cache, layers=layers, valid=valid, seen=seen)


def shift_slots(backend: Any, cache: KVCache, shift: int, dtype: str, device: str | None) -> KVCache:
    """`cache` with every token moved `shift` slots earlier (`shift < 0`: later) and its length
    with them: slot `s` then holds what slot `s + shift` held, each layer rolled along its ring
    (token `t` lives at `t % capacity`). Keys carry their RoPE positions (the `seen` counts), not
    their slots, so a shift changes no logit while the slots it drops (the first `shift`, or the
    last `-shift`) hold no real token, which is refused otherwise. The engine compacts its batch
    with it when the slots run out. Layers may be written in place (the caller owns the cache).

    A backend may offer `shift_cache_layer(state, shift) -> state` to roll on its device."""
    cache.check_usable()
    shift = int(shift)
    length = cache.length - shift
    dropped = cache.valid[:, :shift] if shift > 0 else cache.valid[:, cache.max_length + shift:]
    if not 0 <= length <= cache.max_length or dropped.any():
        raise InputError(f"shift_slots: a shift of {shift} slots would drop real tokens of a cache "
                         f"holding {cache.length} of {cache.max_length} slots")
    hook = getattr(backend, "shift_cache_layer", None)
    layers = []
    for state in cache.layers:
        if hook is not None:
            layers.append(hook(state, shift))
            continue
        k, v = _host_pair(backend, state, "shift_cache_layer method")
        cap = k.shape[2]
        layers.append(import_cache_layer(backend, np.roll(k, -(shift % cap), axis=2),
                                         np.roll(v, -(shift % cap), axis=2), dtype, device))
    return dataclasses.replace(cache, layers=layers, length=length,
                               valid=np.roll(cache.valid, -shift, axis=1))


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
