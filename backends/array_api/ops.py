"""The op table written once against the Python Array API standard (2023.12 and later).

Every function below uses only what the standard defines (`xp.matmul`, `xp.take`, `xp.where`,
`xp.concat`, `xp.reshape`, `xp.permute_dims`, ...) on the namespace that
`array_api_compat.array_namespace` gives for the backend's arrays, so the same table runs on
array-api-strict (which raises on anything non-standard), NumPy, PyTorch, JAX, CuPy, Dask and
any other compliant library. Nothing is specific to a library; where the standard is silent
the choice is spelled out here:

- Narrow float dtypes (bfloat16, float16) are not in the standard; a namespace that has them
  (`xp.bfloat16`) may be asked for them. Norms, GELU, soft-caps, RoPE angles and the softmax
  then compute in float32 and round once; products run in the compute dtype (the library's own
  accumulation).
- Indices the standard's `take` reads must be one-dimensional: embeddings flatten the ids.
- The cache is written in place with slice assignment where the namespace's arrays are
  writeable (`array_api_compat.is_writeable_array`), and rebuilt with `xp.where` otherwise
  (JAX): `make_op_table(xp, dtype, in_place)`.
- RoPE's float32 inverse frequencies are host constants made as the NumPy reference makes them.
- The ring position a step writes from is read on the host: `int()` of a 0-d array.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from array_api_compat import device

from gemma_core.masks import reads_after_write

Array = Any  # an array of the namespace in use


def make_op_table(xp: Any, dtype: Any, in_place: bool) -> dict[str, Callable[..., Any]]:
    """The op table on namespace `xp`, computing in its float dtype `dtype`; `in_place` says
    whether `kv_cache` may write the buffers it is given."""
    dt = dtype
    wide = xp.float64 if dt == xp.float64 else xp.float32  # float32 work, float64 for the oracle dtype
    ints = xp.__array_namespace_info__().default_dtypes()["indexing"]
    fmin = float(xp.finfo(dt).min)  # the mask's additive minimum, finite in the dtype

    def up(x: Array) -> Array:
        return xp.astype(x, wide)

    def down(x: Array) -> Array:
        return xp.astype(x, dt)

    def embed(ids: Array, table: Array, *, scale: float) -> Array:
        b, t = ids.shape
        rows = xp.take(table, xp.reshape(ids, (b * t,)), axis=0)  # [B*T,D]
        scale_dt = xp.asarray(scale, dtype=dt, device=device(table))  # rounded to the dtype (rule 1)
        return xp.reshape(rows * scale_dt, (b, t, table.shape[1]))

    def rms_norm(x: Array, w: Array, *, eps: float) -> Array:
        x32 = up(x)
        inv = 1.0 / xp.sqrt(xp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return down(x32 * inv * (1.0 + up(w)))

    def linear(x: Array, w: Array) -> Array:
        return xp.matmul(x, xp.matrix_transpose(w))  # [...,I] @ [I,O]

    def split_heads(x: Array, *, heads: int, head_dim: int) -> Array:
        b, t, _ = x.shape
        return xp.permute_dims(xp.reshape(x, (b, t, heads, head_dim)), (0, 2, 1, 3))  # [B,N,T,H]

    def merge_heads(x: Array) -> Array:
        b, n, t, h = x.shape
        return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (b, t, n * h))

    def rope_table(positions: Array, *, head_dim: int, theta: float,
                   scaling: float) -> tuple[Array, Array]:
        f32 = xp.float32
        inv_freq = xp.asarray(inverse_frequencies(head_dim, theta, scaling), device=device(positions))
        freqs = xp.astype(positions, f32)[..., None] * inv_freq  # [B,T,H/2], float32 angles
        angles = xp.concat([freqs, freqs], axis=-1)[:, None, ...]  # [B,1,T,H]
        angles = xp.astype(angles, wide)
        return down(xp.cos(angles)), down(xp.sin(angles))

    def rope(x: Array, cos: Array, sin: Array) -> Array:
        half = x.shape[-1] // 2
        rotated = xp.concat([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attention_bias(mask: Array) -> Array:
        dev = device(mask)
        return xp.where(mask, xp.asarray(0, dtype=dt, device=dev), xp.asarray(fmin, dtype=dt, device=dev))

    def kv_cache(k: Array, v: Array, layer: tuple[Array, Array], query_slots: Array, *,
                 window: int | None) -> tuple[Array, Array, Any]:
        kbuf, vbuf = layer  # [B,K,C,H], slot s at s % C
        cap, start, t = kbuf.shape[2], int(query_slots[0]), k.shape[2]
        dev = device(kbuf)
        old = (kbuf, vbuf)
        kept = range(max(0, t - cap), t)  # only the last `cap` new tokens fit
        if in_place:
            old = (xp.asarray(kbuf, copy=True), xp.asarray(vbuf, copy=True))  # written below
            src = kept.start if kept else 0
            for lo, hi in _runs([(start + i) % cap for i in kept]):  # at most two slices of the ring
                kbuf[:, :, lo:hi, :] = k[:, :, src:src + hi - lo, :]
                vbuf[:, :, lo:hi, :] = v[:, :, src:src + hi - lo, :]
                src += hi - lo
        else:  # functional: every ring slot from the new token written there, or as it was
            source = [-1] * cap
            for i in kept:
                source[(start + i) % cap] = i
            index = xp.asarray([max(s, 0) for s in source], dtype=ints, device=dev)
            written = xp.asarray([s >= 0 for s in source], device=dev)[:, None]  # [C,1]
            kbuf = xp.where(written, xp.take(k, index, axis=2), kbuf)
            vbuf = xp.where(written, xp.take(v, index, axis=2), vbuf)
        if reads_after_write(t, cap, window):
            return kbuf, vbuf, (kbuf, vbuf)
        keys = xp.concat([old[0], k], axis=2)  # [B,K,C+T,H]: the ring before the write, then the new keys
        return keys, xp.concat([old[1], v], axis=2), (kbuf, vbuf)

    def attention(q: Array, keys: Array, values: Array, bias: Array, *, scale: float,
                  softcap: float | None) -> Array:
        b, n, t, h = q.shape
        kv = keys.shape[1]
        # query head h reads kv head h // (N/K): group the query heads under their kv head
        q5 = xp.reshape(q, (b, kv, n // kv, t, h))  # [B,K,G,T,H]
        scores = xp.matmul(q5, xp.matrix_transpose(keys)[:, :, None, ...]) * scale  # [B,K,G,T,S]
        if softcap is not None:
            scores = down(xp.tanh(up(scores) / softcap) * softcap)  # before the bias (rule 4)
        scores = up(scores + bias[:, :, None, ...])  # softmax in float32
        scores = scores - xp.max(scores, axis=-1, keepdims=True)
        probs = xp.exp(scores)
        probs = down(probs / xp.sum(probs, axis=-1, keepdims=True))
        out = xp.matmul(probs, values[:, :, None, ...])  # [B,K,G,T,H]
        return xp.reshape(out, (b, n, t, h))

    def qlinear(x: Array, values: Array, scale: Array, *, scheme: str, group_size: int | None) -> Array:
        return linear(x, values)  # `values` is the weight dequantised once (ArrayAPIBackend)

    def qembed(ids: Array, values: Array, scale: Array, *, scheme: str, group_size: int | None,
               scale_by: float) -> Array:
        return embed(ids, values, scale=scale_by)

    def lora(x: Array, a: Array, b: Array, *, scale: float) -> Array:
        return down(up(linear(linear(x, a), b)) * scale)  # the scale in float32, one rounding

    def split(x: Array, *, sizes: tuple[int, ...]) -> tuple[Array, ...]:
        bounds = [0, *itertools.accumulate(sizes)]
        return tuple(x[..., lo:hi] for lo, hi in itertools.pairwise(bounds))

    def gelu_tanh(x: Array) -> Array:
        x32 = up(x)
        inner = math.sqrt(2.0 / math.pi) * (x32 + 0.044715 * x32 * x32 * x32)
        return down(0.5 * x32 * (1.0 + xp.tanh(inner)))

    def mul(a: Array, b: Array) -> Array:
        return a * b

    def add(a: Array, b: Array) -> Array:
        return a + b

    def softcap(x: Array, *, cap: float) -> Array:
        return down(xp.tanh(up(x) / cap) * cap)

    def gather_positions(x: Array, index: Array) -> Array:
        return xp.take(x, index, axis=1)  # [B,P,D]

    def pool_last_token(x: Array, ids: Array, *, pad_id: int) -> Array:
        b, t = ids.shape
        steps = xp.arange(t, dtype=ints, device=device(ids))
        last = xp.argmax(xp.where(ids != pad_id, steps, 0), axis=1)  # rightmost non-pad, else 0
        rows = xp.arange(b, dtype=ints, device=device(ids)) * t + xp.astype(last, ints)
        return xp.take(xp.reshape(x, (b * t, x.shape[2])), rows, axis=0)  # [B,C]

    return {
        "embed": embed, "rms_norm": rms_norm, "linear": linear, "split_heads": split_heads,
        "merge_heads": merge_heads, "rope_table": rope_table, "rope": rope,
        "attention_bias": attention_bias, "kv_cache": kv_cache, "attention": attention,
        "qlinear": qlinear, "qembed": qembed, "lora": lora, "split": split, "gelu_tanh": gelu_tanh,
        "mul": mul,
        "add": add, "softcap": softcap, "gather_positions": gather_positions,
        "pool_last_token": pool_last_token,
    }


@functools.lru_cache(maxsize=64)
def inverse_frequencies(head_dim: int, theta: float, scaling: float) -> np.ndarray:
    """RoPE's float32 inverse frequencies `[H/2]`, divided by the linear scaling: constants made
    on the host as the NumPy reference makes them, since the standard leaves `pow`'s accuracy to
    the library (torch's float32 pow differs from numpy's in the last bit)."""
    f32 = np.float32
    inv_freq = f32(1.0) / (f32(theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)))
    return inv_freq / f32(scaling)


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """Consecutive ring positions as half-open (lo, hi) runs: at most two for a ring write."""
    runs: list[tuple[int, int]] = []
    for s in slots:
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], s + 1)
        else:
            runs.append((s, s + 1))
    return runs
