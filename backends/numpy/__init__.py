"""The NumPy reference backend: float32, float64 (the oracle), and bf16/fp16 rounding emulated."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from backends.numpy.ops import STORAGE, compute_dtype, make_op_table, make_rounder
from gemma_core.backend import FLOAT16_REFUSED, Backend
from gemma_core.errors import BackendError


class NumpyBackend(Backend):
    """Reference realisation; clarity over speed."""

    name = "numpy"
    dtypes = tuple(STORAGE)
    op_groups = ("core", "quantized", "classification", "lora")
    devices = ("cpu",)
    gaps = FLOAT16_REFUSED

    def make_op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        return make_op_table(dtype)

    def convert_weight(self, w: np.ndarray, dtype: str, device: str | None) -> Any:
        _check_device(device)
        return make_rounder(dtype)(w)

    def asarray(self, x: np.ndarray, device: str | None) -> Any:
        return np.asarray(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind == "f" and x.dtype.itemsize < 4:
            return x.astype(np.float32)
        return x

    def new_cache_layer(self, batch: int, kv_heads: int, capacity: int, head_dim: int,
                        dtype: str, device: str | None) -> Any:
        _check_device(device)
        shape = (batch, kv_heads, capacity, head_dim)
        acc = compute_dtype(dtype)
        return np.zeros(shape, acc), np.zeros(shape, acc)

    def export_cache_layer(self, state: Any) -> tuple[np.ndarray, np.ndarray]:
        k, v = state
        return np.array(k), np.array(v)

    def copy_cache_layer(self, state: Any) -> Any:
        k, v = state  # kv_cache writes these buffers in place
        return k.copy(), v.copy()

    def reorder_cache_layer(self, state: Any, rows: np.ndarray) -> Any:
        k, v = state
        return k[rows], v[rows]

    def write_cache_row(self, state: Any, row: int, source: Any, source_row: int) -> Any:
        (k, v), (sk, sv) = state, source
        k[row], v[row] = sk[source_row], sv[source_row]
        return k, v

    def shift_cache_layer(self, state: Any, shift: int) -> Any:
        k, v = state
        roll = -(shift % k.shape[2])
        return np.roll(k, roll, axis=2), np.roll(v, roll, axis=2)


def _check_device(device: str | None) -> None:
    if device not in (None, "cpu"):
        raise BackendError(f"device: the numpy backend runs on the CPU only, got {device!r}")


backend = NumpyBackend()
