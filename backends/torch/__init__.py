"""The PyTorch backend: CPU, CUDA and MPS; float32, bfloat16, float16 (and float64);
SDPA attention where no softcap applies; static caches updated in place; an optional
`torch.compile` of the whole step (CUDA graphs on GPU)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from backends.torch.ops import DTYPES, make_op_table
from gemma_core.backend import Backend, StepFn
from gemma_core.errors import BackendError


class TorchBackend(Backend):
    """Realises the op vocabulary with torch tensors."""

    name = "torch"
    dtypes = tuple(DTYPES)

    def __init__(self) -> None:
        self._tables: dict[str, Mapping[str, Callable[..., Any]]] = {}

    def op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        if dtype not in self._tables:
            self._tables[dtype] = make_op_table(dtype)
        return self._tables[dtype]

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

    def prepare_weights(self, weights: Mapping[str, np.ndarray], dtype: str,
                        device: str | None) -> dict[str, Any]:
        dev, dt = self.device(device), DTYPES[dtype]
        converted: dict[int, torch.Tensor] = {}  # by id: the tied embedding is placed once
        out = {}
        for name, w in weights.items():
            if id(w) not in converted:
                host = torch.from_numpy(np.ascontiguousarray(np.asarray(w, np.float32)))
                converted[id(w)] = host.to(device=dev, dtype=dt)
            out[name] = converted[id(w)]
        return out

    def asarray(self, x: np.ndarray, device: str | None) -> Any:
        return torch.as_tensor(np.ascontiguousarray(x), device=self.device(device))

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if x.is_floating_point() and x.dtype != torch.float64:
                x = x.float()
            return x.cpu().numpy()
        return np.asarray(x)

    def new_cache_layer(self, batch: int, kv_heads: int, capacity: int, head_dim: int,
                        dtype: str, device: str | None) -> Any:
        shape = (batch, kv_heads, capacity, head_dim)
        dev = self.device(device)
        return (torch.zeros(shape, dtype=DTYPES[dtype], device=dev),
                torch.zeros(shape, dtype=DTYPES[dtype], device=dev))

    def export_cache_layer(self, state: Any) -> tuple[np.ndarray, np.ndarray]:
        k, v = state
        return self.to_numpy(k), self.to_numpy(v)

    def compile_step(self, step: StepFn, options: Mapping[str, Any]) -> StepFn:
        run = torch.inference_mode()(step)
        if not options.get("compile"):
            return run
        compiled = torch.compile(step, dynamic=False, fullgraph=False)
        return torch.inference_mode()(compiled)


backend = TorchBackend()
