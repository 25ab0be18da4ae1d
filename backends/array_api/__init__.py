"""A backend written once against the Python Array API standard (through `array-api-compat`).

`ArrayAPIBackend(namespace)` runs Gemma on any Array-API library, unchanged. The registered
backend `"array_api"` uses `array_api_strict`, the standard's minimal reference library, which
refuses anything the standard does not define; that is what proves the op table portable:

    gemma_core.load("tiny-gemma3", backend="array_api")             # array-api-strict, float32/64
    gemma_core.load("tiny-gemma3", backend=for_namespace("torch"))  # the same ops on torch

`namespace` names a module whose `asarray` makes arrays of the library ("numpy", "torch", "jax",
"cupy", "dask", or any importable module such as "jax.numpy"); the op table then works on the
namespace `array_api_compat.array_namespace` gives for them. `numpy_backend`, `torch_backend`
and `jax_backend` are ready-made instances, named "array_api:<namespace>", which a package can
register under a name of its own (entry point `"array_api:torch" = "backends.array_api:torch_backend"`);
without registering, `gemma_core.get_backend("array_api:torch")` (`--backend array_api:torch`)
gives the same instance through `ArrayAPIBackend.variant`.

Dtypes: the standard's real floats of the namespace (float32, float64), plus bfloat16 and
float16 where the library has them as `xp.bfloat16` / `xp.float16` (not standard; torch, jax
and numpy's float16). Quantised weights are dequantised on the host once (gemma_core.quant).
The cache is written in place where the namespace's arrays are writeable, else rebuilt
functionally (JAX), and `cache_in_place` says which.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import array_api_compat
import numpy as np

from backends.array_api.ops import make_op_table
from gemma_core.backend import FLOAT16_REFUSED, Backend, unknown_variant
from gemma_core.errors import BackendError
from gemma_core.quant import dequantize

DEFAULT_NAMESPACE = "array_api_strict"
# short names for libraries whose array module is not the top-level one
ALIASES = {"jax": "jax.numpy", "dask": "dask.array", "mlx": "mlx.core"}
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
# device kinds (`Backend.devices`) of the namespaces this repository tests; others: "cpu"
DEVICE_KINDS = {
    "array_api_strict": ("cpu_device", "device1", "device2"),  # strict's (fake) devices
    "numpy": ("cpu",), "torch": ("cpu", "cuda", "mps", "xpu"), "jax": ("cpu", "gpu", "cuda", "rocm", "tpu"),
}
STANDARD_FLOATS = ("float32", "float64")  # the standard's real floating dtypes
# the namespaces `get_backend("array_api:<namespace>")` names in its messages; any other module
# whose `asarray` makes Array-API arrays works too
NAMESPACES = ("array_api_strict", "numpy", "torch", "jax", "cupy", "dask", "mlx")


def namespace_of(name: str) -> Any:
    """The Array-API namespace of library `name` (see the module docstring)."""
    module = importlib.import_module(ALIASES.get(name, name))
    return array_api_compat.array_namespace(module.asarray([0.0]))


def supported_dtypes(xp: Any) -> tuple[str, ...]:
    """The compute dtypes on namespace `xp`: the standard real floats it lists (float64 is
    optional in the standard), and the non-standard bfloat16/float16 where it has them."""
    standard = xp.__array_namespace_info__().dtypes(kind="real floating")
    return tuple(d for d in FLOAT_DTYPES
                 if (d in standard if d in STANDARD_FLOATS else hasattr(xp, d)))


class ArrayAPIBackend(Backend):
    """The op vocabulary on one Array-API namespace; host arrays cross by DLPack."""

    op_groups = ("core", "quantized", "classification", "lora")
    variants = NAMESPACES

    def __init__(self, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.namespace = namespace
        self.name = "array_api" if namespace == DEFAULT_NAMESPACE else f"array_api:{namespace}"
        self.xp = namespace_of(namespace)
        self.dtypes = supported_dtypes(self.xp)
        # the rule-9 refusals are gaps only where float16 runs at all
        self.gaps = FLOAT16_REFUSED if "float16" in self.dtypes else ()
        self.devices = DEVICE_KINDS.get(namespace, ("cpu",))
        # writeable arrays (numpy, torch, strict): kv_cache assigns slices; JAX: functional
        self.cache_in_place = array_api_compat.is_writeable_array(self.xp.zeros(1))

    def variant(self, name: str) -> ArrayAPIBackend:
        """`get_backend("array_api:<name>")`: the backend on namespace `name` (`for_namespace`).
        A module that is not installed is an unknown variant, except for the namespaces listed
        in `variants`, whose missing framework propagates (get_backend names what to install)."""
        try:
            return for_namespace(name)
        except ModuleNotFoundError:
            if name in self.variants:
                raise
            reason = "not installed"
        except (ImportError, AttributeError, TypeError, ValueError) as e:
            reason = f"not an Array-API library: {e}"  # e.g. a module without `asarray`
        raise BackendError(unknown_variant(
            "array_api", name, self.variants,
            f"; or any module whose asarray makes Array-API arrays; {name!r}: {reason}"))

    def _dtype(self, dtype: str) -> Any:
        if dtype not in self.dtypes:
            raise BackendError(f"dtype: backend {self.name!r} does not support {dtype!r} "
                               f"(supported: {', '.join(self.dtypes)})")
        return getattr(self.xp, dtype)

    def _device(self, device: str | None) -> Any:
        """None for the namespace's default device, else the device whose name is `device`."""
        if device is None:
            return None
        with warnings.catch_warnings():  # torch's device listing warns about retired device types
            warnings.simplefilter("ignore")
            devices = self.xp.__array_namespace_info__().devices()
        for d in devices:
            names = {str(d), getattr(d, "type", None), getattr(d, "platform", None)}
            names |= {str(d).rpartition("Device('")[2].rstrip("')")}  # array_api_strict.Device('X')
            if device.lower() in {str(n).lower() for n in names if n}:
                return d
        if array_api_compat.is_torch_namespace(self.xp):
            return device  # torch takes device strings ("cuda:1") that its listing may not show
        raise BackendError(f"device: {device!r} is not a device of {self.namespace} "
                           f"(devices: {', '.join(map(str, devices))})")

    def make_op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        return make_op_table(self.xp, self._dtype(dtype), self.cache_in_place)

    def convert_weight(self, w: np.ndarray, dtype: str, device: str | None) -> Any:
        dt = self._dtype(dtype)
        wide = np.float64 if dtype == "float64" else np.float32  # bf16/fp16 cast in the namespace
        return self.xp.astype(self.xp.asarray(np.asarray(w, wide), device=self._device(device)), dt)

    def prepare_quantized(self, values: np.ndarray, scale: np.ndarray, scheme: str,
                          group_size: int | None, dtype: str, device: str | None,
                          name: str = "") -> tuple[Any, Any]:
        """The weight dequantised once on the host and rounded to `dtype` (as numpy does); the
        scale kept beside it, unused by `qlinear`/`qembed`."""
        weight = dequantize(values, scale, scheme, group_size)
        return self.convert_weight(weight, dtype, device), self.convert_weight(scale, "float32", device)

    def asarray(self, x: np.ndarray, device: str | None) -> Any:
        return self.xp.asarray(np.asarray(x), device=self._device(device))

    def to_numpy(self, x: Any) -> np.ndarray:
        if not array_api_compat.is_array_api_obj(x) or isinstance(x, np.ndarray):
            return np.asarray(x)
        xp = array_api_compat.array_namespace(x)
        if xp.isdtype(x.dtype, "real floating") and x.dtype not in (xp.float32, xp.float64):
            x = xp.astype(x, xp.float32)  # bfloat16/float16 come back as float32
        try:
            return np.from_dlpack(x)  # standard interchange, no copy on the CPU
        except (BufferError, RuntimeError, TypeError, ValueError):
            return np.asarray(array_api_compat.to_device(x, "cpu"))  # an accelerator's array

    def new_cache_layer(self, batch: int, kv_heads: int, capacity: int, head_dim: int,
                        dtype: str, device: str | None) -> Any:
        shape = (batch, kv_heads, capacity, head_dim)
        dt, dev = self._dtype(dtype), self._device(device)
        return self.xp.zeros(shape, dtype=dt, device=dev), self.xp.zeros(shape, dtype=dt, device=dev)

    def export_cache_layer(self, state: Any) -> tuple[np.ndarray, np.ndarray]:
        k, v = state
        return np.array(self.to_numpy(k)), np.array(self.to_numpy(v))

    def copy_cache_layer(self, state: Any) -> Any:
        k, v = state  # kv_cache writes these in place where the namespace allows
        return self.xp.asarray(k, copy=True), self.xp.asarray(v, copy=True)


_INSTANCES: dict[str, ArrayAPIBackend] = {}


def for_namespace(namespace: str = DEFAULT_NAMESPACE) -> ArrayAPIBackend:
    """The backend on `namespace`, one instance per namespace (its op tables built once)."""
    if namespace not in _INSTANCES:
        _INSTANCES[namespace] = ArrayAPIBackend(namespace)
    return _INSTANCES[namespace]


backend = for_namespace()


def __getattr__(attr: str) -> ArrayAPIBackend:
    """`numpy_backend`, `torch_backend`, `jax_backend`: made on first use, so that importing
    this module imports no framework."""
    if attr.endswith("_backend") and attr[:-len("_backend")] in ("numpy", "torch", "jax"):
        return for_namespace(attr[:-len("_backend")])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
