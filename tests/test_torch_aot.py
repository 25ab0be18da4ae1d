"""Torch's decode program kept across processes (backends/torch/aot.py): its logits and caches
conform to the NumPy reference at any batch and cache length from one compile; a new process
loads it without compiling; a damaged file or a failed compile falls back to the eager step with
a warning; what gets no program."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import exhaustive
from gguf_writer import write_gguf

import gemma_core
from conformance.compare import compare_logits, compare_tensor
from conformance.tolerances import TOLERANCES
from gemma_core.graph import GraphError
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights

pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
aot = pytest.importorskip("backends.torch.aot")

# one worker builds the module's program (pytest -n 2 would build it on each)
pytestmark = pytest.mark.xdist_group("torch-aot")

SCALAR = 16  # tiny-gemma3's query_pre_attn_scalar (GGUF does not record it)
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MIN_PARAMS = aot.MIN_PARAMS


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A tiny Gemma 3 GGUF, a user cache for this module, and the programs built in it (the
    tiny model is under MIN_PARAMS: the default would run it eagerly)."""
    folder = tmp_path_factory.mktemp("aot")
    config = get_preset("tiny-gemma3")
    path = write_gguf(folder / "m.gguf", config, random_weights(config, 5), qtype="F16")
    builds: list[Path] = []
    printed: list[str] = []  # stderr of each build
    ran: list[bool] = []  # per decode step offered to a program: whether it ran it
    programs: list[Any] = []  # the program offered each step
    real, call = aot.DecodeProgram._build, aot.DecodeProgram.__call__

    def counted(self, env, dims, where):  # type: ignore[no-untyped-def]
        builds.append(where)
        with contextlib.redirect_stderr(io.StringIO()) as err, \
                warnings.catch_warnings(record=True) as caught:  # (what a build prints or warns)
            warnings.simplefilter("always")  # what the command shows (Python's default filters)
            for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=hidden)
            try:
                return real(self, env, dims, where)
            finally:
                printed.append(err.getvalue() + "".join(f"{w.category.__name__}: {w.message}\n"
                                                        for w in caught))

    def running(self, env):  # type: ignore[no-untyped-def]
        out = call(self, env)
        ran.append(out is not None)
        programs.append(self)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEMMA_CACHE_DIR", str(folder / "cache"))
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))  # cold: autotuning runs
        mp.delenv("GEMMA_LOAD_CACHE", raising=False)
        mp.delenv("GEMMA_CACHE_MAX_BYTES", raising=False)
        mp.setattr(aot, "MIN_PARAMS", 0)
        mp.setattr(aot.DecodeProgram, "_build", counted)
        mp.setattr(aot.DecodeProgram, "__call__", running)
        yield {"path": path, "cache": folder / "cache", "builds": builds, "ran": ran,
               "programs": programs, "printed": printed}


def _load(path: Path, backend: str = "torch", dtype: str = "bfloat16", **kw: Any) -> gemma_core.Model:
    return gemma_core.load(path, backend=backend, dtype=dtype, **{"query_pre_attn_scalar": SCALAR, **kw})


def _decode(model: gemma_core.Model, prompts: np.ndarray, tokens: np.ndarray, length: int
            ) -> tuple[list[np.ndarray], Any]:
    """Prefill `prompts` into a cache of `length`, then feed `tokens` one step at a time: each
    step's logits, and the exported cache after the last."""
    out = model.forward(prompts, cache=model.new_cache(len(prompts), length), last_only=True)
    logits = []
    for t in tokens.T:
        out = model.forward(t[:, None], cache=out.cache)
        logits.append(model.to_numpy(out.logits)[:, -1].astype(np.float64))
    return logits, model.export_cache(out.cache)


def _conforms(ours: list[np.ndarray], ours_cache: Any, ref: list[np.ndarray], ref_cache: Any) -> None:
    """The bf16 conformance bounds: logits as distributions, caches by relative L2 error."""
    tol = TOLERANCES["bfloat16"]
    real = np.ones((len(ours[0]), len(ours)), bool)
    ok, why = compare_logits(np.stack(ref, 1), np.stack(ours, 1), real, tol)
    assert ok, why
    ours_layers, ref_layers = (*ours_cache.keys, *ours_cache.values), (*ref_cache.keys, *ref_cache.values)
    for a, b in zip(ours_layers, ref_layers, strict=True):
        ok, why = compare_tensor(b, a, tol)
        assert ok, why


@pytest.mark.parametrize("batch, length", [(2, 40), (1, 6), (3, 100)])
def test_one_program_conforms_at_every_batch_and_length(kept: dict, batch: int, length: int) -> None:
    """One compile (the first case) serves every batch and cache length: rings that wrap (40,
    100 slots against a window of 8) and caches shorter than the window (6)."""
    rng = np.random.default_rng(batch * 1000 + length)
    prompts = rng.integers(3, 500, (batch, 3))
    tokens = rng.integers(3, 500, (batch, min(length - 3, 12)))
    kept["ran"].clear()
    kept["programs"].clear()
    ours, ours_cache = _decode(_load(kept["path"]), prompts, tokens, length)
    assert kept["ran"] == [True] * tokens.shape[1]  # every decode step ran the program
    assert kept["programs"][-1]._embed is not None  # the ids embedded before it (split_embedding)
    ref, ref_cache = _decode(_load(kept["path"], "numpy", "float32"), prompts, tokens, length)
    _conforms(ours, ours_cache, ref, ref_cache)
    assert len(kept["builds"]) == 1 and len(list((kept["cache"] / "torch-aot").glob("*.so"))) == 1
    assert kept["printed"] == [""]  # (inductor's autotuning tables; torch's TypedStorage warning)


def test_a_new_process_loads_the_kept_program(kept: dict) -> None:
    ids = [[4, 9, 21]]
    here = _load(kept["path"]).generate(ids, max_new_tokens=6, eos_token_ids=[]).token_ids[0]
    assert kept["builds"]  # (built by now, in this process or by the test before)
    script = (
        "import sys, gemma_core, backends.torch.aot as aot\n"
        "aot.MIN_PARAMS = 0\n"
        "def refuse(*a, **k): raise SystemExit('compiled again')\n"
        "aot.DecodeProgram._build = refuse\n"
        f"m = gemma_core.load({str(kept['path'])!r}, backend='torch', dtype='bfloat16', "
        f"query_pre_attn_scalar={SCALAR})\n"
        f"print(m.generate({ids!r}, max_new_tokens=6, eos_token_ids=[]).token_ids[0])\n")
    env = {**os.environ, "GEMMA_CACHE_DIR": str(kept["cache"])}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == str(here)


def test_a_damaged_program_or_a_failed_compile_runs_eagerly(kept: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    _load(kept["path"]).generate([[4, 5]], max_new_tokens=2, eos_token_ids=[])  # built by now
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(kept["cache"], cache)
    monkeypatch.setenv("GEMMA_CACHE_DIR", str(cache))
    (program,) = (cache / "torch-aot").glob("*.so")
    program.write_bytes(b"not a shared object")

    def no_compiler(self, env, dims, where):  # type: ignore[no-untyped-def]
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(aot.DecodeProgram, "_build", no_compiler)
    prompts, tokens = np.array([[4, 9, 21]]), np.array([[7, 8, 9]])
    with caplog.at_level(logging.WARNING, logger="gemma_core"):
        ours, _ = _decode(_load(kept["path"]), prompts, tokens, 20)
    assert "did not load" in caplog.text and "runs eagerly" in caplog.text
    eager, _ = _decode(_load(kept["path"], compile=False), prompts, tokens, 20)
    assert all(np.array_equal(a, b) for a, b in zip(ours, eager, strict=True))  # the eager step


def test_what_the_program_does_not_run(kept: dict) -> None:
    """The hidden-states step (other outputs), a patched op table and a weight set put in the
    model's place run eagerly; the plain step beside them keeps its program."""
    prompts, tokens = np.array([[4, 9, 21]]), np.array([[7, 8, 9]])
    model, eager = _load(kept["path"]), _load(kept["path"], compile=False)
    out = model.forward(prompts, cache=model.new_cache(1, 20), last_only=True)
    kept["ran"].clear()
    step = model.forward([[7]], cache=out.cache, output_hidden_states=True)
    ref = eager.forward(prompts, cache=eager.new_cache(1, 20), last_only=True)
    ref = eager.forward([[7]], cache=ref.cache, output_hidden_states=True)
    assert kept["ran"] == [] and len(step.hidden_states) == model.config.num_layers + 1
    assert np.array_equal(model.to_numpy(step.logits), eager.to_numpy(ref.logits))
    model.forward([[8]], cache=step.cache)
    assert kept["ran"] == [True]

    calls: list[str] = []
    table = dict(model.ops)
    real = table["rms_norm"]

    def patched(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("rms_norm")
        return real(*args, **kwargs)

    model.ops = {**table, "rms_norm": patched}
    kept["ran"].clear()
    _decode(model, prompts, tokens, 20)
    assert kept["ran"] == [] and calls  # the patched op ran in every step, decode too

    other = _load(kept["path"])
    other.weights = dict(other.weights)  # another set: not the one the program was made of
    kept["ran"].clear()
    _decode(other, prompts, tokens, 20)
    assert kept["ran"] == []


def test_what_gets_no_program(tmp_path: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the default a small model, and under any setting float32, --no-compile, another
    device and weights without a load-cache entry, run without a program (and compile none)."""
    monkeypatch.setattr(aot, "MIN_PARAMS", DEFAULT_MIN_PARAMS)
    config = get_preset("tiny-gemma3")
    path = write_gguf(tmp_path / "m.gguf", config, random_weights(config, 5), qtype="F16")
    model = _load(path)  # bf16, default compile: under MIN_PARAMS
    options = model._step_options
    assert options["weights_key"] and options["layer_windows"] == tuple(
        config.window(i) for i in range(config.num_layers))
    assert not aot.wanted(options, model.weights)
    assert aot.wanted({**options, "compile": True}, model.weights)
    assert not aot.wanted({**options, "compile": False}, model.weights)
    assert not aot.wanted({**options, "compile": True, "dtype": "float32"}, model.weights)
    assert not aot.wanted({**options, "compile": True, "device": "meta"}, model.weights)
    quantised = _load(path, quantize="int8")  # keyed too, and named apart (its own entry): the
    # float and the int8 program of one file are kept side by side
    assert quantised._step_options["weights_key"] != options["weights_key"]
    assert quantised._step_options["weights_name"] != options["weights_name"]
    rows, scale = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1)
    assert not aot._frozen_form((None, rows, scale))  # dequantised at each step: no program
    assert aot._frozen_form((rows, rows, scale)) and aot._frozen_form((torch.zeros(4, 8), None, None))
    assert "weights_key" not in gemma_core.load("tiny-gemma3", backend="torch", dtype="bfloat16",
                                                seed=1)._step_options
    model.generate([[4, 5, 6]], max_new_tokens=3, eos_token_ids=[])
    assert not (fresh_cache / "torch-aot").exists()


def test_the_embedding_runs_before_the_program() -> None:
    """The program starts from the embedded rows where the graph's first op embeds ids that no
    other op reads (a float or quantised table); not for the base model (it outputs x0) nor for
    sequence classification (its pooling reads the ids)."""
    from gemma_core.graph import build_graph
    from gemma_core.quant import parse_scheme

    config = get_preset("tiny-gemma3")
    for c in (config, config.replace(quantization=parse_scheme("int8"))):
        graph = build_graph(c)
        first, rest = aot.split_embedding(graph)
        assert first is graph.ops[0] and first.kind == ("embed" if c is config else "qembed")
        assert rest.ops == graph.ops[1:] and rest.outputs == graph.outputs
        assert "x0" in rest.inputs and "ids" not in rest.inputs
    assert aot.split_embedding(build_graph(config, "base")) is None
    assert aot.split_embedding(build_graph(config, "sequence-classification")) is None
    assert aot._dims({"x0": torch.zeros(1, 1, 4)}, (None,)) == {"x0": {0: "batch"}}
    with pytest.raises(GraphError, match="'extra'"):  # a new input: its dimensions named first
        aot._dims({"extra": torch.zeros(1)}, (None,))


def test_an_interrupted_build_is_removed_by_the_next(tmp_path: Path) -> None:
    """A build folder whose process is gone (a compile killed midway) is removed; a running
    build's, and anything else in the folder, stay."""
    from gemma_core.transaction import writer_tag

    dead, live = tmp_path / f".build-{writer_tag(999999999)}-x", tmp_path / f".build-{writer_tag()}-y"
    elsewhere = tmp_path / ".build-999999999-0000beef-z"  # another machine's (a shared folder)
    other = tmp_path / "0123-4567.so"
    for folder in (dead, live, elsewhere):
        folder.mkdir()
        (folder / "step.pt2").write_bytes(b"partial")
    other.write_bytes(b"kept")
    assert aot.remove_dead_builds(tmp_path) == [dead]
    assert not dead.exists() and (live / "step.pt2").exists() and other.exists()
    assert (elsewhere / "step.pt2").exists()


def test_a_program_of_another_key_of_the_same_weights_stays_once(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A new key's program (other code, torch or CPU) keeps the most recently used program of
    the same weights (a second venv's) and removes older ones; other weights' stay."""
    monkeypatch.setenv("GEMMA_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "torch-aot"
    folder.mkdir()
    old, recent, theirs = folder / "aaaa-0001.so", folder / "aaaa-0002.so", folder / "bbbb-0001.so"
    for age, path in enumerate((recent, old, theirs)):
        path.write_bytes(b"so")
        os.utime(path, (1_700_000_000 - age * 100,) * 2)
    program = aot.DecodeProgram.__new__(aot.DecodeProgram)
    loaded: list[Path] = []
    monkeypatch.setattr(program, "_load", loaded.append)
    built = tmp_path / "step.so"
    built.write_bytes(b"new")
    program._keep(built, folder / "aaaa-0003.so")
    assert sorted(p.name for p in folder.glob("*.so")) == ["aaaa-0002.so", "aaaa-0003.so", "bbbb-0001.so"]
    assert loaded == [folder / "aaaa-0003.so"]


def test_the_key_names_the_weights_and_the_inputs() -> None:
    env = {"ids": torch.zeros(1, 1, dtype=torch.int64), "logit_index": torch.zeros(1, dtype=torch.int64),
           "mask[global]": torch.zeros(1, 1, 1, 7, dtype=torch.bool),
           "cache.0": (torch.zeros(1, 1, 7, 4, dtype=torch.bfloat16),) * 2}
    dims = aot._dims(env, (None,))
    key = aot.package_key("w", env, dims)
    assert aot.package_key("w", {**env, "mask[global]": env["mask[global]"][..., :3]}, dims) == key
    wider = {**env, "cache.0": (torch.zeros(1, 1, 7, 8, dtype=torch.bfloat16),) * 2}  # head_dim 8
    assert aot.package_key("w", wider, dims) != key
    other = aot.package_key("w", {**env, "cache.0": (torch.zeros(1, 1, 7, 4, dtype=torch.float16),) * 2},
                            dims)
    assert other != key
    assert aot.package_path("w", key).name.split("-")[0] == aot.package_path("w", other).name.split("-")[0]
    assert aot.package_path("v", key).name.split("-")[0] != aot.package_path("w", key).name.split("-")[0]
    assert aot.is_decode(env) and not aot.is_decode({**env, "ids": torch.zeros(1, 2, dtype=torch.int64)})


@pytest.mark.parametrize("scheme", ["int4", exhaustive("int8", id="int8")])
def test_quantised_weights_keep_their_kernels_in_the_program(scheme: str, tmp_path: Path,
                                                             fresh_cache: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """int8/int4 weights quantised from a GGUF's entry at load: the program holds the CPU
    kernels' packed layouts (not a dense copy) and conforms to the reference's quantised model."""
    monkeypatch.setattr(aot, "MIN_PARAMS", 0)
    config = get_preset("tiny-gemma2")  # (tiny-gemma3's 48 inputs do not split into int4's groups)
    path = write_gguf(tmp_path / "m.gguf", config, random_weights(config, 5), qtype="F16")
    scalar = {"query_pre_attn_scalar": config.query_pre_attn_scalar}
    model = _load(path, quantize=scheme, **scalar)
    assert aot.wanted(model._step_options, model.weights)
    ran: list[Any] = []
    call = aot.DecodeProgram.__call__
    monkeypatch.setattr(aot.DecodeProgram, "__call__", lambda self, env: ran.append(self) or call(self, env))
    rng = np.random.default_rng(3)
    reference = _load(path, "numpy", "float32", quantize=scheme, **scalar)
    steps = 0
    for batch, length in ((2, 24), (1, 6)):  # one program: the ring wraps; a cache under the window
        prompts, tokens = rng.integers(3, 500, (batch, 3)), rng.integers(3, 500, (batch, length - 3))
        ours, ours_cache = _decode(model, prompts, tokens, length)
        ref, ref_cache = _decode(reference, prompts, tokens, length)
        _conforms(ours, ours_cache, ref, ref_cache)
        steps += tokens.shape[1]
    assert len(ran) == steps and ran[0].runs == steps
    # the program's constants: the kernels' uint8 (int4) / int8 packs, one per quantised weight
    dtypes = list(ran[0]._runner.get_constant_names_to_dtypes().values())
    quantised = sum(isinstance(w, tuple) for w in model.weights.values())
    assert quantised > 0 and dtypes.count(0) + dtypes.count(1) >= quantised  # torch's uint8, int8


def test_the_module_runs_on_one_worker(request: pytest.FixtureRequest) -> None:
    """Under pytest -n 2 --dist loadgroup the module's xdist_group holds (pytest-xdist 3.8 marks
    a grouped test's id; pytest 9.2 ignored the mark, and the program was built on each worker)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and request.config.getoption("dist") == "loadgroup":
        assert request.node.nodeid.endswith("@torch-aot")
