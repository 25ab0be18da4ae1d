"""A third-party backend written from scratch against the backend contract (docs/backends.md).

`backend` is a complete, small NumPy backend: every op kind of the "core" group and the
classification head, in float32 only. It imports nothing of the built-in backends; the op
signatures and numerics are those of the op vocabulary (`gemma_core.graph`'s docstring), and the
attention bookkeeping comes from the spec (`gemma_core.masks`). It declares what it leaves out
(no bfloat16, float16 or float64; no "quantized" group; the CPU only), so `gemma conformance`
skips those cells as not supported and passes the rest.

`incomplete` lacks one required core op kind, which the conformance runner must name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gemma_core.backend import Backend
from gemma_core.errors import BackendError
from gemma_core.masks import reads_after_write
from gemma_core.opset import kinds_of

F32 = np.float32  # the one compute dtype; every constant is made float32 so nothing widens


# ---- the op table: one function per op kind, named as the kind ----------------------------------

def embed(ids: np.ndarray, table: np.ndarray, *, scale: float) -> np.ndarray:
    return table[ids] * F32(scale)  # the scale rounded to the compute dtype first (rule 1)


def rms_norm(x: np.ndarray, w: np.ndarray, *, eps: float) -> np.ndarray:
    inv = F32(1) / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + F32(eps))
    return x * inv * (F32(1) + w)  # weights are stored centred on zero (rule 2)


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x @ w.T  # w is [out, in], no bias


def split_heads(x: np.ndarray, *, heads: int, head_dim: int) -> np.ndarray:
    b, t, _ = x.shape
    return x.reshape(b, t, heads, head_dim).transpose(0, 2, 1, 3)  # [B,N,T,H]


def merge_heads(x: np.ndarray) -> np.ndarray:
    b, n, t, h = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, n * h)


def rope_table(positions: np.ndarray, *, head_dim: int, theta: float,
               scaling: float) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = F32(1) / F32(theta) ** (np.arange(0, head_dim, 2, dtype=F32) / F32(head_dim))
    angles = positions.astype(F32)[..., None] * (inv_freq / F32(scaling))  # [B,T,H/2], float32
    angles = np.concatenate([angles, angles], axis=-1)[:, None]  # halves duplicated, [B,1,T,H]
    return np.cos(angles), np.sin(angles)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate-half (NeoX)
    return x * cos + rotated * sin


def attention_bias(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, F32(0), np.finfo(F32).min)  # the dtype's finite minimum, never -inf


def kv_cache(k: np.ndarray, v: np.ndarray, layer: tuple[np.ndarray, np.ndarray],
             query_slots: np.ndarray, *, window: int | None) -> tuple[np.ndarray, np.ndarray, Any]:
    """Functional: the layer passed is never changed, the written buffers are new arrays (so
    `cache_in_place = False` below, and forward never copies a cache for this backend)."""
    old_k, old_v = layer  # [B,K,C,H]; token t lives in ring position t % C
    capacity, t = old_k.shape[2], k.shape[2]
    kept = slice(max(0, t - capacity), t)  # of a long chunk only the last `capacity` tokens stay
    ring = query_slots[kept] % capacity
    new_k, new_v = old_k.copy(), old_v.copy()
    new_k[:, :, ring], new_v[:, :, ring] = k[:, :, kept], v[:, :, kept]
    if reads_after_write(t, capacity, window):  # attend over the buffer after the write
        return new_k, new_v, (new_k, new_v)
    # a chunk on a sliding ring: the buffer before the write, then the new keys (S = C + T)
    return np.concatenate([old_k, k], axis=2), np.concatenate([old_v, v], axis=2), (new_k, new_v)


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, bias: np.ndarray, *,
              scale: float, softcap: float | None) -> np.ndarray:
    b, n, t, h = q.shape
    kv_heads = keys.shape[1]
    q = q.reshape(b, kv_heads, n // kv_heads, t, h)  # query head i reads kv head i // (N/K)
    scores = (q @ keys[:, :, None].swapaxes(-1, -2)) * F32(scale)  # [B,K,N/K,T,S]
    if softcap is not None:  # Gemma 2: soft-capped before the bias is added
        scores = np.tanh(scores / F32(softcap)) * F32(softcap)
    scores = scores + bias[:, :, None]  # [B,1,1,T,S]
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs = probs / probs.sum(axis=-1, keepdims=True)
    return (probs @ values[:, :, None]).reshape(b, n, t, h)


def split(x: np.ndarray, *, sizes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=-1))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    c = F32(math.sqrt(2.0 / math.pi))
    return F32(0.5) * x * (F32(1) + np.tanh(c * (x + F32(0.044715) * x * x * x)))


def mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a * b


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def softcap(x: np.ndarray, *, cap: float) -> np.ndarray:
    return np.tanh(x / F32(cap)) * F32(cap)


def gather_positions(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    return x[:, index]


def pool_last_token(x: np.ndarray, ids: np.ndarray, *, pad_id: int) -> np.ndarray:
    last = (np.arange(ids.shape[1]) * (ids != pad_id)).argmax(axis=1)  # rightmost non-pad, else 0
    return x[np.arange(len(x)), last]


# ---- the backend object: what it declares, and how arrays get in and out -----------------------

class ExampleBackend(Backend):
    """float32 NumPy on the CPU, written directly against the contract."""

    name = "example"
    dtypes = ("float32",)  # no bfloat16, float16 or float64: their cells are skipped
    op_groups = ("core", "classification")  # no qlinear / qembed: quantised cases are skipped
    devices = ("cpu",)
    cache_in_place = False  # kv_cache above returns new buffers

    def make_op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        self._check(dtype, None)
        return {kind: globals()[kind] for kind in kinds_of(self.op_groups)}

    def convert_weight(self, w: np.ndarray, dtype: str, device: str | None) -> Any:
        self._check(dtype, device)
        return np.asarray(w, F32)

    def asarray(self, x: np.ndarray, device: str | None) -> Any:
        self._check("float32", device)
        return np.asarray(x)  # ids, positions, slots and masks keep their integer/bool dtype

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def new_cache_layer(self, batch: int, kv_heads: int, capacity: int, head_dim: int,
                        dtype: str, device: str | None) -> Any:
        self._check(dtype, device)
        shape = (batch, kv_heads, capacity, head_dim)
        return np.zeros(shape, F32), np.zeros(shape, F32)

    def export_cache_layer(self, state: Any) -> tuple[np.ndarray, np.ndarray]:
        keys, values = state
        return np.array(keys), np.array(values)

    def _check(self, dtype: str, device: str | None) -> None:
        if dtype not in self.dtypes:
            raise BackendError(f"dtype: backend {self.name!r} computes in float32 only, got {dtype!r}")
        if not self.supports_device(device):
            raise BackendError(f"device: backend {self.name!r} runs on the CPU only, got {device!r}")


class IncompleteBackend(ExampleBackend):
    """The example without `softcap`, a required core op: conformance fails its op-table cell."""

    name = "incomplete"

    def make_op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        table = dict(super().make_op_table(dtype))
        del table["softcap"]
        return table


backend = ExampleBackend()
incomplete = IncompleteBackend()
