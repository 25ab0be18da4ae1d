"""The op table in TensorFlow: pure functions, so a whole step traces under
`tf.function(jit_compile=True)` and also runs eagerly.

Same names and semantics as the NumPy reference (gemma_core.graph). The cache is functional, as in
the JAX backend: `kv_cache` returns updated buffers. Shapes may be dynamic (the Keras model's
serving signature takes any batch and length), so sizes come from `tf.shape` where a static shape
may be unknown.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import tensorflow as tf

from gemma_core.masks import reads_after_write
from gemma_core.opset import OP_GROUPS, table_from
from gemma_core.quant import NF4

DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16,
          "float64": tf.float64}


def _rotate_half(x: tf.Tensor) -> tf.Tensor:
    half = x.shape[-1] // 2
    return tf.concat([-x[..., half:], x[..., :half]], axis=-1)


def _write_slots(buf: tf.Tensor, slots: tf.Tensor, new: tf.Tensor) -> tf.Tensor:
    """`buf[:, :, slots] = new` for a `[B,K,C,H]` buffer, as a functional update."""
    if new.shape[2] == 1:  # one token: a select over the slot axis (cheap, fuses in XLA)
        hit = tf.equal(tf.range(buf.shape[2], dtype=slots.dtype), slots[0])[None, None, :, None]
        return tf.where(hit, new, buf)
    moved = tf.tensor_scatter_nd_update(tf.transpose(buf, [2, 0, 1, 3]), slots[:, None],
                                        tf.transpose(new, [2, 0, 1, 3]))  # [C,B,K,H]
    return tf.transpose(moved, [1, 2, 0, 3])


def dequantize(values: tf.Tensor, scale: tf.Tensor, scheme: str, group_size: int | None) -> tf.Tensor:
    """Float32 weight rows `[..., I]` of gemma-core quantised values (int8 `[..., I]`, or
    nibble-packed uint8 `[..., I/2]`) and their float32 scales (gemma_core.quant)."""
    values, scale = tf.convert_to_tensor(values), tf.cast(scale, tf.float32)
    if scheme == "int8":
        return tf.cast(values, tf.float32) * scale[..., None]
    packed = tf.cast(values, tf.int32)
    lead = tf.shape(packed)[:-1]
    codes = tf.reshape(tf.stack([packed % 16, packed // 16], axis=-1),
                       tf.concat([lead, [values.shape[-1] * 2]], axis=0))
    groups = tf.reshape(codes, tf.concat([lead, [-1, group_size]], axis=0))
    if scheme == "int4":  # codes * step + offset per group
        out = tf.cast(groups, tf.float32) * scale[..., 0:1] + scale[..., 1:2]
    else:
        out = tf.gather(tf.constant(NF4), groups) * scale[..., None]
    return tf.reshape(out, tf.shape(codes))


class Policy:
    """One compute dtype and formulation choice, bound first to every op function
    (`gemma_core.opset.table_from`): `dt` the tf dtype, `f32` the accumulation dtype, `fmin` the
    dtype's finite minimum for masks, `cpu` whether the products take the CPU's formulation."""

    def __init__(self, dtype: str, cpu: bool | None = None) -> None:
        self.dtype = dtype
        self.dt = DTYPES[dtype]
        self.f32 = tf.float64 if dtype == "float64" else tf.float32
        self.fmin = self.dt.min
        self.cpu = not tf.config.list_logical_devices("GPU") if cpu is None else cpu


def embed(p: Policy, ids: tf.Tensor, table: tf.Tensor, *, scale: float) -> tf.Tensor:
    return tf.gather(table, ids) * tf.constant(scale, p.dt)  # the scale rounded to the dtype


def rms_norm(p: Policy, x: tf.Tensor, w: tf.Tensor, *, eps: float) -> tf.Tensor:
    x32 = tf.cast(x, p.f32)
    y = x32 / tf.sqrt(tf.reduce_mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return tf.cast(y * (1.0 + tf.cast(w, p.f32)), x.dtype)


def dot(p: Policy, spec: str, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """einsum with float32 accumulation and one rounding to the compute dtype (the operands
    upcast, as XLA's CPU backend runs narrow-float dots slowly; see backends/jax/ops.py)."""
    if not p.cpu or p.dt in (tf.float32, tf.float64):
        return tf.einsum(spec, a, b)
    return tf.cast(tf.einsum(spec, tf.cast(a, p.f32), tf.cast(b, p.f32)), p.dt)


def linear(p: Policy, x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    lead = tf.shape(x)[:-1]
    x2 = tf.reshape(x, [-1, x.shape[-1]])  # [N,I]
    if p.cpu and p.dt not in (tf.float32, tf.float64):
        y = tf.cast(tf.matmul(tf.cast(x2, p.f32), tf.cast(w, p.f32), transpose_b=True), p.dt)
    else:
        y = tf.matmul(x2, w, transpose_b=True)
    return tf.reshape(y, tf.concat([lead, [w.shape[0]]], axis=0))


def split_heads(p: Policy, x: tf.Tensor, *, heads: int, head_dim: int) -> tf.Tensor:
    s = tf.shape(x)
    return tf.transpose(tf.reshape(x, [s[0], s[1], heads, head_dim]), [0, 2, 1, 3])


def merge_heads(p: Policy, x: tf.Tensor) -> tf.Tensor:
    s = tf.shape(x)
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [s[0], s[2], x.shape[1] * x.shape[3]])


def rope_table(p: Policy, positions: tf.Tensor, *, head_dim: int, theta: float,
               scaling: float) -> tuple[tf.Tensor, tf.Tensor]:
    # inverse frequencies as host constants: TensorFlow's float32 pow differs from the
    # correctly rounded one by an ulp, which positions in the thousands amplify
    n32 = np.float32
    inv_freq = n32(1.0) / (n32(theta) ** (np.arange(0, head_dim, 2, dtype=n32) / n32(head_dim)))
    inv_freq = tf.constant(inv_freq / n32(scaling))
    freqs = tf.cast(positions, tf.float32)[..., None] * inv_freq  # [B,T,H/2] float32 angles
    angles = tf.concat([freqs, freqs], axis=-1)[:, None]  # [B,1,T,H]
    # cos/sin of the float32 angles evaluated in float64: TensorFlow's float32 sin/cos are
    # fast approximations, off by up to 15x the float32 tolerance at angles of a few hundred
    angles = tf.cast(angles, tf.float64)
    return tf.cast(tf.cos(angles), p.dt), tf.cast(tf.sin(angles), p.dt)


def rope(p: Policy, x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor) -> tf.Tensor:
    return x * cos + _rotate_half(x) * sin


def attention_bias(p: Policy, mask: tf.Tensor) -> tf.Tensor:
    return tf.where(mask, tf.constant(0, p.dt), tf.constant(p.fmin, p.dt))


def kv_cache(p: Policy, k: tf.Tensor, v: tf.Tensor, layer: tuple[tf.Tensor, tf.Tensor],
             query_slots: tf.Tensor, *, window: int | None) -> tuple[tf.Tensor, tf.Tensor, Any]:
    kbuf, vbuf = layer  # [B,K,C,H], slot t at t % C
    cap, t = kbuf.shape[2], k.shape[2]
    kept = slice(max(0, t - cap), t)  # only the last `cap` new tokens fit
    ring = query_slots[kept] % cap
    written = _write_slots(kbuf, ring, k[:, :, kept]), _write_slots(vbuf, ring, v[:, :, kept])
    if reads_after_write(t, cap, window):
        return *written, written
    return tf.concat([kbuf, k], axis=2), tf.concat([vbuf, v], axis=2), written


def attention(p: Policy, q: tf.Tensor, keys: tf.Tensor, values: tf.Tensor, bias: tf.Tensor, *,
              scale: float, softcap: float | None) -> tf.Tensor:
    groups = q.shape[1] // keys.shape[1]
    if groups > 1:  # query head h reads kv head h // groups
        keys = tf.repeat(keys, groups, axis=1)
        values = tf.repeat(values, groups, axis=1)
    scores = dot(p, "bnth,bnsh->bnts", q, keys) * tf.constant(scale, p.dt)
    if softcap is not None:
        scores = tf.tanh(scores / softcap) * softcap  # before the bias
    probs = tf.cast(tf.nn.softmax(tf.cast(scores + bias, p.f32), axis=-1), p.dt)
    return dot(p, "bnts,bnsh->bnth", probs, values)


def qlinear(p: Policy, x: tf.Tensor, values: tf.Tensor, scale: tf.Tensor, *, scheme: str,
            group_size: int | None) -> tf.Tensor:
    if p.cpu:  # XLA CPU fuses the dequantisation into a float32 GEMM (see `linear`)
        lead = tf.shape(x)[:-1]
        x2 = tf.cast(tf.reshape(x, [-1, x.shape[-1]]), p.f32)
        if scheme == "int8":  # the per-channel scale after the product
            y = tf.matmul(x2, tf.cast(values, p.f32), transpose_b=True) * tf.cast(scale, p.f32)
        else:
            y = tf.matmul(x2, tf.cast(dequantize(values, scale, scheme, group_size), p.f32),
                          transpose_b=True)
        return tf.reshape(tf.cast(y, p.dt), tf.concat([lead, [values.shape[0]]], axis=0))
    return linear(p, x, tf.cast(dequantize(values, scale, scheme, group_size), p.dt))


def qembed(p: Policy, ids: tf.Tensor, values: tf.Tensor, scale: tf.Tensor, *, scheme: str,
           group_size: int | None, scale_by: float) -> tf.Tensor:
    rows = dequantize(tf.gather(values, ids), tf.gather(scale, ids), scheme, group_size)
    return tf.cast(rows, p.dt) * tf.constant(scale_by, p.dt)


def lora(p: Policy, x: tf.Tensor, a: tf.Tensor, b: tf.Tensor, *, scale: float) -> tf.Tensor:
    # the scale applied in float32 (not rounded to a narrow dtype first), one rounding, as torch
    return tf.cast(tf.cast(linear(p, linear(p, x, a), b), p.f32) * scale, p.dt)


def split(p: Policy, x: tf.Tensor, *, sizes: tuple[int, ...]) -> tuple[tf.Tensor, ...]:
    return tuple(tf.split(x, list(sizes), axis=-1))


def gelu_tanh(p: Policy, x: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.nn.gelu(tf.cast(x, p.f32), approximate=True), x.dtype)


def mul(p: Policy, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    return a * b


def add(p: Policy, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    return a + b


def softcap(p: Policy, x: tf.Tensor, *, cap: float) -> tf.Tensor:
    return tf.tanh(x / cap) * cap


def gather_positions(p: Policy, x: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    return tf.gather(x, index, axis=1)


def pool_last_token(p: Policy, x: tf.Tensor, ids: tf.Tensor, *, pad_id: int) -> tf.Tensor:
    positions = tf.range(tf.shape(ids)[1], dtype=ids.dtype)
    last = tf.argmax(positions * tf.cast(ids != pad_id, ids.dtype), axis=1)  # rightmost non-pad
    return tf.gather(x, last, axis=1, batch_dims=1)


def make_op_table(dtype: str, cpu: bool | None = None,
                  groups: Iterable[str] = tuple(OP_GROUPS)) -> dict[str, Callable[..., Any]]:
    """The op table computing in `dtype`, with the CPU's formulations of the products or (`cpu`
    False) the GPU's ones; by default the CPU's where TensorFlow sees no GPU."""
    return table_from(sys.modules[__name__], Policy(dtype, cpu), groups)
