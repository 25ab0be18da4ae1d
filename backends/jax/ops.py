"""The op table in JAX (jax.numpy / lax), pure functions so that a whole step traces under jit.

Same names and semantics as the NumPy reference (gemma_core.graph). The cache is functional:
`kv_cache` returns updated buffers (`.at[].set`), which XLA updates in place when the step is
jitted with the cache donated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gemma_core.quant import NF4

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "float64": jnp.float64}


def ring_slots(capacity: int, end: jax.Array) -> jax.Array:
    """Absolute slot held by each ring position after `end` tokens (-1 where empty)."""
    j = jnp.arange(capacity)
    slots = j + capacity * jnp.floor_divide(end - 1 - j, capacity)
    return jnp.where(slots < 0, -1, slots)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def dequantize(values: jax.Array, scale: jax.Array, scheme: str, group_size: int | None) -> jax.Array:
    """Float32 weight rows `[..., I]` of gemma-core quantised values (int8 `[..., I]`; 4-bit
    codes nibble-packed, uint8 `[..., I/2]`, or one per byte, `[..., I]`, see
    JaxBackend.prepare_quantized) and their float32 scales (gemma_core.quant)."""
    if scheme == "int8":
        return values.astype(jnp.float32) * scale[..., None]
    inputs = scale.shape[values.ndim - 1] * group_size
    codes = values
    if values.shape[-1] != inputs:
        codes = jnp.stack([values & 15, values >> 4], axis=-1).reshape(*values.shape[:-1], -1)
    groups = codes.reshape(*codes.shape[:-1], -1, group_size)
    if scheme == "int4":  # codes * step + offset per group
        out = groups.astype(jnp.float32) * scale[..., 0:1] + scale[..., 1:2]
    else:
        out = jnp.asarray(NF4)[groups] * scale[..., None]
    return out.reshape(codes.shape)


def make_op_table(dtype: str, cpu: bool | None = None) -> dict[str, Callable[..., Any]]:
    """The op table computing in `dtype`, with the CPU's formulations of the products or (`cpu`
    False) the accelerators' ones; by default those of JAX's default backend."""
    dt = DTYPES[dtype]
    f32 = jnp.float64 if dtype == "float64" else jnp.float32
    fmin = jnp.finfo(dt).min
    if cpu is None:
        cpu = jax.default_backend() == "cpu"

    def embed(ids: jax.Array, table: jax.Array, *, scale: float) -> jax.Array:
        return jnp.take(table, ids, axis=0) * jnp.asarray(scale, dt)  # the scale rounded to the dtype

    def rms_norm(x: jax.Array, w: jax.Array, *, eps: float) -> jax.Array:
        x32 = x.astype(f32)
        # 1 / sqrt rather than lax.rsqrt, which differs from torch.rsqrt in the last bits
        y = x32 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return (y * (1.0 + w.astype(f32))).astype(x.dtype)

    def dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
        """einsum with float32 accumulation, one rounding to the compute dtype. XLA's CPU backend
        runs bf16 dots with preferred_element_type=f32, or dots fed by a fused convert, through a
        slow loop (measured 350 ms for the 262144 x 640 LM head against 14.5 ms for
        `x.astype(f32) @ w.astype(f32).T`), so on the CPU the operands are upcast instead."""
        if cpu:
            return jnp.einsum(spec, a.astype(f32), b.astype(f32)).astype(dt)
        return jnp.einsum(spec, a, b, preferred_element_type=f32).astype(dt)

    def linear(x: jax.Array, w: jax.Array) -> jax.Array:
        if cpu:  # `@ w.T` on upcast operands: XLA CPU then calls its fast GEMM (see `dot`)
            return (x.astype(f32) @ w.astype(f32).T).astype(dt)
        return dot("...i,oi->...o", x, w)

    def split_heads(x: jax.Array, *, heads: int, head_dim: int) -> jax.Array:
        b, t, _ = x.shape
        return x.reshape(b, t, heads, head_dim).transpose(0, 2, 1, 3)

    def merge_heads(x: jax.Array) -> jax.Array:
        b, n, t, h = x.shape
        return x.transpose(0, 2, 1, 3).reshape(b, t, n * h)

    def rope_table(positions: jax.Array, *, head_dim: int, theta: float,
                   scaling: float) -> tuple[jax.Array, jax.Array]:
        k = jnp.float32
        inv_freq = 1.0 / (jnp.asarray(theta, k) ** (jnp.arange(0, head_dim, 2, dtype=k) / head_dim))
        freqs = positions.astype(k)[..., None] * (inv_freq / jnp.asarray(scaling, k))  # float32 angles
        angles = jnp.concatenate([freqs, freqs], axis=-1)[:, None]  # [B,1,T,H]
        return jnp.cos(angles).astype(dt), jnp.sin(angles).astype(dt)

    def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        return x * cos + _rotate_half(x) * sin

    def kv_cache(k: jax.Array, v: jax.Array, layer: tuple[jax.Array, jax.Array],
                 query_slots: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
        kbuf, vbuf = layer  # [B,K,C,H], slot t at t % C
        cap, t = kbuf.shape[2], k.shape[2]
        start = query_slots[0]
        if t == 1:  # decode: the slot written is outside every query's window, so write first
            kbuf = kbuf.at[:, :, query_slots % cap].set(k)
            vbuf = vbuf.at[:, :, query_slots % cap].set(v)
            return kbuf, vbuf, ring_slots(cap, start + 1), (kbuf, vbuf)
        keys = jnp.concatenate([kbuf, k], axis=2)
        values = jnp.concatenate([vbuf, v], axis=2)
        key_slots = jnp.concatenate([ring_slots(cap, start), query_slots])
        kept = slice(max(0, t - cap), t)  # only the last `cap` new tokens fit
        kbuf = kbuf.at[:, :, query_slots[kept] % cap].set(k[:, :, kept])
        vbuf = vbuf.at[:, :, query_slots[kept] % cap].set(v[:, :, kept])
        return keys, values, key_slots, (kbuf, vbuf)

    def attention(q: jax.Array, keys: jax.Array, values: jax.Array, key_slots: jax.Array,
                  query_slots: jax.Array, valid: jax.Array, *, scale: float,
                  softcap: float | None, window: int | None) -> jax.Array:
        qs, ks = query_slots[:, None], key_slots[None, :]
        visible = (ks >= 0) & (ks <= qs)
        if window is not None:
            visible = visible & (ks > qs - window)
        real = jnp.take(valid, jnp.maximum(key_slots, 0), axis=1)  # [B,S]
        mask = visible[None, None] & real[:, None, None, :]  # [B,1,T,S]
        groups = q.shape[1] // keys.shape[1]
        keys = jnp.repeat(keys, groups, axis=1)  # query head h reads kv head h // groups
        values = jnp.repeat(values, groups, axis=1)
        scores = dot("bnth,bnsh->bnts", q, keys) * jnp.asarray(scale, dt)
        if softcap is not None:
            scores = jnp.tanh(scores / softcap) * softcap  # before the mask
        scores = jnp.where(mask, scores, scores + fmin).astype(f32)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        return dot("bnts,bnsh->bnth", probs, values)

    def qlinear(x: jax.Array, values: jax.Array, scale: jax.Array, *, scheme: str,
                group_size: int | None) -> jax.Array:
        if cpu:  # XLA CPU fuses the dequantisation into its float32 GEMM (see `dot`)
            if scheme == "int8":  # the per-channel scale after the product
                return ((x.astype(f32) @ values.astype(f32).T) * scale).astype(dt)
            return (x.astype(f32) @ dequantize(values, scale, scheme, group_size).T).astype(dt)
        if scheme == "int8":  # int8 values are exact in bf16/fp16: XLA fuses the convert into the dot
            y = jnp.einsum("...i,oi->...o", x, values.astype(dt), preferred_element_type=f32)
            return (y * scale).astype(dt)
        return linear(x, dequantize(values, scale, scheme, group_size).astype(dt))

    def qembed(ids: jax.Array, values: jax.Array, scale: jax.Array, *, scheme: str,
               group_size: int | None, scale_by: float) -> jax.Array:
        rows = dequantize(jnp.take(values, ids, axis=0), jnp.take(scale, ids, axis=0), scheme, group_size)
        return rows.astype(dt) * jnp.asarray(scale_by, dt)

    def split(x: jax.Array, *, sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
        bounds = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
        return tuple(jnp.split(x, bounds, axis=-1))

    def gelu_tanh(x: jax.Array) -> jax.Array:
        return jax.nn.gelu(x.astype(f32), approximate=True).astype(x.dtype)

    def mul(a: jax.Array, b: jax.Array) -> jax.Array:
        return a * b

    def add(a: jax.Array, b: jax.Array) -> jax.Array:
        return a + b

    def softcap(x: jax.Array, *, cap: float) -> jax.Array:
        return jnp.tanh(x / cap) * cap

    def gather_positions(x: jax.Array, index: jax.Array) -> jax.Array:
        return jnp.take(x, index, axis=1)

    def pool_last_token(x: jax.Array, ids: jax.Array, *, pad_id: int) -> jax.Array:
        last = jnp.argmax(jnp.arange(ids.shape[1]) * (ids != pad_id), axis=1)  # rightmost non-pad
        return x[jnp.arange(x.shape[0]), last]

    return {
        "embed": embed, "rms_norm": rms_norm, "linear": linear, "split_heads": split_heads,
        "merge_heads": merge_heads, "rope_table": rope_table, "rope": rope, "kv_cache": kv_cache,
        "attention": attention, "qlinear": qlinear, "qembed": qembed, "split": split,
        "gelu_tanh": gelu_tanh, "mul": mul, "add": add, "softcap": softcap,
        "gather_positions": gather_positions, "pool_last_token": pool_last_token,
    }
