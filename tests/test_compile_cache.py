"""The user cache of compiled steps (gemma_core.compile_cache): where it lives, its size bound,
`gemma cache info|clear`, a second process reusing what the first compiled; and the engine the
CLI and `load(backend="auto")` choose when none is named (gemma_core.engine_choice)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gemma_core
from gemma_core import compile_cache, engine_choice
from gemma_core.cli import main
from gemma_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GEMMA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GEMMA_CACHE_MAX_BYTES", raising=False)
    return tmp_path / "cache"


def test_the_folder_is_gemma_cache_dir_else_xdg_else_home(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GEMMA_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert compile_cache.cache_dir() == tmp_path / "home" / ".cache" / "gemma-core"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "gemma-core"
    monkeypatch.setenv("GEMMA_CACHE_DIR", "~/mine")
    assert compile_cache.cache_dir() == tmp_path / "home" / "mine"
    assert not (tmp_path / "home").exists()  # resolving creates nothing


def test_the_bound_defaults_to_4_gib_and_refuses_a_non_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMMA_CACHE_MAX_BYTES", raising=False)
    assert compile_cache.max_bytes() == 4 * 2**30
    monkeypatch.setenv("GEMMA_CACHE_MAX_BYTES", "1000")
    assert compile_cache.max_bytes() == 1000
    monkeypatch.setenv("GEMMA_CACHE_MAX_BYTES", "2GB")
    with pytest.raises(ConfigError, match="GEMMA_CACHE_MAX_BYTES"):
        compile_cache.max_bytes()


def _file(path: Path, size: int, age: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    t = 1_700_000_000 - age
    os.utime(path, (t, t))
    return path


def test_trim_removes_the_least_recently_used_files_first(cache: Path) -> None:
    old = _file(cache / "torch" / "a" / "old", 400, age=300)
    mid = _file(cache / "jax" / "mid", 400, age=200)
    new = _file(cache / "jax" / "new", 400, age=100)
    assert compile_cache.trim(limit=1200) == 0 and old.exists()
    assert compile_cache.trim(limit=900) == 400
    assert not old.exists() and not (cache / "torch").exists()  # emptied folders go too
    assert mid.exists() and new.exists()
    assert compile_cache.trim(limit=0) == 800 and not new.exists() and cache.is_dir()


def test_trim_leaves_a_write_still_running_alone(cache: Path) -> None:
    """A decode program's build folder (empty for most of its compile), a partial output and a
    previous output moved aside of a live writer stay, and so does such a name of another form
    (an older version's writer, not judged); a dead writer's are trimmed like any file."""
    from gemma_core.transaction import writer_tag

    building = cache / "torch-aot" / f".build-{writer_tag()}-x"
    building.mkdir(parents=True)
    live = _file(cache / "load" / f".e.partial-{writer_tag()}-ab.npz", 400, age=300)
    aside = _file(cache / "load" / f".f.old-{writer_tag()}-ab.npz", 400, age=300)
    dead = _file(cache / "load" / f".e.partial-{writer_tag(999999999)}-cd.npz", 400, age=300)
    dead_aside = _file(cache / "load" / f".f.old-{writer_tag(999999999)}-cd.npz", 400, age=300)
    other_form = _file(cache / "load" / ".g.old-1234-abc.npz", 400, age=300)
    assert compile_cache.trim(limit=0) == 800
    assert building.is_dir() and live.exists() and aside.exists() and other_form.exists()
    assert not dead.exists() and not dead_aside.exists()


def test_gemma_cache_info_and_clear(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _file(cache / "jax" / "entry", 3 * 2**20, age=0)
    _file(cache / "torch" / "k" / "kernel.so", 2**20, age=0)
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert f"path      {cache}\n" in out and "size      4.0 MiB in 2 files (bound 4096.0 MiB" in out
    assert "  jax     3.0 MiB" in out and "  torch   1.0 MiB" in out
    assert main(["cache", "clear"]) == 0
    assert capsys.readouterr().out.strip() == f"removed {cache} (4.0 MiB)"
    assert not cache.exists()
    assert main(["cache"]) == 0  # info by default, of a folder not there yet
    assert "size      0.0 MiB in 0 files" in capsys.readouterr().out


# A child process: compile a tiny preset's steps, print how many compiled programs came from the
# persistent cache, as JAX's monitoring events count them
_JAX_CHILD = textwrap.dedent("""
    import jax
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
    import gemma_core
    m = gemma_core.load("tiny-gemma3", backend="jax", dtype="float32")
    out = m.generate([[2, 5, 7]], max_new_tokens=3, do_sample=False)
    print(len(hits), list(out.token_ids[0]))
""")


def _child(code: str, cache: Path, **env: str) -> str:
    """`code`'s stdout in a new process using `cache` (engines' own cache settings only if given)."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("TORCHINDUCTOR_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**base, "GEMMA_CACHE_DIR": str(cache), **env}, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_second_jax_process_reads_the_compiled_steps_back(cache: Path) -> None:
    pytest.importorskip("jax")
    first = _child(_JAX_CHILD, cache)
    entries = sorted(p.name for p in (cache / "jax").iterdir())
    assert first.split()[0] == "0" and entries  # compiled, and written to the user cache
    second = _child(_JAX_CHILD, cache)
    assert int(second.split()[0]) >= 1  # the decode step came from the cache, not XLA
    assert second.split(maxsplit=1)[1] == first.split(maxsplit=1)[1]  # the same tokens
    assert sorted(p.name for p in (cache / "jax").iterdir()) == entries  # nothing new to write


def test_a_user_set_jax_cache_is_left_alone(cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("jax")
    mine = tmp_path / "mine"
    code = ("import gemma_core; m = gemma_core.load('tiny-gemma3', backend='jax'); "
            "import jax; print(jax.config.jax_compilation_cache_dir)")
    assert _child(code, cache, JAX_COMPILATION_CACHE_DIR=str(mine)) == str(mine)
    assert not cache.exists()


_TORCH_CHILD = textwrap.dedent("""
    import os, gemma_core
    from torch._dynamo.utils import counters
    m = gemma_core.load("tiny-gemma3", backend="torch", dtype="float32", compile=True)
    out = m.generate([[2, 5, 7]], max_new_tokens=2, do_sample=False)
    print(counters["inductor"]["fxgraph_cache_hit"], os.environ["TORCHINDUCTOR_CACHE_DIR"],
          list(out.token_ids[0]))
""")


@pytest.mark.slow
def test_a_second_torch_process_loads_the_compiled_graphs(cache: Path) -> None:
    """float32 (unfrozen) graphs hit inductor's FX graph cache whole in the next process."""
    pytest.importorskip("torch")
    hits, where, tokens = _child(_TORCH_CHILD, cache).split(maxsplit=2)
    assert hits == "0" and where == str(cache / "torch") and any((cache / "torch").iterdir())
    hits2, _, tokens2 = _child(_TORCH_CHILD, cache).split(maxsplit=2)
    assert int(hits2) >= 1 and tokens2 == tokens


def test_the_default_engine_is_the_first_installed_of_the_order() -> None:
    order = (engine_choice.Engine("no-such-backend", "bfloat16", True, "fast"),
             engine_choice.Engine("numpy", "float32", None, "the reference"))
    chosen = engine_choice.choose_engine(order)
    assert (chosen.backend, chosen.dtype, chosen.compile) == ("numpy", "float32", None)
    assert chosen.reason == "the reference; no-such-backend not installed"
    assert [e.backend for e in engine_choice.ORDER] == ["torch", "jax", "numpy"]


def test_auto_picks_torch_bf16_and_keeps_what_was_named() -> None:
    """compile=None: eager, with a kept decode program for a large model from a GGUF file
    (tests/test_torch_aot.py)."""
    pytest.importorskip("torch")
    assert engine_choice.resolve("auto", "auto", None)[:3] == ("torch", "bfloat16", None)
    assert engine_choice.resolve("auto", "float32", True)[:3] == ("torch", "float32", True)
    assert engine_choice.resolve("numpy", "auto", None)[:3] == ("numpy", "float32", None)
    assert engine_choice.resolve(None, "float32", None)[:3] == (None, "float32", None)
    model = gemma_core.load("tiny-gemma3", backend="auto", dtype="auto")
    assert (model.backend.name, model.dtype) == ("torch", "bfloat16")
    assert gemma_core.load("tiny-gemma3").backend.name == os.environ.get("GEMMA_BACKEND", "numpy")


def test_the_cli_runs_the_chosen_engine_and_says_why(tiny_model_folder: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    args = ["--verbose", "generate", "--model", str(tiny_model_folder), "--max-new-tokens", "3",
            "--greedy", "Hello"]
    monkeypatch.delenv("GEMMA_BACKEND", raising=False)
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "gemma: torch backend, bfloat16 (chosen by default: bfloat16, prefill eager" in err
    want = gemma_core.load(tiny_model_folder, backend="torch", dtype="bfloat16")
    assert out == want.generate("Hello", max_new_tokens=3, do_sample=False).texts[0] + "\n"
    monkeypatch.setenv("GEMMA_BACKEND", "numpy")  # a named backend is never second-guessed
    assert main(args) == 0
    assert "gemma: numpy backend, float32\n" in capsys.readouterr().err
    assert main([*args[:2], "--backend", "numpy", *args[2:]]) == 0
    assert "gemma: numpy backend, float32\n" in capsys.readouterr().err


def test_a_compiled_step_is_announced_under_verbose(tiny_model_folder: Path, cache: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("jax")
    args = ["generate", "--model", str(tiny_model_folder), "--backend", "jax", "--max-new-tokens", "2",
            "Hello"]
    assert main(["--verbose", *args]) == 0
    assert "gemma: compiling the decode step for jax bfloat16 (first run; cached for next time)...\n" \
        in capsys.readouterr().err
    assert main(args) == 0  # not a terminal, not --verbose: no line
    assert "compiling" not in capsys.readouterr().err
