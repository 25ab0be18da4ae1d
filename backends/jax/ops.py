"""The op table in JAX (jax.numpy / lax), pure functions so that a whole step traces under jit.

Same names and semantics as the NumPy reference (gemma_core.graph). The cache is functional:
`kv_cache` returns updated buffers (`.at[].set`), which XLA updates in place when the step is
jitted with the cache donated.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from gemma_core.masks import reads_after_write
from gemma_core.opset import OP_GROUPS, table_from
from gemma_core.quant import NF4

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "float64": jnp.float64}


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


class Policy:
    """One compute dtype and formulation choice, bound first to every op function
    (`gemma_core.opset.table_from`): `dt` the jnp dtype, `f32` the accumulation dtype, `fmin` the
    dtype's finite minimum for masks, `cpu` whether the products take the CPU's formulation."""

    def __init__(self, dtype: str, cpu: bool | None = None) -> None:
        self.dtype = dtype
        self.dt = DTYPES[dtype]
        self.f32 = jnp.float64 if dtype == "float64" else jnp.float32
        self.fmin = jnp.finfo(self.dt).min
        self.cpu = jax.default_backend() == "cpu" if cpu is None else cpu


def embed(p: Policy, ids: jax.Array, table: jax.Array, *, scale: float) -> jax.Array:
    return jnp.take(table, ids, axis=0) * jnp.asarray(scale, p.dt)  # the scale rounded to the dtype


def rms_norm(p: Policy, x: jax.Array, w: jax.Array, *, eps: float) -> jax.Array:
    x32 = x.astype(p.f32)
    # 1 / sqrt rather than lax.rsqrt, which differs from torch.rsqrt in the last bits
    y = x32 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (1.0 + w.astype(p.f32))).astype(x.dtype)


def dot(p: Policy, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with float32 accumulation, one rounding to the compute dtype. XLA's CPU backend
    runs bf16 dots with preferred_element_type=f32, or dots fed by a fused convert, through a
    slow loop (measured 350 ms for the 262144 x 640 LM head against 14.5 ms for
    `x.astype(f32) @ w.astype(f32).T`), so on the CPU the operands are upcast instead."""
    if p.cpu:
        return jnp.einsum(spec, a.astype(p.f32), b.astype(p.f32)).astype(p.dt)
    return jnp.einsum(spec, a, b, preferred_element_type=p.f32).astype(p.dt)


def linear(p: Policy, x: jax.Array, w: jax.Array) -> jax.Array:
    if p.cpu:  # `@ w.T` on upcast operands: XLA CPU then calls its fast GEMM (see `dot`)
        return (x.astype(p.f32) @ w.astype(p.f32).T).astype(p.dt)
    return dot(p, "...i,oi->...o", x, w)


def split_heads(p: Policy, x: jax.Array, *, heads: int, head_dim: int) -> jax.Array:
    b, t, _ = x.shape
    return x.reshape(b, t, heads, head_dim).transpose(0, 2, 1, 3)


def merge_heads(p: Policy, x: jax.Array) -> jax.Array:
    b, n, t, h = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, n * h)


def rope_table(p: Policy, positions: jax.Array, *, head_dim: int, theta: float,
               scaling: float) -> tuple[jax.Array, jax.Array]:
    k = jnp.float32
    inv_freq = 1.0 / (jnp.asarray(theta, k) ** (jnp.arange(0, head_dim, 2, dtype=k) / head_dim))
    freqs = positions.astype(k)[..., None] * (inv_freq / jnp.asarray(scaling, k))  # float32 angles
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, None]  # [B,1,T,H]
    return jnp.cos(angles).astype(p.dt), jnp.sin(angles).astype(p.dt)


def rope(p: Policy, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    return x * cos + _rotate_half(x) * sin


def attention_bias(p: Policy, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, jnp.asarray(0, p.dt), jnp.asarray(p.fmin, p.dt))


def kv_cache(p: Policy, k: jax.Array, v: jax.Array, layer: tuple[jax.Array, jax.Array],
             query_slots: jax.Array, *, window: int | None) -> tuple[jax.Array, jax.Array, Any]:
    kbuf, vbuf = layer  # [B,K,C,H], slot t at t % C
    cap, t = kbuf.shape[2], k.shape[2]
    kept = slice(max(0, t - cap), t)  # only the last `cap` new tokens fit
    ring = query_slots[kept] % cap
    written = kbuf.at[:, :, ring].set(k[:, :, kept]), vbuf.at[:, :, ring].set(v[:, :, kept])
    if reads_after_write(t, cap, window):
        return *written, written
    return jnp.concatenate([kbuf, k], axis=2), jnp.concatenate([vbuf, v], axis=2), written


def attention(p: Policy, q: jax.Array, keys: jax.Array, values: jax.Array, bias: jax.Array, *,
              scale: float, softcap: float | None) -> jax.Array:
    if not p.cpu and softcap is None:  # XLA's fused attention (cuDNN where it applies); GQA native
        out = jax.nn.dot_product_attention(q.transpose(0, 2, 1, 3), keys.transpose(0, 2, 1, 3),
                                           values.transpose(0, 2, 1, 3), bias=bias, scale=scale)
        return out.transpose(0, 2, 1, 3)  # [B,N,T,H]
    groups = q.shape[1] // keys.shape[1]
    keys = jnp.repeat(keys, groups, axis=1)  # query head h reads kv head h // groups
    values = jnp.repeat(values, groups, axis=1)
    scores = dot(p, "bnth,bnsh->bnts", q, keys) * jnp.asarray(scale, p.dt)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap  # before the bias
    probs = jax.nn.softmax((scores + bias).astype(p.f32), axis=-1).astype(p.dt)
    return dot(p, "bnts,bnsh->bnth", probs, values)


def qlinear(p: Policy, x: jax.Array, values: jax.Array, scale: jax.Array, *, scheme: str,
            group_size: int | None) -> jax.Array:
    if p.cpu:  # XLA CPU fuses the dequantisation into its float32 GEMM (see `dot`)
        if scheme == "int8":  # the per-channel scale after the product
            return ((x.astype(p.f32) @ values.astype(p.f32).T) * scale).astype(p.dt)
        return (x.astype(p.f32) @ dequantize(values, scale, scheme, group_size).T).astype(p.dt)
    if scheme == "int8":  # int8 values are exact in bf16/fp16: XLA fuses the convert into the dot
        y = jnp.einsum("...i,oi->...o", x, values.astype(p.dt), preferred_element_type=p.f32)
        return (y * scale).astype(p.dt)
    return linear(p, x, dequantize(values, scale, scheme, group_size).astype(p.dt))


def qembed(p: Policy, ids: jax.Array, values: jax.Array, scale: jax.Array, *, scheme: str,
           group_size: int | None, scale_by: float) -> jax.Array:
    rows = dequantize(jnp.take(values, ids, axis=0), jnp.take(scale, ids, axis=0), scheme, group_size)
    return rows.astype(p.dt) * jnp.asarray(scale_by, p.dt)


def lora(p: Policy, x: jax.Array, a: jax.Array, b: jax.Array, *, scale: float) -> jax.Array:
    # the scale applied in float32 (not rounded to a narrow dtype first), one rounding, as torch
    return (linear(p, linear(p, x, a), b).astype(p.f32) * scale).astype(p.dt)


def split(p: Policy, x: jax.Array, *, sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    bounds = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
    return tuple(jnp.split(x, bounds, axis=-1))


def gelu_tanh(p: Policy, x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x.astype(p.f32), approximate=True).astype(x.dtype)


def mul(p: Policy, a: jax.Array, b: jax.Array) -> jax.Array:
    return a * b


def add(p: Policy, a: jax.Array, b: jax.Array) -> jax.Array:
    return a + b


def softcap(p: Policy, x: jax.Array, *, cap: float) -> jax.Array:
    return jnp.tanh(x / cap) * cap


def gather_positions(p: Policy, x: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take(x, index, axis=1)


def pool_last_token(p: Policy, x: jax.Array, ids: jax.Array, *, pad_id: int) -> jax.Array:
    last = jnp.argmax(jnp.arange(ids.shape[1]) * (ids != pad_id), axis=1)  # rightmost non-pad
    return x[jnp.arange(x.shape[0]), last]


def make_op_table(dtype: str, cpu: bool | None = None,
                  groups: Iterable[str] = tuple(OP_GROUPS)) -> dict[str, Callable[..., Any]]:
    """The op table computing in `dtype`, with the CPU's formulations of the products or (`cpu`
    False) the accelerators' ones; by default those of JAX's default backend."""
    return table_from(sys.modules[__name__], Policy(dtype, cpu), groups)
