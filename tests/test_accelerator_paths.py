"""The torch, jax and tensorflow op tables' accelerator formulations (the products as a GPU runs
them: narrow operands with float32 accumulation, narrow attention, int8 weights converted inside
the product and scaled after it, packed 4-bit codes), run on the CPU against the NumPy
reference. No GPU is needed to prove their numerics; only their speed waits for one. (torch's
CUDA int4 kernel is the exception: it runs on CUDA alone, and checks itself against the
dequantised weight when a weight is loaded, `backends.torch._int4_kernel_agrees`.)"""

from __future__ import annotations

from typing import Any

import pytest

from conformance.cases import MODEL_CASES, OP_CASES
from conformance.runner import run_model_case, run_op_case
from conformance.tolerances import TOLERANCES
from gemma_core.backend import Backend

OPS = ("op-linear", "op-attention", "op-quantized")
MODELS = ("gemma2-int8", "gemma1-int4-untied", "gemma3-nf4-float-embedding")


def _torch() -> Backend:
    pytest.importorskip("torch")
    from backends.torch import TorchBackend
    from backends.torch.ops import make_op_table

    class TorchAccelerator(TorchBackend):
        def make_op_table(self, dtype: str) -> Any:
            return make_op_table(dtype, cpu=False)

        def quant_kernel(self, *args: Any) -> None:  # CUDA's int4 kernel needs CUDA
            return None

    return TorchAccelerator()


def _jax() -> Backend:
    pytest.importorskip("jax")
    from backends.jax import JaxBackend
    from backends.jax.ops import make_op_table

    class JaxAccelerator(JaxBackend):
        def make_op_table(self, dtype: str) -> Any:
            return make_op_table(dtype, cpu=False)

        def prepare_quantized(self, *args: Any, **kwargs: Any) -> Any:  # codes stay packed
            return Backend.prepare_quantized(self, *args, **kwargs)

    return JaxAccelerator()


def _tensorflow() -> Backend:
    pytest.importorskip("tensorflow")
    from backends.tensorflow import TensorflowBackend
    from backends.tensorflow.ops import make_op_table

    class TensorflowAccelerator(TensorflowBackend):
        def make_op_table(self, dtype: str) -> Any:
            return make_op_table(dtype, cpu=False)

    return TensorflowAccelerator()


BACKENDS = {"torch": _torch, "jax": _jax, "tensorflow": _tensorflow}


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
