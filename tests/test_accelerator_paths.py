"""The torch, jax and tensorflow op tables' accelerator formulations (the products as a GPU runs
them: narrow operands with float32 accumulation, narrow attention, int8 weights converted inside
the product and scaled after it, packed 4-bit codes), run on the CPU against the NumPy
reference. No GPU is needed to prove their numerics; only their speed waits for one. (torch's
CUDA int4 kernel is the exception: it runs on CUDA alone, and checks itself against the
dequantised weight when a weight is loaded, `backends.torch._cuda_int4_or_none`.)"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest

from conformance.cases import MODEL_CASES, OP_CASES
from conformance.runner import run_model_case, run_op_case
from conformance.tolerances import TOLERANCES
from gemma_core.backend import Backend

OPS = ("op-linear", "op-attention", "op-quantized")
MODELS = ("gemma2-int8", "gemma1-int4-untied", "gemma3-nf4-float-embedding")


def _accelerator(framework: str, **overrides: Any) -> Backend:
    """`framework`'s backend with the op table of its accelerator formulations (`make_op_table(
    dtype, cpu=False)`) and `overrides` of its methods."""
    pytest.importorskip(framework)
    module = importlib.import_module(f"backends.{framework}")
    ops = importlib.import_module(f"backends.{framework}.ops")
    base = type(module.backend)
    methods = {"make_op_table": lambda self, dtype: ops.make_op_table(dtype, cpu=False), **overrides}
    return type(f"{base.__name__}Accelerator", (base,), methods)()


BACKENDS: dict[str, Callable[[], Backend]] = {
    # CUDA's int4 kernel needs CUDA: the weights take the dequantising formulation
    "torch": lambda: _accelerator("torch", quant_kernel=lambda self, *args: None),
    # 4-bit codes stay nibble-packed, as on accelerators (the CPU holds them one per byte)
    "jax": lambda: _accelerator("jax", prepare_quantized=Backend.prepare_quantized),
    "tensorflow": lambda: _accelerator("tensorflow"),
}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def accelerator(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accelerator_ops_match_the_reference(accelerator: Backend, dtype: str) -> None:
    for case in OP_CASES:
        if case.name in OPS:
            run_op_case(case, accelerator, dtype, TOLERANCES[dtype])  # raises on a mismatch


def test_accelerator_models_match_the_reference(accelerator: Backend) -> None:
    for case in MODEL_CASES:  # bfloat16, the accelerators' dtype (float32 is held by the ops)
        if case.name in MODELS:
            run_model_case(case, accelerator, "bfloat16", TOLERANCES["bfloat16"])
