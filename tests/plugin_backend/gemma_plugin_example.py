"""A third-party backend, as a plugin author would write one (the template in docs/backends.md).

`backend` realises every op kind by delegating to the NumPy reference; `incomplete` lacks one op
kind, which the conformance runner must name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from backends.numpy import NumpyBackend


class ExampleBackend(NumpyBackend):
    name = "example"


class IncompleteBackend(NumpyBackend):
    name = "incomplete"

    def make_op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        table = dict(super().make_op_table(dtype))
        del table["softcap"]
        return table


backend = ExampleBackend()
incomplete = IncompleteBackend()
