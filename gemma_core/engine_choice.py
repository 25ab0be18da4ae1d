"""The engine `backend="auto"` runs (the CLI's default when neither --backend nor
$GEMMA_BACKEND names one): the first backend of `ORDER` that imports here, with its dtype and
compile setting.

The order, from the decode tables of the real Gemma 3 270M on this project's 2-core CPU
(benchmarks/results-cpu*.md) and from what a process pays before its first token:

1. torch, eager, bfloat16: 31 tok/s decode (transformers' speed) and nothing to compile; since
   greedy argmax moved to the device, 1.70x transformers' eager bf16 (results-cpu-e2e.md).
   Compiled torch decodes at 61-79 tok/s but is never chosen by itself: its frozen bf16 step
   costs 24-150 s of compile in every new process (inductor cannot reuse a graph holding
   oneDNN-packed weights across processes, `gemma_core.compile_cache`), which 31 against
   61 tok/s repays only after ~1500 tokens. `--compile` asks for it.
2. jax, jit, bfloat16: 28 tok/s; its first compile (~12 s) is kept in the persistent
   compilation cache, so later processes start without it.
3. numpy, float32: the reference, 18 tok/s, always installed.

TensorFlow (33 tok/s bf16) is not in the order: its graph compiles again in every process
(~11 s, no persistent cache) after an import of several seconds. On a GPU, name the backend and
device: these measurements are the CPU's."""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"


@dataclass(frozen=True)
class Engine:
    """A backend with the dtype and compile setting it runs under `auto`, and why."""

    backend: str
    dtype: str
    compile: bool | None
    reason: str


ORDER = (
    Engine("torch", "bfloat16", False, "eager bfloat16 decodes faster than transformers' with no "
           "compile (compiled torch compiles for 24-150 s in each process: --compile)"),
    Engine("jax", "bfloat16", None, "jit bfloat16, its compile kept in the persistent cache"),
    Engine("numpy", "float32", None, "the reference; no faster backend imports here"),
)


def auto_dtype(backend: str | None) -> str:
    """`dtype="auto"`: bfloat16 wherever a backend computes it natively, which decoded faster
    than float32 on every framework measured (the real 270M on this project's 2-core CPU: torch
    31 vs 20 tok/s eager, 61 vs 22 compiled; jax 28 vs 21; tensorflow 33 vs 31,
    benchmarks/results-cpu*.md); float32 on the NumPy reference (its bfloat16 is an emulation)
    and the Array-API backend (the standard has no bfloat16)."""
    from gemma_core.backend import default_backend_name

    name = (backend or default_backend_name()).split(":")[0]
    return "float32" if name in ("numpy", "array_api") else "bfloat16"


def choose_engine(order: tuple[Engine, ...] = ORDER) -> Engine:
    """The first engine of `order` whose backend imports here (importing it: the caller runs it
    next). The last, numpy, always does."""
    from gemma_core.backend import get_backend
    from gemma_core.errors import BackendError

    skipped = []
    for engine in order:
        try:
            get_backend(engine.backend)
        except BackendError:
            skipped.append(engine.backend)
            continue
        if skipped:
            return Engine(engine.backend, engine.dtype, engine.compile,
                          f"{engine.reason}; {', '.join(skipped)} not installed")
        return engine
    raise BackendError("no backend imports here")  # numpy is a dependency: only a broken install


def resolve(backend: str | None, dtype: str,
            compile: bool | None) -> tuple[str | None, str, bool | None, str]:
    """(backend, dtype, compile, why) for what a user asked: `backend="auto"` becomes the chosen
    engine (an explicit dtype or compile setting kept), `dtype="auto"` the backend's dtype."""
    why = ""
    if backend == AUTO:
        engine = choose_engine()
        backend, why = engine.backend, f"chosen by default: {engine.reason}"
        dtype = engine.dtype if dtype == AUTO else dtype
        compile = engine.compile if compile is None else compile
    if dtype == AUTO:
        dtype = auto_dtype(backend)
    return backend, dtype, compile, why
