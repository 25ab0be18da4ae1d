"""The op table in PyTorch. Same names and semantics as the NumPy reference (gemma_core.graph)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from gemma_core.masks import reads_after_write
from gemma_core.opset import OP_GROUPS, table_from
from gemma_core.quant import NF4 as NF4_CODES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


NF4 = torch.from_numpy(NF4_CODES)
_BYTES = torch.arange(256)
NF4_PAIRS = torch.stack([NF4[_BYTES & 15], NF4[_BYTES >> 4]], dim=-1)  # [256, 2]: a byte's levels


def dequantize(values: torch.Tensor, scale: torch.Tensor, scheme: str, group_size: int | None,
               dtype: torch.dtype) -> torch.Tensor:
    """The weight rows that gemma-core quantised `values` (int8, or nibble-packed uint8) and their
    float32 `scale` stand for, in float32, then cast to `dtype` (gemma_core.quant)."""
    if scheme == "int8":
        return (values.float() * scale.float()[:, None]).to(dtype)
    o, i = values.shape[0], values.shape[1] * 2
    assert group_size is not None
    scale = scale.float()
    if scheme == "int4":  # codes * step + offset per group
        codes = torch.stack([values & 15, values >> 4], dim=-1).reshape(o, i)  # [O, I]
        groups = codes.view(o, i // group_size, group_size).float()
        return (groups * scale[..., 0:1] + scale[..., 1:2]).view(o, i).to(dtype)
    # each byte's two levels from one 256-entry table: half the gathers of a code-by-code lookup
    levels = NF4_PAIRS.to(values.device).index_select(0, values.reshape(-1).int())
    levels = levels.view(o, i // group_size, group_size)
    return (levels * scale[..., None]).view(o, i).to(dtype)


# Query x key positions up to which narrow-dtype CPU attention runs as float32 matmuls.
SMALL_SCORES = 1 << 18
# The CPU int8 and int4 kernels run up to this many rows (decode, small batches, short prompts):
# they read the quantised weights instead of dequantising them all, while for more rows one
# dequantisation and a GEMM in the compute dtype are faster. Measured on the real 270M: float32
# int8 decode ~5x faster on the kernel, its prefill 27 -> 200 tok/s dequantised; in bf16 the
# kernels win up to ~64 (int8) and ~200 (int4) rows, a 512-token prompt dequantised ran int4
# 514 -> 1208 tok/s and int8 369 -> 951 (the float bf16 model: 1244).
KERNEL_ROWS = 16  # float32 activations
NARROW_KERNEL_ROWS = 128  # bf16/fp16 activations


class Policy:
    """One compute dtype and formulation choice, bound first to every op function
    (`gemma_core.opset.table_from`): `dt` the torch dtype, `fmin` its finite minimum for masks,
    `upcast` whether it is a narrow float, `cpu` None (by each tensor's device) or forced."""

    def __init__(self, dtype: str, cpu: bool | None = None) -> None:
        self.dtype, self.cpu = dtype, cpu
        self.dt = DTYPES[dtype]
        self.fmin = torch.finfo(self.dt).min
        self.upcast = self.dt in (torch.bfloat16, torch.float16)

    def on_cpu(self, x: torch.Tensor) -> bool:
        """Whether `x` takes the CPU's formulation."""
        return x.device.type == "cpu" if self.cpu is None else self.cpu


def embed(p: Policy, ids: torch.Tensor, table: torch.Tensor, *, scale: float) -> torch.Tensor:
    return F.embedding(ids, table) * table.new_tensor(scale)  # the scale rounded to the dtype


def rms_norm(p: Policy, x: torch.Tensor, w: torch.Tensor, *, eps: float) -> torch.Tensor:
    if x.dtype in (torch.float32, torch.float64):  # no casts to pay for
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)
    x32 = x.float()  # narrower dtypes: float32 inside, one cast at the end
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)


def linear(p: Policy, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if p.upcast and x.numel() == x.shape[-1] and p.on_cpu(x) and not torch.compiler.is_compiling():
        # one row (batch-1 decode, the LM head) in bf16/fp16 on the CPU, eagerly: ATen's
        # matrix-vector kernel read the real 270M's weights ~25% faster than the GEMM path
        # (its 18 layers' projections 27.7 -> 21.1 ms a token, the tied LM head 26 -> 20 ms;
        # float32 accumulation either way). Compiled steps keep F.linear (oneDNN's packed GEMMs).
        return torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def split_heads(p: Policy, x: torch.Tensor, *, heads: int, head_dim: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, heads, head_dim).transpose(1, 2)


def merge_heads(p: Policy, x: torch.Tensor) -> torch.Tensor:
    b, n, t, h = x.shape
    return x.transpose(1, 2).reshape(b, t, n * h)


def rope_table(p: Policy, positions: torch.Tensor, *, head_dim: int, theta: float,
               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    f32 = torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=f32)
                                / head_dim))
    freqs = positions.to(f32)[..., None] * (inv_freq / scaling)  # [B,T,H/2] float32 angles
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B,1,T,H]
    return angles.cos().to(p.dt), angles.sin().to(p.dt)


def rope(p: Policy, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def attention_bias(p: Policy, mask: torch.Tensor) -> torch.Tensor:
    # additive finite minimum (as transformers' eager path): a fully masked pad row stays finite
    # both made in the dtype: float64's minimum overflows the float32 a Python scalar becomes
    zero = torch.zeros((), dtype=p.dt, device=mask.device)
    return torch.where(mask, zero, torch.full((), p.fmin, dtype=p.dt, device=mask.device))


def kv_cache(p: Policy, k: torch.Tensor, v: torch.Tensor, layer: tuple[torch.Tensor, torch.Tensor],
             query_slots: torch.Tensor, *, window: int | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    kbuf, vbuf = layer  # [B,K,C,H] static buffers, slot t at t % C, updated in place
    cap, t = kbuf.shape[2], k.shape[2]
    kept = slice(max(0, t - cap), t)  # only the last `cap` new tokens fit
    ring = query_slots[kept] % cap
    if reads_after_write(t, cap, window):
        kbuf.index_copy_(2, ring, k[:, :, kept])
        vbuf.index_copy_(2, ring, v[:, :, kept])
        return kbuf, vbuf, (kbuf, vbuf)
    keys, values = torch.cat([kbuf, k], dim=2), torch.cat([vbuf, v], dim=2)  # [B,K,C+T,H]
    kbuf.index_copy_(2, ring, k[:, :, kept])
    vbuf.index_copy_(2, ring, v[:, :, kept])
    return keys, values, (kbuf, vbuf)


def attention(p: Policy, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
              *, scale: float, softcap: float | None) -> torch.Tensor:
    groups = q.shape[1] // keys.shape[1]
    b, n, t, h = q.shape
    cpu_narrow = p.on_cpu(q) and p.upcast
    # SDPA where no softcap applies, except where float32 matmuls are both cheaper and closer
    # to the exact result: decode (one query), and narrow dtypes on the CPU while the score
    # matrix is small (CPU bf16 SDPA put the real 270M's decode logits 10x further from the
    # float64 oracle than the bf16 reference is: KL 3e-2 against 3e-3)
    small = cpu_narrow and t * keys.shape[2] <= SMALL_SCORES
    # under autograd only where every query row sees a key (packed rows, right padding's
    # causal rows, ...): SDPA's backward of a fully masked (pad) row is off by orders of
    # magnitude from the softmax's own gradient (transformers' eager path), which training
    # follows; elsewhere its backward agrees with the eager one's to rounding, and is faster
    grad = torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad)
    sdpa = softcap is None and t > 1 and not small
    if sdpa and grad:  # the bias holds 0 or fmin: a row whose maximum is fmin sees no key
        sdpa = not bool((bias.amax(dim=-1) == p.fmin).any())
    if sdpa:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale,
                                              enable_gqa=groups > 1)
    kv = keys.shape[1]
    if cpu_narrow:  # CPU bf16/fp16 batched matmuls of this size are ~3x slower than float32
        q, keys, values = q.float(), keys.float(), values.float()
    # query head h reads kv head h // groups: the heads of one group share a matmul
    scores = (q.reshape(b, kv, groups * t, h) @ keys.transpose(-1, -2)) * scale  # [B,K,G*T,S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap  # before the mask
    probs = torch.softmax((scores.view(b, n, t, -1) + bias).float(), dim=-1).to(values.dtype)
    return (probs.view(b, kv, groups * t, -1) @ values).view(b, n, t, h).to(p.dt)


def qlinear(p: Policy, x: torch.Tensor, values: Any, scale: Any, *, scheme: str,
            group_size: int | None) -> torch.Tensor:
    fused, rows, row_scale = values  # see TorchBackend.prepare_quantized
    flat = x.reshape(-1, x.shape[-1])
    if fused is not None and fused.is_floating_point():  # nf4 dequantised at load ("nf4-dense")
        return F.linear(x, fused)
    # the CPU kernels run decode's few rows, where they read a half to an eighth of the bytes;
    # a prompt's many rows dequantise faster (where the gemma-core rows are kept: on the CPU;
    # not in a compiled bf16/fp16 step, whose frozen weights would be folded dense)
    narrow = x.dtype != torch.float32
    few = ((narrow and torch.compiler.is_compiling()) or not p.on_cpu(x)  # (first: no guard on
           or len(flat) <= (NARROW_KERNEL_ROWS if narrow else KERNEL_ROWS))  # an exported batch)
    if fused is not None and (few or rows is None):
        if scheme == "int8":  # CPU int8 weight-only GEMM
            return torch._weight_int8pack_mm(flat, fused, scale).view(*x.shape[:-1], -1)
        # int4 GEMM in the kernel's own packed layout (CUDA's is 4-D)
        mm = torch._weight_int4pack_mm if fused.dim() == 4 else torch._weight_int4pack_mm_for_cpu
        return mm(flat.contiguous(), fused, group_size or 0, scale).view(*x.shape[:-1], -1)
    if scheme == "int8" and not p.on_cpu(x) and x.dtype != torch.float16:
        # int8 values converted to the compute dtype, the product scaled after it (not in
        # fp16: the unscaled sums, ~127 / max|w| times the outputs, can pass its 65504)
        return (F.linear(x, rows.to(x.dtype)).float() * row_scale).to(x.dtype)
    return F.linear(x, dequantize(rows, row_scale, scheme, group_size, x.dtype))


def qembed(p: Policy, ids: torch.Tensor, values: Any, scale: Any, *, scheme: str,
           group_size: int | None, scale_by: float) -> torch.Tensor:
    _, rows, row_scale = values  # the gemma-core layout, whose rows can be gathered
    flat = ids.reshape(-1)
    table = dequantize(rows.index_select(0, flat), row_scale.index_select(0, flat), scheme,
                       group_size, p.dt)
    return table.view(*ids.shape, -1) * table.new_tensor(scale_by)


def lora(p: Policy, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, scale: float) -> torch.Tensor:
    return F.linear(F.linear(x, a), b) * scale  # as PEFT: the scale in float32, one rounding


def split(p: Policy, x: torch.Tensor, *, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.split(x, list(sizes), dim=-1))


def gelu_tanh(p: Policy, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def mul(p: Policy, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * b


def add(p: Policy, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


def softcap(p: Policy, x: torch.Tensor, *, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


def gather_positions(p: Policy, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(1, index)


def pool_last_token(p: Policy, x: torch.Tensor, ids: torch.Tensor, *, pad_id: int) -> torch.Tensor:
    positions = torch.arange(ids.shape[1], device=ids.device)
    last = (positions * (ids != pad_id)).argmax(dim=1)  # rightmost non-pad
    return x[torch.arange(x.shape[0], device=x.device), last]


def make_op_table(dtype: str, cpu: bool | None = None,
                  groups: Iterable[str] = tuple(OP_GROUPS)) -> dict[str, Callable[..., Any]]:
    """The op table computing in `dtype`, with each op's formulation for the device its tensors
    are on, or (`cpu=False`) the accelerators' formulations wherever they are (tests prove their
    numerics on the CPU this way)."""
    return table_from(sys.modules[__name__], Policy(dtype, cpu), groups)
