"""The engine `backend="auto"` runs (the CLI's default when neither --backend nor
$GEMMA_BACKEND names one): the first backend of `ORDER` that imports here, with its dtype and
compile setting.

The order, from the decode tables of the real Gemma 3 270M on this project's 2-core CPU
(benchmarks/results-cpu*.md) and from what a process pays before its first token:

1. torch, bfloat16, prefill eager, decode compiled ahead of time: a model read from a GGUF
   file (a load-cache entry, so its weights have an identity across processes) with at least
   50M parameters decodes through a program compiled once and kept in the user cache
   (`backends/torch/aot.py`): the real 270M's decode step 26 ms against the eager step's 53 ms,
   ~60-110 s to compile the first time (a line on stderr says so), ~0.4 s to load afterwards
   (`--quantize int4`: 101 tok/s through its program, 1.35x llama.cpp's Q4_K_M).
   Other models run eagerly (31 tok/s on the 270M from a folder, transformers' speed; nothing to
   compile). `--compile` also compiles prefill (in every process: inductor cannot reuse a graph
   holding oneDNN-packed weights across processes, `gemma_core.compile_cache`); `--no-compile`
   is eager throughout.
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
    Engine("torch", "bfloat16", None, "bfloat16, prefill eager; a GGUF model's decode step compiled "
           "once and kept in the user cache (--no-compile: eager throughout)"),
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
