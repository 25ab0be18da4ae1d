"""Torch's decode step compiled ahead of time and kept across processes (AOTInductor).

`torch.compile` of the frozen bf16 step doubles the CPU decode speed, but torch 2.13 compiles it
again in every process (`gemma_core.compile_cache`). This module exports the decode step once
(`torch.export`, batch and cache slots dynamic, so one program serves every batch size and cache
length), compiles it with inductor's freezing and GEMM autotuning (the weights constants of the
program, each GEMM's packed for the kernel that won: oneDNN's, aten's or inductor's C++
template; the embedding's gather runs before it, `split_embedding`) into a shared object, and
keeps that file in the user cache (`compile_cache.cache_dir()/torch-aot/`, under its size
bound). A later process loads it with torch's AOTInductor runner in well under a second,
without importing dynamo or compiling.

Only a model whose weights have an identity across processes (a GGUF file's load-cache entry,
float or quantised from it at load: the `weights_key` compile option, `gemma_core.model`), run
on the host in bfloat16 or float16, gets one; int8/int4 weights keep their CPU kernels' packed
layouts as constants (a weight the step dequantises each time, e.g. nf4 on float32, gets none).
The file's name holds a hash of its whole key: the weights' key and config (its quantization
too), the step inputs' names, dtypes and static dimensions, torch's version, the CPU's
instruction-set flags (inductor compiles for this CPU) and a hash of the code that builds the
step; a changed key writes a new file, keeping the most recently used one of another key of the
same weights (`KEEP_OTHER_KEYS`: two venvs of one model do not compile in turn) and removing older.

Weights are frozen into the program: a weight set put in the model's place, or a patched op
table, runs the eager step instead; weights edited in place are not seen by it (as under
`torch.compile` with freezing), except the embedding table by its gather, which runs outside
the program (a tied LM head inside it keeps the old values). Use `compile=False`
(`--no-compile`) for either.

Measured on the real Gemma 3 270M (2-core CPU, `benchmarks/results-cpu-e2e.md`): in session 28
bf16 decode 72 tok/s against the eager step's 19, int4 101 tok/s (1.35x llama.cpp's Q4_K_M in
the same run). Since session 29 inductor autotunes the GEMMs (`COMPILE_OPTIONS`): its C++
template runs the int8 weight-only GEMMs (the int8 table of the int4/int8 schemes as the LM
head: 79 -> 14 ms at 16 rows, 14 -> 9 ms at one, measured alone), so quantised decode scales
with the batch; the first export and compile takes ~110-170 s, a warm load ~0.4 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from gemma_core.backend import StepFn
from gemma_core.graph import Graph, GraphError, Op, bind, run_bound
from gemma_core.notices import notice

log = logging.getLogger("gemma_core")

FORMAT = 1
# parameters below which the default (compile=None) keeps the eager step: a small model's step
# is fast already and its compile (~30 s even for a tiny one) would not repay; compile=True
# asks for the package at any size
MIN_PARAMS = 50_000_000
_SHARED = ("gemma_core", "backends/torch")  # the code whose hash is part of every key
_BUILDING = threading.Lock()
KEEP_OTHER_KEYS = 1  # programs of the same weights under other keys kept beside a new one
# inductor's settings for the program: freezing (constants, GEMM weights packed ahead of time);
# max_autotune lets inductor's C++ GEMM template bid against the aten kernels, shape by shape
COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
# autotuning writes its tables on stderr (hundreds of lines for the 270M), which the quiet
# default must not show; inductor's own variables still ask for them
_QUIET = (("autotune_num_choices_displayed", 0, "TORCHINDUCTOR_AUTOTUNE_NUM_CHOICES_DISPLAYED"),
          ("max_autotune_report_choices_stats", False, "TORCHINDUCTOR_MAX_AUTOTUNE_REPORT_CHOICES_STATS"))


def _build_options() -> dict[str, Any]:
    """COMPILE_OPTIONS, and inductor's stderr reports off unless its variables are set."""
    return {**COMPILE_OPTIONS, **{name: value for name, value, env in _QUIET if env not in os.environ}}


def wanted(options: Mapping[str, Any], weights: Mapping[str, Any]) -> bool:
    """Whether the step of `weights` under `options` gets a kept decode program: a cross-process
    identity, the host, bf16/fp16, weights the program can hold (`_frozen_form`), compile not
    refused, and under the default a model large enough (MIN_PARAMS) whose cache files fit."""
    compile = options.get("compile")
    if compile is False or not options.get("weights_key") or not options.get("layer_windows"):
        return False
    if torch.device(options.get("device") or "cpu").type != "cpu":
        return False
    if options.get("dtype") not in ("bfloat16", "float16"):
        return False
    if not all(_frozen_form(v) for v in weights.values()):
        return False
    if not hasattr(torch._C, "_aoti") or not hasattr(torch._C._aoti, "AOTIModelContainerRunnerCpu"):
        return False  # a torch without the CPU runner of AOTInductor (a private API)
    if compile is True:
        return True
    from gemma_core.compile_cache import max_bytes

    # the folder holds the load entry (float32: 2x these bytes), the prepared weights (1x) and
    # the program (1x on the 270M: its weights, the embedding's gather run apart): a model whose
    # three would not fit runs eagerly rather than evict its own entries each run
    params, size = _count(weights)
    return params >= MIN_PARAMS and 4.2 * size <= max_bytes()


def _count(weights: Mapping[str, Any]) -> tuple[int, int]:
    """(values, bytes) of the weights' tensors, each storage once (int8's kernel layout and its
    gemma-core rows are one tensor), a quantised weight counted by its first (kernel) part."""
    seen: set[int] = set()
    params = size = 0
    for value in weights.values():
        parts = [t for t in (value if isinstance(value, tuple) else (value,)) if t is not None]
        if parts:  # (int4's kernel layout packs two values a byte)
            params += parts[0].numel() * (2 if parts[0].dtype == torch.uint8 else 1)
        for t in parts:
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                size += t.numel() * t.element_size()
    return params, size


def _frozen_form(value: Any) -> bool:
    """A weight the program can hold as constants: a plain tensor, or a quantised weight whose
    first part the decode step reads (the int8/int4 CPU kernels' layouts; nf4 dequantised once
    at load on bf16/fp16, "nf4-dense"); not one dequantised at each step (no kernel for its
    shape, or nf4 on float32), whose dense copy freezing would fold in."""
    if isinstance(value, tuple):
        return value[0] is not None and all(v is None or _frozen_form(v) for v in value)
    return isinstance(value, torch.Tensor) and value.layout == torch.strided


def is_decode(env: Mapping[str, Any]) -> bool:
    """Whether `env` is a decode step's inputs: one new token a row, the last logits only."""
    ids, index = env.get("ids"), env.get("logit_index")
    return (isinstance(ids, torch.Tensor) and ids.ndim == 2 and ids.shape[1] == 1
            and isinstance(index, torch.Tensor) and tuple(index.shape) == (1,))


def _dims(env: Mapping[str, Any], windows: tuple[int | None, ...]) -> dict[str, Any]:
    """The dynamic dimensions of a decode env, by name (`_export_dims` makes them torch.export's;
    importing it costs ~0.5 s, which a kept program's load does not pay): the batch, and the
    cache slots of each attention window (a ring of min(window, length) slots, or the length)."""
    def slot(window: int | None) -> str:
        return "slots_global" if window is None else f"slots_{window}"

    dims: dict[str, Any] = {}
    for name in env:
        if name in ("query_slots", "logit_index"):  # [1] in every decode step
            dims[name] = None
        elif name.startswith("mask["):
            window = None if name == "mask[global]" else int(name[len("mask[window="):-1])
            dims[name] = {0: "batch", 3: slot(window)}
        elif name.startswith("cache."):
            d = {0: "batch", 2: slot(windows[int(name.split(".")[1])])}
            dims[name] = (d, d)
        elif name in ("ids", "x0", "positions"):  # (x0: the embedded rows, `split_embedding`)
            dims[name] = {0: "batch"}
        else:
            raise GraphError(f"decode program: no dimensions known for the input {name!r}")
    return dims


def split_embedding(graph: Graph) -> tuple[Op, Graph] | None:
    """The graph's first op where it embeds the ids, which no other op reads, and the rest of the
    graph, which starts from its output; None for another graph (the base model outputs the
    embedded rows). The program runs the rest: the embedding's gather reads a row a token, so it
    runs eagerly, and a tied table (read again by the LM head, packed apart) is not a second
    constant of the program (335 MB of the real 270M's, in the file and copied into memory)."""
    first = graph.ops[0] if graph.ops else None
    if first is None or first.kind not in ("embed", "qembed") or first.inputs != ("ids",):
        return None
    inputs = tuple(first.outputs[0] if name == "ids" else name for name in graph.inputs)
    try:
        return first, Graph(graph.ops[1:], inputs, graph.outputs)
    except GraphError:  # the ids read again (classification's pooling), or x0 an output
        return None


def _export_dims(dims: Mapping[str, Any]) -> dict[str, Any]:
    """`dims` with each name a `torch.export.Dim` (one object per name)."""
    from torch.export import Dim

    made: dict[str, Any] = {}

    def dim(spec: Mapping[int, str] | None) -> Any:
        return None if spec is None else {axis: made.setdefault(n, Dim(n)) for axis, n in spec.items()}

    return {name: tuple(dim(s) for s in spec) if isinstance(spec, tuple) else dim(spec)
            for name, spec in dims.items()}


def _example(env: Mapping[str, Any], dims: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `env` with two rows where it has one: export specialises a dimension traced at
    size 1, and the program must serve any batch."""
    def widen(x: torch.Tensor, spec: Any) -> torch.Tensor:
        if spec and 0 in spec and x.shape[0] == 1:
            return x.expand(2, *x.shape[1:]).clone()
        return x.clone()

    out: dict[str, Any] = {}
    for name, value in env.items():
        spec = dims[name]
        out[name] = tuple(widen(v, s) for v, s in zip(value, spec, strict=True)) \
            if isinstance(value, tuple) else widen(value, spec)
    return out


def _signature(env: Mapping[str, Any], dims: Mapping[str, Any]) -> list[Any]:
    """What of `env` the program is compiled for: names, dtypes, the static dimensions and the
    names of the dynamic ones (which cache's slots go with which mask)."""
    def sig(x: torch.Tensor, spec: Any) -> list[Any]:
        return [str(x.dtype), [spec[i] if spec and i in spec else n for i, n in enumerate(x.shape)]]

    return [[name, [sig(v, s) for v, s in zip(value, dims[name], strict=True)]
             if isinstance(value, tuple) else sig(value, dims[name])] for name, value in env.items()]


def _code_hash() -> str:
    from gemma_core.compile_cache import code_hash

    root = Path(__file__).resolve().parents[2]
    return code_hash(path for part in _SHARED for path in sorted((root / part).glob("*.py")))


def _cpu() -> str:
    """The CPU the program is compiled for: inductor builds with -march=native, so every
    instruction-set flag counts (a program from another CPU could stop the process on SIGILL)."""
    flags = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "")
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]
    return f"{torch.backends.cpu.get_cpu_capability()} {digest}"


def package_key(weights_key: str, env: Mapping[str, Any], dims: Mapping[str, Any]) -> str:
    """The whole key of the decode program for `env` of the weights of `weights_key`."""
    return json.dumps({"format": FORMAT, "weights": weights_key, "inputs": _signature(env, dims),
                       "torch": torch.__version__, "cpu": _cpu(), "code": _code_hash()}, sort_keys=True)


def package_path(weights_name: str, key: str) -> Path:
    """Where the program of `key` lives: `<weights>-<key>.so`, hashes of `weights_name` (the
    weights' source and settings, stable across code and torch versions) and of `key`."""
    from gemma_core.compile_cache import cache_dir

    weights = hashlib.sha256(weights_name.encode()).hexdigest()[:16]
    return cache_dir() / "torch-aot" / f"{weights}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


@contextlib.contextmanager
def _quiet_build() -> Any:
    """Torch's own deprecation warnings about its internals (a cold compile's freezing reads
    `tensor.storage()`: "TypedStorage is deprecated") are not the user's to act on: hidden
    while a build runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
        yield


class DecodeProgram:
    """The kept decode program of one weight set, loaded (or built and kept) at its first decode
    step; `__call__(env)` runs it, or says it cannot (the caller then runs the eager step)."""

    def __init__(self, step: StepFn, weights: Mapping[str, Any], options: Mapping[str, Any]) -> None:
        self.step, self.weights = step, weights
        self._embed: Any = None  # the embedding op, bound to the weights, run before the program
        split = split_embedding(options["graph"]) if options.get("graph") is not None else None
        if split is not None:
            first, body = split
            table = options["ops"]
            self._embed = bind([first], table, weights)[0]

            def rest(weights: Mapping[str, Any], env: dict[str, Any]) -> dict[str, Any]:
                run_bound(bind(body, table, weights), env)
                return {k: env[k] for k in body.outputs}

            self.step, self.weights = rest, {name: weights[name] for name in body.params}
        self.weights_key: str = options["weights_key"]
        self.weights_name: str = options["weights_name"]
        self.windows: tuple[int | None, ...] = tuple(options["layer_windows"])
        self.runs = 0  # decode steps the program ran (tests)
        self._runner: Any = None
        self._specs: tuple[Any, Any] | None = None
        self._failed = False

    def accepts(self, env: Mapping[str, Any]) -> bool:
        return not self._failed and is_decode(env)

    def __call__(self, env: dict[str, Any]) -> dict[str, Any] | None:
        """The step's outputs, or None where no program could be had."""
        env = self._embedded(env)
        if self._runner is None:
            with _BUILDING:  # one export/compile at a time (inductor's config patch is global)
                if self._runner is None and not self._open(env):
                    return None
        flat, spec = pytree.tree_flatten(((env,), {}))
        in_spec, out_spec = self._specs  # type: ignore[misc]
        if spec != in_spec:  # inputs in another order or of other names: not this program's step
            log.debug("gemma-core: a decode step's inputs differ from the kept program's; eager")
            return None
        self.runs += 1
        return pytree.tree_unflatten(self._runner.run(flat), out_spec)

    def _embedded(self, env: dict[str, Any]) -> dict[str, Any]:
        """`env` with the ids replaced by their embedded rows, where the embedding runs apart."""
        if self._embed is None:
            return env
        fn, _, params, attrs, (out,) = self._embed
        return {out if name == "ids" else name: fn(value, *params, **attrs) if name == "ids" else value
                for name, value in env.items()}

    def _open(self, env: Mapping[str, Any]) -> bool:
        try:
            dims = _dims(env, self.windows)
            path = package_path(self.weights_name, package_key(self.weights_key, env, dims))
            if path.is_file() and self._load_kept(path):
                return True
            self._build(env, dims, path)
        except Exception as e:  # an export or compile failure must not stop generation
            self._failed = True
            notice("gemma-core: torch's decode step could not be compiled ahead of time (%s: %s); "
                        "it runs eagerly", type(e).__name__, e)
            return False
        return True

    def _load_kept(self, path: Path) -> bool:
        try:
            self._load(path)
        except Exception as e:  # damaged, or from another build: compiled again
            notice("gemma-core: the kept decode program %s did not load (%s); compiling it again",
                        path, e)
            return False
        with contextlib.suppress(OSError):  # a use counts for the folder's LRU bound
            os.utime(path)
        return True

    def _load(self, path: Path) -> None:
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
        in_spec, out_spec = runner.get_call_spec()
        self._specs = (pytree.treespec_loads(in_spec), pytree.treespec_loads(out_spec))
        self._runner = runner

    @_quiet_build()
    def _build(self, env: Mapping[str, Any], dims: Mapping[str, Any], path: Path) -> None:
        from backends.torch import FrozenWeights
        from gemma_core.transaction import build_prefix

        notice("gemma-core: compiling torch's decode step for these weights, once (two to three "
               "minutes for a 270M model on 2 cores); later runs load it from %s", path.parent)
        module = FrozenWeights(self.weights, self.step).eval()
        with torch.inference_mode(False), torch.no_grad():
            example = _example(env, dims)
            program = torch.export.export(module, (example,), dynamic_shapes=(_export_dims(dims),),
                                          strict=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_builds(path.parent)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=build_prefix()) as tmp:
            with torch._inductor.config.patch(_build_options()):
                package = torch._inductor.aoti_compile_and_package(
                    program, package_path=os.path.join(tmp, "step.pt2"))
            self._keep(_extract_so(package, Path(tmp)), path)

    def _keep(self, so: Path, path: Path) -> None:
        """Place the built `so` at `path` and load it; where it cannot be kept (beyond the
        cache's bound, or the folder cannot be written), load it for this process only."""
        from gemma_core.compile_cache import last_use, max_bytes, trim
        from gemma_core.errors import GemmaError
        from gemma_core.transaction import write_transaction

        # the same weights' programs of other keys (code, torch, CPU): the most recently used
        # stays (two venvs or checkouts of one model alternate without compiling each time)
        others = [p for p in path.parent.glob(path.name.split("-")[0] + "-*.so") if p != path]
        for old in sorted(others, key=last_use, reverse=True)[KEEP_OTHER_KEYS:]:
            with contextlib.suppress(OSError):
                old.unlink()
        why = f"{so.stat().st_size >> 20} MiB exceed the cache bound (GEMMA_CACHE_MAX_BYTES)" \
            if so.stat().st_size > max_bytes() else None
        if why is None:
            try:
                with write_transaction(path, overwrite=True) as dst:
                    os.replace(so, dst)
            except (GemmaError, OSError) as e:
                why = str(e)
            else:
                self._load(path)
                trim()
                return
        notice("gemma-core: the decode program is used in this process only, not kept (%s)", why)
        self._load(so)  # (its mapping outlives the file)


def remove_dead_builds(folder: Path) -> list[Path]:
    """Remove the build folders (`.build-<pid>-<host>-*`: the package and its shared object, the
    size of the program) of builds whose process is gone, a compile killed midway; returns them.
    Another machine's builds (a shared cache folder) are left to it."""
    from gemma_core.transaction import BUILD_PREFIX, writing

    dead = [p for p in folder.glob(f"{BUILD_PREFIX}*") if p.is_dir() and not writing(p.name)]
    for build in dead:
        shutil.rmtree(build, ignore_errors=True)
    return dead


def _extract_so(package: str, folder: Path) -> Path:
    """The shared object inside an AOTInductor package (a zip), extracted into `folder`."""
    with zipfile.ZipFile(package) as z:
        names = [n for n in z.namelist() if n.endswith(".so")]
        if len(names) != 1:
            raise RuntimeError(f"{package}: expected one shared object, found {len(names)}")
        out = folder / "step.so"
        with z.open(names[0]) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    return out


def with_programs(step: StepFn, options: Mapping[str, Any], fallback: StepFn) -> StepFn:
    """`fallback`, with the decode steps of the weight set the options' key names
    (`options["weights"]`, while the model's op table is the one the key was made for: the
    model drops `weights_key` when its ops are patched) run by its kept program, if `wanted`."""
    made: list[DecodeProgram | None] = []  # [program or None], decided at the first step

    def run(weights: Mapping[str, Any], env: dict[str, Any]) -> dict[str, Any]:
        if weights is options.get("weights") and options.get("weights_key"):
            if not made:
                made.append(DecodeProgram(step, weights, options) if wanted(options, weights) else None)
            program = made[0]
            if program is not None and program.accepts(env):
                out = program(env)
                if out is not None:
                    return out
        return fallback(weights, env)

    return run
