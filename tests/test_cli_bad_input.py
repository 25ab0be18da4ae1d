"""Bad input at the command line: one line `gemma: error: ...`, exit 2, never a traceback; and
degenerate sampling values refused or handled as users expect."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import gemma_core
from gemma_core.cli import main
from gemma_core.errors import ConfigError, InputError
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights


@pytest.fixture(scope="module")
def folder(tiny_model_folder: Path) -> Path:
    return tiny_model_folder


def _with_config(tmp_path: Path, folder: Path, edit: object) -> Path:
    """A copy of `folder` whose config.json is `edit(dict)` (or the text `edit`)."""
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    if isinstance(edit, str):
        (out / "config.json").write_text(edit)
    else:
        data = json.loads((out / "config.json").read_text())
        edit(data)  # type: ignore[operator]
        (out / "config.json").write_text(json.dumps(data))
    return out


def _fails_in_one_line(argv: list[str], capsys: pytest.CaptureFixture[str], message: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gemma: error:"), err
    assert "\n" not in err and "Traceback" not in err
    assert message in err, err
    return err


@pytest.mark.parametrize(("edit", "message"), [
    ("[" * 200_000 + "]" * 200_000, "JSON nested too deeply"),
    ('{"model_type": "gemma", "model_type": "gemma2"}', "duplicate key 'model_type'"),
    ('{"model_type": "gemma2", "rms_norm_eps": NaN}', "NaN is not valid JSON"),
    (lambda d: d.update(tie_word_embeddings="false"), "tie_word_embeddings: must be true or false"),
    (lambda d: d.update(attention_bias="false"), "attention_bias: must be true or false"),
    (lambda d: d.update(rope_theta=0, rope_parameters=None), "rope_theta: must be a positive"),
    (lambda d: d.update(model_type="gemma", attn_logit_softcapping=50.0),
     "Gemma 1 (model_type gemma) does not soft-cap"),
    (lambda d: d.update(hidden_size="64"), "hidden_size: must be a positive integer"),
    (lambda d: d.update(num_attention_heads=0), "num_heads: must be a positive integer"),
])
def test_bad_configs_are_refused_in_one_line(tmp_path: Path, folder: Path, capsys, edit, message) -> None:
    bad = _with_config(tmp_path, folder, edit)
    _fails_in_one_line(["info", "--model", str(bad)], capsys, message)
    with pytest.raises(gemma_core.errors.GemmaError, match=re.escape(message.split(":")[0])):
        gemma_core.load(bad)


def test_a_config_claiming_millions_of_layers_is_refused_before_allocating(tmp_path: Path,
                                                                         folder: Path) -> None:
    bad = _with_config(tmp_path, folder, lambda d: (d.update(num_hidden_layers=3_000_000),
                                                   d.pop("layer_types")))
    tracemalloc.start()
    with pytest.raises(ConfigError, match="num_layers: 3000000 is past any Gemma"):
        gemma_core.load(bad)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 * 2**20  # a per-layer list of 3e6 entries alone would take ~100 MB


def test_a_layer_count_the_weights_do_not_hold_is_refused_in_one_line(tmp_path: Path,
                                                                      folder: Path) -> None:
    bad = _with_config(tmp_path, folder, lambda d: (d.update(num_hidden_layers=4000),
                                                   d.pop("layer_types")))
    with pytest.raises(gemma_core.errors.WeightError) as e:
        gemma_core.load(bad)
    assert "config's 4000 layers need at least" in str(e.value) and len(str(e.value)) < 300


def test_a_cache_larger_than_memory_is_refused_before_allocating() -> None:
    model = gemma_core.load("tiny-gemma3", max_position_embeddings=10**12)
    with pytest.raises(InputError, match=r"KV cache of 1 x .* tokens needs .* GiB, more than"):
        model.generate([[2, 3, 4]], max_new_tokens=10**10)


def _stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_invalid_utf8_prompts_are_one_line(folder: Path, monkeypatch, capsys) -> None:
    _stdin(monkeypatch, b"caf\xe9 au lait")
    _fails_in_one_line(["generate", "--model", str(folder)], capsys,
                       "stdin is not valid UTF-8 (byte 0xe9 at offset 3)")
    # a non-UTF-8 argv byte arrives as a lone surrogate (os.fsdecode's surrogateescape)
    _fails_in_one_line(["generate", "--model", str(folder), "caf\udce9"], capsys,
                       "the argument is not valid UTF-8")


def test_a_piped_prompt_loses_its_line_end(folder: Path, monkeypatch, capsys) -> None:
    args = ["generate", "--model", str(folder), "--max-new-tokens", "4"]
    assert main([*args, "Hello world"]) == 0
    direct = capsys.readouterr().out
    _stdin(monkeypatch, b"Hello world\n")
    assert main(args) == 0
    assert capsys.readouterr().out == direct


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "--seed", "-1", "hi"], "--seed: must be a non-negative integer"),
    (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens: must be a positive integer"),
    (["chat", "--context", "-5"], "--context: must be a positive integer"),
])
def test_out_of_range_flags_are_refused_by_the_parser(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_tiny_temperature_samples_the_greedy_token(folder: Path) -> None:
    model = gemma_core.load(folder)
    greedy = model.generate("Hello world", max_new_tokens=6).token_ids
    tiny = model.generate("Hello world", max_new_tokens=6, temperature=1e-40, seed=0).token_ids
    assert tiny == greedy


@pytest.mark.parametrize("penalty", [float("inf"), float("nan"), 0.0])
def test_degenerate_repetition_penalties_are_refused(folder: Path, penalty: float) -> None:
    model = gemma_core.load(folder)
    with pytest.raises(ConfigError, match="repetition_penalty: must be a positive finite number"):
        model.generate("Hello", max_new_tokens=2, repetition_penalty=penalty)


def test_process_at_a_tiny_temperature_has_no_nan() -> None:
    from gemma_core.sampling import choose, process, sampling_config

    cfg = sampling_config(temperature=1e-40)
    scores = np.array([[1.0, 3.0, 3.0, -2.0], [0.5, -1.0, 0.25, 0.0]], np.float32)
    out = process(scores, cfg, [[], []])
    assert not np.isnan(out).any()
    picks = {int(choose(out, cfg, np.random.default_rng(s))[0]) for s in range(20)}
    assert picks == {1, 2}  # only the tied best tokens


# ---- hostile files through the CLI: each one line, exit 2 --------------------------------------

@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    pytest.importorskip("gguf")
    from gguf_writer import write_gguf

    config = get_preset("tiny-gemma3")
    return write_gguf(tmp_path / "m.gguf", config, random_weights(config, 0))


@pytest.mark.parametrize(("damage", "message"), [
    ("alignment", "general.alignment must be a power of two"),
    ("head_count", "metadata gemma3.attention.head_count must be a positive integer, got 0"),
    ("truncated", "m.gguf"),
])
def test_damaged_gguf_files_are_one_line(gguf_file: Path, capsys, damage: str, message: str) -> None:
    from test_strict_readers import _rename, _set_u32

    if damage == "alignment":
        _rename(gguf_file, "gemma3.attention.value_length", "general.alignment")
        _set_u32(gguf_file, "general.alignment", 0)
    elif damage == "head_count":
        _set_u32(gguf_file, "gemma3.attention.head_count", 0)
    else:
        data = gguf_file.read_bytes()
        gguf_file.write_bytes(data[: len(data) // 2])
    for argv in (["info", "--model", str(gguf_file)], ["generate", "--model", str(gguf_file), "hi"],
                 ["convert", str(gguf_file), str(gguf_file.with_name("out")), "--to", "hf"]):
        _fails_in_one_line(argv, capsys, message)
    assert not gguf_file.with_name("out").exists()


@pytest.mark.parametrize(("damage", "message"), [
    ("truncated", "truncated"),
    ("nan", "holds a non-finite value"),
    ("garbage-tokenizer", "tokenizer.model"),
    ("overlap", "model.safetensors"),
])
def test_damaged_hf_folders_are_one_line(tmp_path: Path, folder: Path, capsys, damage: str,
                                         message: str) -> None:
    from gemma_core.safetensors_io import read_safetensors, write_safetensors

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    st = bad / "model.safetensors"
    if damage == "truncated":
        st.write_bytes(st.read_bytes()[:-100])
    elif damage == "nan":
        tensors = {k: np.array(v) for k, v in read_safetensors(st).items()}
        tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = np.nan
        write_safetensors(st, tensors)
    elif damage == "garbage-tokenizer":
        (bad / "tokenizer.model").write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        import struct

        raw = st.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        first, second = sorted((k for k in header if k != "__metadata__"),
                               key=lambda k: header[k]["data_offsets"][0])[:2]
        header[second]["data_offsets"] = header[first]["data_offsets"]  # both read the same bytes
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        st.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    argv = ["generate", "--model", str(bad), "hi"]
    _fails_in_one_line(argv, capsys, message)
    if damage != "garbage-tokenizer":
        _fails_in_one_line(["convert", str(bad), str(tmp_path / "out"), "--to", "gguf"], capsys, message)
        assert not (tmp_path / "out").exists()


def test_a_garbage_tokenizer_flag_is_one_line(tmp_path: Path, folder: Path, capsys) -> None:
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00not a sentencepiece model" * 50)
    _fails_in_one_line(["generate", "--model", str(folder), "--tokenizer", str(junk), "hi"], capsys,
                       "junk.model")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"stop_strings": [""]}, "stop_strings: each must be a non-empty string"),
    ({"stop_strings": "stop"}, "stop_strings: expected a list of strings"),
    ({"seed": -1}, "seed: must be a non-negative integer"),
    ({"seed": 1.5}, "seed: must be a non-negative integer"),
])
def test_degenerate_generation_arguments_are_refused(folder: Path, kwargs, message: str) -> None:
    model = gemma_core.load(folder)
    with pytest.raises(InputError, match=message):
        model.generate("Hello", max_new_tokens=2, **kwargs)


def test_an_empty_stop_flag_is_one_line(folder: Path, capsys) -> None:
    _fails_in_one_line(["generate", "--model", str(folder), "--stop", "", "hi"], capsys,
                       "stop_strings: each must be a non-empty string")
