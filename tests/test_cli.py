"""The `gemma` command line, through its entry point and as a subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gemma_core.cli import main


def test_graph_prints_op_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "--config", "gemma-2b"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# gemma: 18 layers, D=2048")
    assert out.count("\nlayer ") == 18
    assert "embed            ids -> x0  [model.embed_tokens.weight]  scale=45.2548" in out


def test_graph_with_weight_layout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "--config", "tiny-gemma3", "--weights"]) == 0
    out = capsys.readouterr().out
    assert "# weight layout" in out
    assert "model.layers.{layer}.self_attn.q_norm.weight" in out


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "gemma-3-270m"]) == 0
    out = capsys.readouterr().out
    assert "format            preset (random weights)" in out
    assert "parameters        268,098,176" in out
    assert "3 global, 15 local" in out


def test_errors_are_one_line_and_nonzero() -> None:
    cmd = [sys.executable, "-m", "gemma_core.cli", "graph", "--config", "gemma-99b"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("gemma: error: preset: unknown name 'gemma-99b'")
    assert "Traceback" not in out.stderr
    debug = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], capture_output=True, text=True)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr


def test_config_from_folder(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    import json

    from gemma_core.presets import get_preset

    (tmp_path / "config.json").write_text(json.dumps(get_preset("tiny-gemma2").to_hf()))
    assert main(["info", "--model", str(tmp_path)]) == 0
    assert "architecture      gemma2" in capsys.readouterr().out
    (tmp_path / "config.json").write_text("{not json")
    assert main(["info", "--model", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


# ---- generate / chat / mask on a tiny model folder with a test-trained tokenizer -------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory, spm_file):  # type: ignore[no-untyped-def]
    import shutil

    from gemma_core.checkpoint import save_checkpoint
    from gemma_core.presets import get_preset
    from gemma_core.weights import random_weights

    config = get_preset("tiny-gemma3").replace(tie_word_embeddings=False)
    path = save_checkpoint(tmp_path_factory.mktemp("cli") / "model", config, random_weights(config, 3))
    shutil.copy(spm_file, path / "tokenizer.model")
    return path


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gemma_core.cli", *args], capture_output=True,
                          text=True, input=stdin)


def test_generate_streams_the_api_result(folder, capsys) -> None:  # type: ignore[no-untyped-def]
    import gemma_core

    assert main(["generate", "--model", str(folder), "--max-new-tokens", "8", "Hello world"]) == 0
    out = capsys.readouterr().out
    model = gemma_core.load(folder)
    expected = model.generate("Hello world", max_new_tokens=8).texts[0]
    assert out == expected + "\n"


def test_generate_reads_stdin_and_samples_reproducibly(folder) -> None:  # type: ignore[no-untyped-def]
    args = ("generate", "--model", str(folder), "--max-new-tokens", "6", "--temperature", "1.2",
            "--top-k", "40", "--seed", "3")
    a, b = _run(*args, stdin="Hello world"), _run(*args, stdin="Hello world")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


@pytest.mark.parametrize(("args", "stdin", "message"), [
    (("generate", "--model", "{folder}", ""), None, "gemma: error: prompt: empty"),
    (("generate", "--model", "{folder}"), "   \n", "gemma: error: prompt: empty"),
    (("generate", "--model", "{folder}", "--backend", "nope", "hi"), None,
     "gemma: error: argument --backend: invalid choice: 'nope'"),
    (("generate", "--model", "/no/such/model", "hi"), None, "gemma: error: /no/such/model: no such file"),
    (("generate", "--model", "{folder}", "--max-new-tokens", "300", "hi"), None,
     "exceed the model's context of 256 tokens"),
    (("generate", "--model", "{folder}", "--greedy", "--top-p", "0.5", "hi"), None,
     "gemma: error: --greedy conflicts with --top-p"),
    (("generate", "--model", "{folder}", "--temperature", "-1", "hi"), None, "temperature: must be"),
    (("generate", "--model", "tiny-gemma", "hi"), None, "the model has no tokenizer"),
])
def test_generate_errors_are_one_line(folder, args, stdin, message) -> None:  # type: ignore[no-untyped-def]
    out = _run(*(a.format(folder=folder) for a in args), stdin=stdin)
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_chat_keeps_the_cache_between_turns(folder, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """Each turn's reply equals a fresh generation on the whole rendered conversation."""
    import gemma_core
    from gemma_core.chat import ChatSession

    model = gemma_core.load(folder)
    session = ChatSession(model, system="Be brief.")
    first = session.send("Hello world", max_new_tokens=5, eos_token_ids=[])
    second = session.send("hello again", max_new_tokens=5, eos_token_ids=[])
    assert session.cache.length > 0
    tok = model.tokenizer
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    ids = tok.apply_chat_template(history, tokenize=True)
    fresh = model.generate([ids], max_new_tokens=5, eos_token_ids=[])
    assert first == fresh.texts[0]
    ids = ids + fresh.token_ids[0] + tok.encode(
        "<end_of_turn>\n<start_of_turn>user\nhello again<end_of_turn>\n<start_of_turn>model\n",
        add_special_tokens=False)
    assert second == model.generate([ids], max_new_tokens=5, eos_token_ids=[]).texts[0]


def test_info_on_a_folder_names_format_and_dtypes(folder, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "format            huggingface safetensors" in out
    assert "stored dtypes     F32 x" in out


def test_chat_cli(folder) -> None:  # type: ignore[no-untyped-def]
    out = _run("chat", "--model", str(folder), "--max-new-tokens", "4", stdin="Hello\n/reset\nHi\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) >= 1


def test_mask_view(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["mask", "--config", "tiny-gemma2", "--sliding-window", "2", "a b c", "d"]) == 0
    out = capsys.readouterr().out
    assert "sliding window 2: layers 0, 2" in out
    assert "global (causal): layers 1, 3" in out
    assert "    2 c     ⬚ ■ ■" in out  # window of 2: itself and one before
    assert "    0 <pad> ⬚ ⬚ ⬚" in out
