"""The cross-backend conformance suite: a case catalogue, one tolerance table, and a runner.

Every backend is compared with the NumPy reference on the same weights and inputs: logits and
KV-cache states after prefill and after every decode step, plus each op kind on its own.
"""

from conformance.cases import MODEL_CASES, OP_CASES, ModelCase, OpCase
from conformance.runner import Result, run_conformance
from conformance.tolerances import TOLERANCES, Tolerance

__all__ = ["MODEL_CASES", "OP_CASES", "TOLERANCES", "ModelCase", "OpCase", "Result", "Tolerance",
           "run_conformance"]
