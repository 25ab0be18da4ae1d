"""The PyTorch backend's own properties: in-place static caches, one tied embedding, devices,
and a compiled step that does not recompile (conformance and parity: test_backends.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import exhaustive

import gemma_core
from gemma_core.errors import BackendError
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights

torch = pytest.importorskip("torch")


def test_cache_is_static_and_updated_in_place() -> None:
    model = gemma_core.load("tiny-gemma3", backend="torch")
    out = model.forward(np.array([[2, 5, 6, 7]]), max_length=16)
    pointers = [layer[0].data_ptr() for layer in out.cache.layers]
    shapes = [tuple(layer[0].shape) for layer in out.cache.layers]
    cache = out.cache
    for token in range(8, 18):
        # handed over (as generation does): the step updates the buffers in place
        cache = model.forward(np.array([[token]]), cache=cache, last_only=True, donate_cache=True).cache
    assert [layer[0].data_ptr() for layer in cache.layers] == pointers
    assert [tuple(layer[0].shape) for layer in cache.layers] == shapes
    assert shapes[0][2] == 8 and shapes[5][2] == 16  # ring of W slots; global layer of max_length


def test_tied_embedding_is_one_tensor() -> None:
    config = get_preset("tiny-gemma")
    weights = random_weights(config, 0)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model = gemma_core.Model(config, weights, backend="torch")
    assert "lm_head.weight" not in model.weights
    head = next(op for op in model.graph if op.outputs == ("logits",))
    assert model.weights[head.params[0]] is model.weights["model.embed_tokens.weight"]


def test_outputs_and_devices() -> None:
    model = gemma_core.load("tiny-gemma3", backend="torch", dtype="bfloat16")
    logits = model.forward(np.array([[2, 3]])).logits
    assert logits.dtype == torch.bfloat16
    assert model.to_numpy(logits).dtype == np.float32
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="cuda is not available"):
            gemma_core.load("tiny-gemma", backend="torch", device="cuda")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [exhaustive("float32", id="float32"), "bfloat16"])  # bf16: frozen weights
def test_compiled_step_without_recompiling(dtype: str) -> None:
    """float32: equal to eager; bf16: inductor keeps fused intermediates in float32 where eager
    rounds each op to bf16, so its numerics are held by the conformance test below."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = gemma_core.load("tiny-gemma3", backend="torch", compile=True, dtype=dtype)
    eager = gemma_core.load("tiny-gemma3", backend="torch", dtype=dtype)
    ids = np.array([[2, 5, 6, 7, 8]])
    c = compiled.forward(ids, max_length=16, last_only=True).cache
    e = eager.forward(ids, max_length=16, last_only=True).cache
    graphs = None
    for step, token in enumerate(range(9, 17)):
        oc = compiled.forward(np.array([[token]]), cache=c, last_only=True)
        oe = eager.forward(np.array([[token]]), cache=e, last_only=True)
        c, e = oc.cache, oe.cache
        if dtype == "float32":
            np.testing.assert_allclose(compiled.to_numpy(oc.logits), eager.to_numpy(oe.logits), atol=1e-5)
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # decode steps 2..8 reused step 1's graph


# ~70-130 s a case (three inductor compiles): the int4 case also runs the int8 kernel (its tied
# int8 embedding is the LM head) and Gemma 2's alternating windows, so by default it runs alone
# (compiled torch is not the default engine); the others are in the exhaustive sweep
@pytest.mark.slow
@pytest.mark.parametrize("case", [exhaustive("gemma3-local-global-rope"), "gemma2-int4-int8-embedding",
                                  exhaustive("gemma2-int8")])
def test_compiled_bfloat16_conforms(case: str) -> None:
    """The compiled CPU step in bf16 (weights frozen into the graph, oneDNN's pre-packed GEMMs,
    the int8/int4 kernels) against the NumPy reference, prefill and every decode step."""
    from backends.torch import TorchBackend
    from conformance.cases import MODEL_CASES
    from conformance.runner import run_model_case
    from conformance.tolerances import TOLERANCES

    class Compiled(TorchBackend):
        def compile_step(self, step, options):  # type: ignore[no-untyped-def]
            return super().compile_step(step, {**options, "compile": True})

    run_model_case(next(c for c in MODEL_CASES if c.name == case), Compiled(), "bfloat16",
                   TOLERANCES["bfloat16"])


def _tinygemm(x: torch.Tensor, packed: torch.Tensor, group_size: int,
              scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """CUDA's int4 kernel as its source states it, for a `packed` left unpacked: bytes with the
    even input in the high nibble, value (c - 8) * scale + zero per [input group, output]."""
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1).float()
    scale, zero = (scales_and_zeros[..., i].float().t().repeat_interleave(group_size, 1) for i in (0, 1))
    return (x.float() @ ((codes - 8) * scale + zero).t()).to(x.dtype)


@pytest.mark.parametrize("kernel", ["right", "wrong", "missing"])
def test_cuda_int4_packing_checks_itself_on_load(monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    """The CUDA int4 layout (nibble order, zero points, inner k-tiles) against the kernel's
    stated semantics, and the load-time check: a kernel that disagrees, or that this build or
    card lacks, leaves the weight dequantised, with a warning. (CUDA itself is absent here: the
    packing step is left out, the kernel emulated.)"""
    from backends.torch import TorchBackend
    from gemma_core.quant import dequantize, quantize

    def missing(*args: object) -> None:
        raise RuntimeError("_weight_int4pack_mm_cuda is not available for build.")

    backend = TorchBackend()
    tiles: list[int] = []
    monkeypatch.setattr(backend, "quant_kernel", lambda *args: "int4-cuda")
    monkeypatch.setattr(torch, "_convert_weight_to_int4pack", lambda rows, t: tiles.append(t) or rows)
    wrong = lambda x, w, g, sz: _tinygemm(x, ((w & 15) << 4) | (w >> 4), g, sz)  # noqa: E731
    monkeypatch.setattr(torch, "_weight_int4pack_mm", {"right": _tinygemm, "wrong": wrong,
                                                       "missing": missing}[kernel])
    w = np.random.default_rng(0).normal(size=(1024, 256)).astype(np.float32)  # checked on 512 rows
    values, scale = quantize(w, "int4", 32)
    if kernel == "right":
        (fused, rows, _), fused_scale = backend.prepare_quantized(values, scale, "int4", 32,
                                                                  "bfloat16", "cpu", "q")
        assert rows is None and fused is not None and tiles == [8]  # K = 256: 8 tiles of 16 x 2
        x = torch.randn(3, 256, dtype=torch.bfloat16)
        got = _tinygemm(x, fused, 32, fused_scale).float()
        want = x.float() @ torch.from_numpy(dequantize(values, scale, "int4", 32)).t()
        assert float((got - want).norm() / want.norm()) < 0.01  # bf16 scales and output only
    else:
        with pytest.warns(UserWarning, match="disagrees" if kernel == "wrong" else "failed"):
            (fused, rows, row_scale), _ = backend.prepare_quantized(values, scale, "int4", 32,
                                                                    "bfloat16", "cpu", "q")
        assert fused is None and rows is not None and row_scale is not None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("scheme", "group", "kernel"), [("int8", None, "_weight_int8pack_mm"),
                                                       ("int4", 32, "_weight_int4pack_mm_for_cpu")])
def test_the_cpu_kernels_run_decode_rows_and_prompts_dequantise(
        monkeypatch: pytest.MonkeyPatch, scheme: str, group: int | None, kernel: str, dtype: str) -> None:
    """int8/int4 weights on the CPU: the kernel for up to KERNEL_ROWS (float32, its scales in
    float32) or NARROW_KERNEL_ROWS rows (bf16), one dequantised GEMM above; both equal the
    product of the dequantised weight (to bf16 rounding)."""
    from backends.torch import TorchBackend, ops
    from gemma_core.quant import dequantize, quantize

    w = np.random.default_rng(0).normal(size=(96, 64)).astype(np.float32)
    values, scale = quantize(w, scheme, group)
    backend, dt = TorchBackend(), ops.DTYPES[dtype]
    packed, fused_scale = backend.prepare_quantized(values, scale, scheme, group, dtype, "cpu", "q")
    assert fused_scale.dtype == dt
    calls: list[int] = []
    real = getattr(torch, kernel)
    monkeypatch.setattr(torch, kernel, lambda x, *args: calls.append(len(x)) or real(x, *args))
    want = torch.from_numpy(dequantize(values, scale, scheme, group))
    policy = ops.Policy(dtype)
    most = ops.KERNEL_ROWS if dtype == "float32" else ops.NARROW_KERNEL_ROWS
    for rows in (1, most, most + 1, 2 * most + 8):
        x = torch.randn(1, rows, 64).to(dt)
        got = ops.qlinear(policy, x, packed, fused_scale, scheme=scheme, group_size=group).float()
        exact = x.float() @ want.t()
        tol = 1e-5 if dtype == "float32" else 2e-2 * float(exact.std())
        torch.testing.assert_close(got, exact, rtol=tol, atol=tol)
    assert calls == [1, most]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_nf4_on_the_cpu_is_dequantised_once_in_narrow_dtypes(dtype: str) -> None:
    """No torch CPU kernel reads nf4's codebook: in bf16/fp16 the weight is dequantised once at
    load ("nf4-dense") and its products equal, bit for bit, those of the weight dequantised at
    every step (the float32 path, which keeps the 4-bit codes); the embedding keeps its rows."""
    from backends.torch import TorchBackend, ops
    from gemma_core.quant import dequantize, quantize

    w = np.random.default_rng(0).normal(size=(96, 128)).astype(np.float32)
    values, scale = quantize(w, "nf4", 32)
    backend, dt = TorchBackend(), ops.DTYPES[dtype]
    assert torch.equal(ops.dequantize(torch.from_numpy(values), torch.from_numpy(scale), "nf4", 32,
                                      torch.float32), torch.from_numpy(dequantize(values, scale, "nf4", 32)))
    x = torch.randn(2, 5, 128).to(dt)
    policy = ops.Policy(dtype)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        packed, fused_scale = backend.prepare_quantized(values, scale, "nf4", 32, dtype, "cpu", name)
        fused, rows, _ = packed
        if dtype == "float32":
            assert fused is None and rows is not None  # dequantised each step: 4 bits held
            continue
        assert fused.dtype == dt and fused.shape == (96, 128)
        assert (rows is not None) == (name == "model.embed_tokens.weight")
        step_by_step = (None, torch.from_numpy(values), torch.from_numpy(scale))
        got = ops.qlinear(policy, x, packed, fused_scale, scheme="nf4", group_size=32)
        want = ops.qlinear(policy, x, step_by_step, None, scheme="nf4", group_size=32)
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_one_narrow_row_takes_the_matrix_vector_kernel(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """Batch-1 decode in bf16/fp16 on the CPU: `linear` runs torch.mv for a single row (faster
    here), with the products of F.linear bit for bit; more rows take F.linear."""
    from backends.torch import ops

    dt = ops.DTYPES[dtype]
    w, policy = torch.randn(96, 64).to(dt), ops.Policy(dtype)
    calls: list[int] = []
    real = torch.mv
    monkeypatch.setattr(torch, "mv", lambda m, v: calls.append(len(v)) or real(m, v))
    for shape in ((1, 1, 64), (1, 64), (2, 1, 64), (1, 3, 64)):
        x = torch.randn(shape).to(dt)
        got = ops.linear(policy, x, w)
        assert got.shape == (*shape[:-1], 96) and torch.equal(got, torch.nn.functional.linear(x, w))
    assert calls == [64, 64]
