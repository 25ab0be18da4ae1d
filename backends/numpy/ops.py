"""The reference op table in NumPy: tiny functions that every other backend is compared with.

Arrays are held in float32 (float64 for the oracle dtype). For bfloat16 and float16 every op
computes in float32 and rounds its result to the compute dtype through `ml_dtypes`, which is how
PyTorch evaluates each op of a bf16 model (fp32 accumulation, one rounding per op output).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import ml_dtypes
import numpy as np

from gemma_core.masks import reads_after_write
from gemma_core.opset import OP_GROUPS, table_from
from gemma_core.quant import dequantize

STORAGE = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def compute_dtype(dtype: str) -> np.dtype:
    """The numpy dtype arrays are held in: float64 for the oracle, float32 otherwise."""
    return np.dtype(np.float64) if dtype == "float64" else np.dtype(np.float32)


def make_rounder(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    """Round an array to `dtype`'s precision, keeping it in the compute dtype."""
    acc, store = compute_dtype(dtype), STORAGE[dtype]
    if store == acc:
        return lambda x: np.asarray(x, acc)
    return lambda x: np.asarray(x).astype(store).astype(acc)


def rope_angles(positions: np.ndarray, head_dim: int, theta: float, scaling: float) -> np.ndarray:
    """Angles `[B, T, H]` in float32, as the contract requires of every dtype (even the float64
    oracle): float32 inverse frequencies divided by the linear scaling, times float32 positions,
    halves duplicated (rotate-half layout)."""
    f32 = np.float32
    inv_freq = f32(1.0) / (f32(theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)))
    inv_freq = inv_freq / f32(scaling)
    freqs = positions.astype(f32)[..., None] * inv_freq  # [B,T,H/2]
    return np.concatenate([freqs, freqs], axis=-1)


class Policy:
    """How one compute dtype evaluates: arrays held in `acc`, each op result rounded by `rnd`, masks
    using `fmin`; bound first to every op function (`gemma_core.opset.table_from`)."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.acc = compute_dtype(dtype)
        self.rnd = make_rounder(dtype)
        # bf16 and fp16 masks use their own finite minimum, as transformers does.
        self.fmin = self.acc.type(ml_dtypes.finfo(STORAGE[dtype]).min)
        # id(stored values) -> (weakref to them, dequantised weight): one dequantisation per array
        self.dequantized: dict[int, tuple[weakref.ref, np.ndarray]] = {}


def embed(p: Policy, ids: np.ndarray, table: np.ndarray, *, scale: float) -> np.ndarray:
    return p.rnd(table[ids] * p.rnd(p.acc.type(scale)))


def rms_norm(p: Policy, x: np.ndarray, w: np.ndarray, *, eps: float) -> np.ndarray:
    x32 = x.astype(np.promote_types(x.dtype, np.float32))
    inv = 1.0 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + x32.dtype.type(eps))
    return p.rnd(x32 * inv * (1.0 + w.astype(x32.dtype)))


def linear(p: Policy, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return p.rnd(x @ w.T)


def split_heads(p: Policy, x: np.ndarray, *, heads: int, head_dim: int) -> np.ndarray:
    b, t, _ = x.shape
    return x.reshape(b, t, heads, head_dim).transpose(0, 2, 1, 3)


def merge_heads(p: Policy, x: np.ndarray) -> np.ndarray:
    b, n, t, h = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, n * h)


def rope_table(p: Policy, positions: np.ndarray, *, head_dim: int, theta: float,
               scaling: float) -> tuple[np.ndarray, np.ndarray]:
    angles = rope_angles(positions, head_dim, theta, scaling).astype(p.acc)[:, None]  # [B,1,T,H]
    return p.rnd(np.cos(angles)), p.rnd(np.sin(angles))


def rope(p: Policy, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return p.rnd(p.rnd(x * cos) + p.rnd(rotated * sin))


def attention_bias(p: Policy, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, p.acc.type(0), p.fmin)


def kv_cache(p: Policy, k: np.ndarray, v: np.ndarray, layer: tuple[np.ndarray, np.ndarray],
             query_slots: np.ndarray, *, window: int | None) -> tuple[np.ndarray, np.ndarray, Any]:
    kbuf, vbuf = layer  # [B,K,C,H], slot t at t % C, written in place
    cap, t = kbuf.shape[2], k.shape[2]
    kept = slice(max(0, t - cap), t)  # only the last `cap` new tokens fit
    ring = query_slots[kept] % cap
    if reads_after_write(t, cap, window):
        kbuf[:, :, ring], vbuf[:, :, ring] = k[:, :, kept], v[:, :, kept]
        return kbuf, vbuf, (kbuf, vbuf)
    keys, values = np.concatenate([kbuf, k], axis=2), np.concatenate([vbuf, v], axis=2)  # [B,K,C+T,H]
    kbuf[:, :, ring], vbuf[:, :, ring] = k[:, :, kept], v[:, :, kept]
    return keys, values, (kbuf, vbuf)


def attention(p: Policy, q: np.ndarray, keys: np.ndarray, values: np.ndarray, bias: np.ndarray, *,
              scale: float, softcap: float | None) -> np.ndarray:
    rnd, acc = p.rnd, p.acc
    groups = q.shape[1] // keys.shape[1]
    keys = np.repeat(keys, groups, axis=1)  # query head h reads kv head h // groups
    values = np.repeat(values, groups, axis=1)
    scores = rnd(rnd(q @ keys.transpose(0, 1, 3, 2)) * acc.type(scale))  # [B,N,T,S]
    if softcap is not None:
        scores = rnd(rnd(np.tanh(rnd(scores / acc.type(softcap)))) * acc.type(softcap))
    scores = rnd(scores + bias).astype(np.promote_types(acc, np.float32))  # visible keys: + 0, exact
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs = rnd(probs / probs.sum(axis=-1, keepdims=True))
    return rnd(probs @ values)  # [B,N,T,H]


def dequantized_weight(p: Policy, values: np.ndarray, scale: np.ndarray, scheme: str,
                       group_size: int | None) -> np.ndarray:
    """The dequantised weight in the compute dtype, made once per stored array (and dropped
    with it)."""
    cache = p.dequantized
    key = id(values)
    entry = cache.get(key)
    if entry is None or entry[0]() is not values:
        w = dequantize(values, scale, scheme, group_size)
        cache[key] = (weakref.ref(values, lambda _: cache.pop(key, None)), p.rnd(w.astype(p.acc)))
    return cache[key][1]


def qlinear(p: Policy, x: np.ndarray, values: np.ndarray, scale: np.ndarray, *, scheme: str,
            group_size: int | None) -> np.ndarray:
    return linear(p, x, dequantized_weight(p, values, scale, scheme, group_size))


def qembed(p: Policy, ids: np.ndarray, values: np.ndarray, scale: np.ndarray, *, scheme: str,
           group_size: int | None, scale_by: float) -> np.ndarray:
    return embed(p, ids, dequantized_weight(p, values, scale, scheme, group_size), scale=scale_by)


def lora(p: Policy, x: np.ndarray, a: np.ndarray, b: np.ndarray, *, scale: float) -> np.ndarray:
    return p.rnd(linear(p, linear(p, x, a), b) * p.acc.type(scale))  # PEFT: B(A(x)) * scale


def split(p: Policy, x: np.ndarray, *, sizes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=-1))


def gelu_tanh(p: Policy, x: np.ndarray) -> np.ndarray:
    c = p.acc.type(np.sqrt(2.0 / np.pi))
    return p.rnd(0.5 * x * (1.0 + np.tanh(c * (x + p.acc.type(0.044715) * x**3))))


def mul(p: Policy, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return p.rnd(a * b)


def add(p: Policy, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return p.rnd(a + b)


def softcap(p: Policy, x: np.ndarray, *, cap: float) -> np.ndarray:
    return p.rnd(p.rnd(np.tanh(p.rnd(x / p.acc.type(cap)))) * p.acc.type(cap))


def gather_positions(p: Policy, x: np.ndarray, index: np.ndarray) -> np.ndarray:
    return x[:, index]


def pool_last_token(p: Policy, x: np.ndarray, ids: np.ndarray, *, pad_id: int) -> np.ndarray:
    last = (np.arange(ids.shape[1]) * (ids != pad_id)).argmax(axis=1)  # rightmost non-pad
    return x[np.arange(len(x)), last]


def make_op_table(dtype: str, groups: Iterable[str] = tuple(OP_GROUPS)) -> dict[str, Callable[..., Any]]:
    """The op table computing in `dtype` (float64, float32, bfloat16 or float16): this module's op
    functions for the kinds of `groups` (by default all), named by `gemma_core.opset`."""
    return table_from(sys.modules[__name__], Policy(dtype), groups)
