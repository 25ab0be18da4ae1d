"""A third-party backend, as a plugin author would write one (the template in docs/backends.md).

`backend` realises the core op kinds and the classification head by delegating to the NumPy
reference, and declares what it leaves out: no float16, no quantised ops (the "quantized" group),
and one known gap; `gemma conformance` skips those cases as not supported and passes.
`incomplete` lacks one required core op kind, which the conformance runner must name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from backends.numpy import NumpyBackend
from gemma_core.opset import kinds_of


class ExampleBackend(NumpyBackend):
    name = "example"
    dtypes = ("float32", "bfloat16")  # no float16 (nor the float64 oracle)
    op_groups = ("core", "classification")  # no qlinear / qembed
    devices = ("cpu",)
    gaps = (("gemma3-decode-past-ring", "*", "example: decode past the sliding ring is not done yet"),)

    def make_op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        table = super().make_op_table(dtype)
        return {kind: table[kind] for kind in kinds_of(self.op_groups)}


class IncompleteBackend(NumpyBackend):
    name = "incomplete"

    def make_op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        table = dict(super().make_op_table(dtype))
        del table["softcap"]
        return table


backend = ExampleBackend()
incomplete = IncompleteBackend()
