"""The PyTorch backend: CPU, CUDA and MPS; float32, bfloat16, float16 (and float64);
SDPA attention where no softcap applies; static caches updated in place; an optional
`torch.compile` of the whole step (CUDA graphs on GPU)."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backends.torch.ops import DTYPES, dequantize, make_op_table
from gemma_core.backend import FLOAT16_REFUSED, Backend, StepFn, per_weights
from gemma_core.errors import BackendError
from gemma_core.layout import roles_of


class TorchBackend(Backend):
    """Realises the op vocabulary with torch tensors."""

    name = "torch"
    dtypes = tuple(DTYPES)
    op_groups = ("core", "quantized", "classification", "lora")
    devices = ("cpu", "cuda", "mps")
    gaps = FLOAT16_REFUSED
    fuse_projections = True  # 126 -> 72 weight products a step on Gemma 3 270M
    saves_prepared = True  # torch.save, mapped by torch.load(mmap=True)

    def make_op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        return make_op_table(dtype)

    def device(self, device: str | None) -> torch.device:
        """The torch device for a user's `device` (default: cpu)."""
        try:
            dev = torch.device(device or "cpu")
        except RuntimeError as e:
            raise BackendError(f"device: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("device: cuda is not available to this torch build")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise BackendError("device: mps is not available")
        return dev

    def convert_weight(self, w: np.ndarray, dtype: str, device: str | None) -> Any:
        dev, dt = self.device(device), DTYPES[dtype]
        w = np.ascontiguousarray(w, dtype=np.float32)
        # memory-mapped checkpoints are read-only; torch tensors must own writable memory
        host = torch.from_numpy(w if w.flags.writeable else w.copy())
        out = host.to(device=dev, dtype=dt)
        if out.ndim == 2 and dev.type == "cpu" and dt in (torch.float32, torch.float64):
            # Same [out, in] shape, column-major memory: CPU BLAS reads a matrix-vector product
            # about twice as fast this way (MKL sgemv reaches ~12 GB/s row-major, ~24 GB/s here).
            out = out.t().contiguous().t()
        return _static(out)

    def quant_kernel(self, dev: torch.device, dt: torch.dtype, scheme: str, shape: tuple[int, ...],
                     group_size: int | None) -> str | None:
        """The weight-only kernel that runs a quantised [O, I] weight, or None.

        - "int8-cpu" (`_weight_int8pack_mm`) and "int4-cpu" (`_weight_int4pack_mm_for_cpu`):
          float32, bf16 or fp16 activations on the CPU, scales in that dtype. They run up to
          `ops.KERNEL_ROWS` (float32) or `ops.NARROW_KERNEL_ROWS` rows; more rows dequantise
          the gemma-core rows kept beside them (measured there).
        - "int4-cuda": tinygemm (`_weight_int4pack_mm`), bf16 on sm80+.
        - "nf4-dense": bf16/fp16 on the CPU, nf4 dequantised once at load. No torch CPU kernel
          reads a 16-level codebook: dequantising nf4 each step decoded the real 270M at 2.5
          tok/s, its dense bf16 weights at 14.3, with the same products (re-packed as int8 rows
          instead: 16.5 tok/s, but 93% of top-1 predictions agreed with nf4's, perplexity +3%).
          The dense weight costs the compute dtype's memory.
        - None: the op converts int8 values inside the product (scaled after it) or dequantises
          4-bit codes each step (nf4 in float32, shapes or devices no kernel takes)."""
        out, inner = shape[0], shape[1] * 2  # 4-bit codes are packed two per byte
        if dev.type == "cpu" and dt in (torch.float32, torch.bfloat16, torch.float16):
            if scheme == "int8":
                return "int8-cpu"
            if scheme == "int4" and out % 16 == 0:  # the CPU packing tiles 16 output rows
                return "int4-cpu"
            if scheme == "nf4" and dt != torch.float32:
                return "nf4-dense"
        if (dev.type == "cuda" and dt == torch.bfloat16 and scheme == "int4" and out % 8 == 0
                and inner % 32 == 0 and group_size in (32, 64, 128, 256)
                and torch.version.hip is None  # ROCm tiles 16 output rows, on CDNA2+ only
                and torch.cuda.get_device_capability(dev) >= (8, 0)):  # built for sm80+ only
            return "int4-cuda"
        return None

    def prepare_quantized(self, values: np.ndarray, scale: np.ndarray, scheme: str,
                          group_size: int | None, dtype: str, device: str | None,
                          name: str = "") -> tuple[Any, Any]:
        """((fused, rows, row_scale), fused_scale). `fused` is the weight in the layout of the
        kernel `quant_kernel` picks (int8 [O, I] with scales in the compute dtype; the int4
        kernels' own nibble packing with [I/g, O, 2] scales and zero points, both rounded to the
        compute dtype: a group whose range lies far from zero loses a little more than the bf16
        rounding of its dequantised weights; nf4's dequantised weight in the compute dtype), or
        None; `rows` and `row_scale` keep the gemma-core layout where they are read (the
        embedding, gathered by rows, or no kernel)."""
        dev, dt = self.device(device), DTYPES[dtype]
        rows = torch.from_numpy(np.array(values)).to(dev)
        row_scale = torch.from_numpy(np.array(scale, np.float32)).to(dev)
        kernel = self.quant_kernel(dev, dt, scheme, tuple(rows.shape), group_size)
        if kernel is None:
            return (None, _static(rows), _static(row_scale)), None
        if kernel == "int8-cpu":  # the kernel's layout is gemma-core's
            fused, fused_scale = rows, row_scale.to(dt)
        elif kernel == "nf4-dense":  # the weight each step would dequantise, made once
            fused, fused_scale = dequantize(rows, row_scale, scheme, group_size, dt), row_scale
        else:
            fused_scale = int4_scales_and_zeros(row_scale, dt)
            if kernel == "int4-cpu":
                fused = int4_pack(rows, kernel)
            else:
                fused = _cuda_int4_or_none(rows, row_scale, fused_scale, group_size or 0, name)
                if fused is None:
                    return (None, _static(rows), _static(row_scale)), None
        # the embedding is gathered by rows as well; on the CPU a prompt's rows dequantise them
        keep_rows = roles_of(name) == {"embedding"} or kernel in ("int8-cpu", "int4-cpu")
        return ((_static(fused), _static(rows) if keep_rows else None,
                 _static(row_scale) if keep_rows else None), _static(fused_scale))

    def framework_version(self) -> str:
        return f"torch {torch.__version__}"

    def save_prepared(self, path: Any, key: str, weights: dict[str, Any]) -> None:
        try:
            torch.save({"key": key, "weights": weights}, path)
        except RuntimeError as e:  # torch's writer reports I/O failures (a full disk) this way
            raise OSError(str(e)) from None

    def load_prepared(self, path: Any) -> tuple[Any, Any]:
        import mmap

        # mmap: the arrays are pages of the file, copy-on-write (MAP_PRIVATE, whatever the
        # process's default): nothing written to them reaches it; weights_only: no code runs
        with torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE):
            saved = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        return saved["key"], saved["weights"]

    def array_signature(self, x: Any) -> tuple[tuple[int, ...], str]:
        return tuple(x.shape), str(x.dtype).removeprefix("torch.")

    def asarray(self, x: np.ndarray, device: str | None) -> Any:
        return torch.as_tensor(np.ascontiguousarray(x), device=self.device(device))

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if x.is_floating_point() and x.dtype != torch.float64:
                x = x.float()
            return x.cpu().numpy()
        return np.asarray(x)

    def greedy_tokens(self, logits: Any) -> np.ndarray:
        if not isinstance(logits, torch.Tensor):
            return super().greedy_tokens(logits)
        # torch.max's indices (documented: the first maximal value) reduce bf16 about 4x faster
        # than argmax on CPU, and far faster than a float32 copy of the vocabulary to the host
        last = logits.detach()[:, -1]
        last = last.float() if last.dtype == torch.float64 else last  # the rule's float32
        return torch.max(last, dim=-1).indices.cpu().numpy().astype(np.int64)

    def new_cache_layer(self, batch: int, kv_heads: int, capacity: int, head_dim: int,
                        dtype: str, device: str | None) -> Any:
        shape = (batch, kv_heads, capacity, head_dim)
        dev = self.device(device)
        return (_static(torch.zeros(shape, dtype=DTYPES[dtype], device=dev)),
                _static(torch.zeros(shape, dtype=DTYPES[dtype], device=dev)))

    def export_cache_layer(self, state: Any) -> tuple[np.ndarray, np.ndarray]:
        k, v = state
        return self.to_numpy(k), self.to_numpy(v)

    def copy_cache_layer(self, state: Any) -> Any:
        """Clones of the layer's buffers (kv_cache writes them in place), not marked static: on
        CUDA a fork's new addresses would make the CUDA graphs re-record; hand the cache over
        (`donate_cache=True`) to decode at full speed."""
        k, v = state
        return k.clone(), v.clone()

    def reorder_cache_layer(self, state: Any, rows: np.ndarray) -> Any:
        k, v = state
        index = torch.as_tensor(rows, dtype=torch.long, device=k.device)
        with torch.inference_mode():
            return k.index_select(0, index), v.index_select(0, index)

    def write_cache_row(self, state: Any, row: int, source: Any, source_row: int) -> Any:
        """In place, so the buffers keep their addresses (CUDA graphs)."""
        (k, v), (sk, sv) = state, source
        with torch.inference_mode():  # allowed on inference and normal tensors alike
            k[row].copy_(sk[source_row])
            v[row].copy_(sv[source_row])
        return k, v

    def shift_cache_layer(self, state: Any, shift: int) -> Any:
        k, v = state
        roll = -(shift % k.shape[2])
        with torch.inference_mode():
            k.copy_(torch.roll(k, roll, dims=2))
            v.copy_(torch.roll(v, roll, dims=2))
        return k, v

    def compile_step(self, step: StepFn, options: Mapping[str, Any]) -> StepFn:
        """Eager under inference mode, or `torch.compile` of the whole step (one graph, no
        recompiles between decode steps). On CUDA the compiled step replays CUDA graphs
        ("reduce-overhead"); weights and cache buffers are marked static (see `_static`) so a
        replay does not copy them, and outputs are cloned because the next replay reuses them.
        On the CPU a C++ wrapper launches the kernels (~1 ms a step less than Python's), and
        bf16/fp16 weights are frozen into the graph (see `FrozenWeights`, `_freezable`)."""
        kind = torch.device(options.get("device") or "cpu").type
        cuda = kind == "cuda"
        run: StepFn = step
        if options.get("compile"):
            from gemma_core.compile_cache import enable_torch

            enable_torch()  # inductor's on-disk caches in the user cache, before the first compile
            # one compiled function per weight set, the weights captured rather than passed:
            # guarding ~300 weight arguments cost ~1.2 ms a decode step (Gemma 3 270M, CPU)
            def make(weights: Mapping[str, Any]) -> tuple[Callable[[dict[str, Any]], dict[str, Any]], bool]:
                """The compiled step of a weight set, and whether its weights are frozen."""
                if cuda:
                    return _compile(lambda env: step(weights, env), mode="reduce-overhead"), False
                if kind == "cpu" and _freezable(weights, options.get("dtype")):
                    return _compile(FrozenWeights(weights, step), options={"cpp_wrapper": True}), True
                return _compile(lambda env: step(weights, env), options={"cpp_wrapper": True}), False

            traced = per_weights(make)
            seen: set[tuple[Any, ...]] = set()

            def replay(weights: Mapping[str, Any], env: dict[str, Any]) -> dict[str, Any]:
                fn, frozen = traced(weights)
                if not frozen:
                    return call(fn, env)
                key = (id(weights), *(_shape(v) for v in env.values()))
                if key in seen:
                    return fn(env)
                # a new shape compiles, and inductor reads `freezing` while dynamo traces (before
                # a compile's own options apply); the patch costs ~0.9 ms, so not every step
                with torch._inductor.config.patch(freezing=True):
                    out = fn(env)
                seen.add(key)
                return out

            def call(fn: Callable[[dict[str, Any]], dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
                if not cuda:
                    return fn(env)
                torch.compiler.cudagraph_mark_step_begin()
                out = fn(env)
                return {k: (v.clone() if k == "logits" else v) for k, v in out.items()}

            run = replay
        if options.get("weights_key") and options.get("compile") is not False:
            from backends.torch.aot import with_programs

            run = with_programs(step, options, run)  # decode steps by a program kept on disk
        return torch.inference_mode()(run)


# Compiled graphs a process may hold for one step function: models x prompt buckets x phases
# (dynamo's default, 8 per code object, is a hard error under fullgraph=True).
RECOMPILE_LIMIT = 256


def _compile(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """`torch.compile` of a whole step: one graph, static shapes, RECOMPILE_LIMIT."""
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        kwargs["recompile_limit"] = RECOMPILE_LIMIT
    else:  # older torch: one process-wide limit
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(RECOMPILE_LIMIT, getattr(config, name)))
    return torch.compile(fn, dynamic=False, fullgraph=True, **kwargs)


def _freezable(weights: Mapping[str, Any], dtype: str | None) -> bool:
    """Whether a CPU weight set gains from freezing: bf16/fp16, and no quantised weight that
    the step dequantises (freezing would fold its dequantised copy into the graph)."""
    return dtype in ("bfloat16", "float16") and not any(
        isinstance(v, tuple) and v[0] is None for v in weights.values())


def _shape(value: Any) -> Any:
    """What of an env value decides the compiled graph: a tensor's (or a layer cache's) shape."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return tuple(value[0].shape)
    return value if isinstance(value, (int, float, str, bool, type(None))) else type(value)


class FrozenWeights(torch.nn.Module):
    """A weight set as the parameters of a module whose forward is the step, so that inductor's
    freezing folds them into the compiled graph as constants and lays the GEMM weights out for
    oneDNN ahead of time. On the CPU in bf16 this took the real Gemma 3 270M's decode from 44
    to ~61 tok/s (the LM head's GEMV alone from 11.2 to ~7.5 ms); in float32 it gained nothing
    and kept a second copy of the weights, so float32 is not frozen."""

    def __init__(self, weights: Mapping[str, Any], step: StepFn) -> None:
        super().__init__()
        self._step = step
        self._slots: list[tuple[str, tuple[str | None, ...], bool]] = []
        for i, (name, value) in enumerate(weights.items()):
            parts = value if isinstance(value, tuple) else (value,)  # quantised: a tuple
            attrs: list[str | None] = []
            for j, part in enumerate(parts):
                attrs.append(None if part is None else f"w{i}_{j}")
                if part is not None:
                    self.register_parameter(f"w{i}_{j}", torch.nn.Parameter(part, requires_grad=False))
            self._slots.append((name, tuple(attrs), isinstance(value, tuple)))

    def forward(self, env: dict[str, Any]) -> dict[str, Any]:
        weights: dict[str, Any] = {}
        for name, attrs, is_tuple in self._slots:
            parts = tuple(None if a is None else getattr(self, a) for a in attrs)
            weights[name] = parts if is_tuple else parts[0]
        return self._step(weights, env)


def int4_scales_and_zeros(row_scale: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """gemma-core's int4 [O, I/g, 2] (step, offset) as the int4 kernels' [I/g, O, 2] (scale,
    zero) in `dt`: they compute (c - 8) * scale + zero, so zero = offset + 8 * step."""
    step, offset = row_scale[..., 0], row_scale[..., 1]
    return torch.stack([step, offset + 8 * step], -1).transpose(0, 1).to(dt).contiguous()


def int4_pack(rows: torch.Tensor, kernel: str) -> torch.Tensor:
    """gemma-core's nibble-packed int4 rows (the even input in the low nibble) in the layout of
    the CPU kernel (from one int32 code per input) or of CUDA's tinygemm (from bytes holding
    the even input in the high nibble, tiled for m16n8k16 tensor cores)."""
    if kernel == "int4-cpu":
        codes = torch.stack([rows & 15, rows >> 4], dim=-1).reshape(rows.shape[0], -1)
        return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    inner = rows.shape[1] * 2
    inner_k_tiles = next(n for n in (8, 4, 2) if inner % (16 * n) == 0)
    swapped = ((rows & 15) << 4) | (rows >> 4)
    return torch._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles)


def _cuda_int4_or_none(rows: torch.Tensor, row_scale: torch.Tensor, fused_scale: torch.Tensor,
                       group_size: int, name: str) -> torch.Tensor | None:
    """The weight packed for tinygemm, if the kernel's product on it equals the dequantised
    weight's (within bf16 rounding; checked once per weight on load, on at most 512 output rows:
    the packing is an internal layout that has changed between torch releases); else None, with
    a warning, and the weight runs dequantised."""
    try:
        fused = int4_pack(rows, "int4-cuda")
        x = torch.randn(4, rows.shape[1] * 2, device=rows.device, generator=torch.Generator(
            rows.device).manual_seed(0)).to(torch.bfloat16)
        got = torch._weight_int4pack_mm(x, fused, group_size, fused_scale).float()
    except RuntimeError as e:  # a build or card without the kernel
        warnings.warn(f"torch's CUDA int4 kernel failed on {name!r} ({str(e).splitlines()[0]}); "
                      "it runs dequantised instead", stacklevel=3)
        return None
    out = rows.shape[0]
    sel = torch.arange(out) if out <= 512 else torch.cat([torch.arange(256), torch.arange(out - 256, out)])
    sel = sel.to(rows.device)
    want = F.linear(x.float(), dequantize(rows[sel], row_scale[sel], "int4", group_size, torch.float32))
    err = float((got[:, sel] - want).norm() / max(float(want.norm()), 1e-6))
    if err > 0.02:
        warnings.warn(f"torch's CUDA int4 kernel disagrees with the dequantised weight {name!r} "
                      f"(relative error {err:.2g}); it runs dequantised instead", stacklevel=3)
        return None
    return fused


def _static(x: torch.Tensor) -> torch.Tensor:
    """On CUDA, mark a long-lived buffer (weight, cache) static for CUDA-graph replays."""
    if x.is_cuda:
        torch._dynamo.mark_static_address(x)
    return x


backend = TorchBackend()


def as_module(model: Any, **kwargs: Any) -> torch.nn.Module:
    """A trainable `torch.nn.Module` over `model`'s op list (`backends.torch.module.as_module`)."""
    from backends.torch.module import as_module as make

    return make(model, **kwargs)
