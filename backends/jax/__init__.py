"""The JAX backend: float32, bfloat16 and float16 (float64 when `jax_enable_x64` is on);
parameters placed once on the default device; the whole step under `jax.jit` with the cache
donated, so XLA updates it in place."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from backends.jax.ops import DTYPES, make_op_table
from gemma_core.backend import FLOAT16_REFUSED, Backend, StepFn
from gemma_core.errors import BackendError
from gemma_core.graph import cache_name
from gemma_core.quant import unpack_nibbles

CACHE_PREFIX = cache_name(0)[:-1]  # "cache."


class JaxBackend(Backend):
    """Realises the op vocabulary with jax.numpy on the default JAX device."""

    name = "jax"
    op_groups = ("core", "quantized", "classification", "lora")
    devices = ("default", "cpu", "gpu", "cuda", "rocm", "tpu")
    gaps = FLOAT16_REFUSED

    @property
    def dtypes(self) -> tuple[str, ...]:  # type: ignore[override]
        x64 = bool(jax.config.read("jax_enable_x64"))
        return tuple(d for d in DTYPES if d != "float64" or x64)

    def make_op_table(self, dtype: str) -> Mapping[str, Callable[..., Any]]:
        return make_op_table(dtype)

    def _device(self, device: str | None) -> Any:
        if device in (None, "default"):
            return None
        try:
            return jax.devices(device)[0]
        except RuntimeError as e:
            raise BackendError(f"device: {device!r} is not available to JAX ({e})") from None

    def convert_weight(self, w: np.ndarray, dtype: str, device: str | None) -> Any:
        return jax.device_put(jnp.asarray(np.asarray(w, np.float32), DTYPES[dtype]), self._device(device))

    def prepare_quantized(self, values: np.ndarray, scale: np.ndarray, scheme: str,
                          group_size: int | None, dtype: str, device: str | None,
                          name: str = "") -> tuple[Any, Any]:
        """The gemma-core layout, except that on the CPU 4-bit codes are held one per byte:
        XLA CPU unpacks nibbles slowly (a 4096 x 640 int4 product took 3.5x the time of the
        int8 one with packed codes, about the same with unpacked ones), so there int4/nf4 cost
        the memory of int8 and keep 4-bit numerics."""
        dev = self._device(device)
        if scheme != "int8" and (dev or jax.devices()[0]).platform == "cpu":
            values = unpack_nibbles(values)
        return self.asarray(values, device), self.convert_weight(scale, "float32", device)

    def asarray(self, x: np.ndarray, device: str | None) -> Any:
        return jax.device_put(jnp.asarray(x), self._device(device))

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
            x = x.astype(jnp.float32)
        return np.asarray(x)

    def greedy_tokens(self, logits: Any) -> np.ndarray:
        if not isinstance(logits, jax.Array):
            return super().greedy_tokens(logits)
        last = logits[:, -1]
        last = last.astype(jnp.float32) if last.dtype == jnp.float64 else last  # the rule's float32
        return np.asarray(jnp.argmax(last, axis=-1)).astype(np.int64)  # numpy's tie rule

    def new_cache_layer(self, batch: int, kv_heads: int, capacity: int, head_dim: int,
                        dtype: str, device: str | None) -> Any:
        shape = (batch, kv_heads, capacity, head_dim)
        dev = self._device(device)
        return (jax.device_put(jnp.zeros(shape, DTYPES[dtype]), dev),
                jax.device_put(jnp.zeros(shape, DTYPES[dtype]), dev))

    def export_cache_layer(self, state: Any) -> tuple[np.ndarray, np.ndarray]:
        k, v = state
        return self.to_numpy(k), self.to_numpy(v)

    def copy_cache_layer(self, state: Any) -> Any:
        k, v = state  # new buffers on the same device, which the jitted step may donate
        return jnp.array(k, copy=True), jnp.array(v, copy=True)

    def reorder_cache_layer(self, state: Any, rows: np.ndarray) -> Any:
        k, v = state
        return jnp.take(k, rows, axis=0), jnp.take(v, rows, axis=0)

    def write_cache_row(self, state: Any, row: int, source: Any, source_row: int) -> Any:
        (k, v), (sk, sv) = state, source
        return k.at[row].set(sk[source_row]), v.at[row].set(sv[source_row])

    def shift_cache_layer(self, state: Any, shift: int) -> Any:
        k, v = state
        roll = -(shift % k.shape[2])
        return jnp.roll(k, roll, axis=2), jnp.roll(v, roll, axis=2)

    def mutates_cache(self, options: Mapping[str, Any]) -> bool:
        """The jitted step donates the cache buffers; the eager one (`compile=False`) is functional."""
        return options.get("compile") is not False

    def static_shapes(self, options: Mapping[str, Any]) -> bool:
        return options.get("compile") is not False

    def compile_step(self, step: StepFn, options: Mapping[str, Any]) -> StepFn:
        """`jax.jit` of the whole step, the environment (its cache buffers included) donated.

        Eager (op-by-op) when `compile=False` is asked for explicitly; jit is the default.
        """
        if options.get("compile") is False:
            return step
        from gemma_core.compile_cache import enable_jax

        enable_jax()  # the persistent compilation cache, in the user cache folder

        def split_step(weights: Mapping[str, Any], inputs: dict[str, Any],
                       caches: dict[str, Any]) -> dict[str, Any]:
            return step(weights, {**inputs, **caches})

        jitted = jax.jit(split_step, donate_argnums=(2,))  # only the cache buffers are donated

        def run(weights: Mapping[str, Any], env: dict[str, Any]) -> dict[str, Any]:
            caches = {k: v for k, v in env.items() if k.startswith(CACHE_PREFIX)}
            inputs = {k: v for k, v in env.items() if not k.startswith(CACHE_PREFIX)}
            return jitted(weights, inputs, caches)

        run.jitted = jitted  # type: ignore[attr-defined]
        return run


backend = JaxBackend()


def as_function(model: Any, dtype: str | None = None, allow_float16: bool = False,
                **lora: Any) -> tuple[Any, Any]:
    """`(apply, params)`: a pure, jit-able, differentiable JAX function of a causal-LM model of any
    backend and its weights under canonical names (backends.jax.function, imported on first use;
    `lora=`, `lora_weights=`, `seed=` add a LoRA adapter)."""
    from backends.jax.function import as_function as make

    return make(model, dtype, allow_float16, **lora)
