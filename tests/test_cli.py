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
    assert "embed            ids -> x  [model.embed_tokens.weight]  scale=45.2548" in out


def test_graph_with_weight_layout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "--config", "tiny-gemma3", "--weights"]) == 0
    out = capsys.readouterr().out
    assert "# weight layout" in out
    assert "model.layers.{layer}.self_attn.q_norm.weight" in out


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "gemma-3-270m"]) == 0
    out = capsys.readouterr().out
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
