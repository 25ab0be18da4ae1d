"""GGUF reading on small files written the llama.cpp way: config, tensors, norm offset,
dequantisation, tokenizer from metadata, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS
from gguf_writer import write_gguf

import gemma_core
from gemma_core.errors import CheckpointError, ConfigError
from gemma_core.formats.gguf import canonical_name, load_gguf
from gemma_core.presets import get_preset
from gemma_core.tokenizer import GemmaTokenizer
from gemma_core.weights import random_weights

pytest.importorskip("gguf")


@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma3"])
def test_f32_round_trip_is_exact(tmp_path: Path, preset: str) -> None:
    config = get_preset(preset)
    weights = random_weights(config, 0)
    path = write_gguf(tmp_path / "m.gguf", config, weights)
    got_config, got, tok = load_gguf(path, query_pre_attn_scalar=config.query_pre_attn_scalar)
    assert tok is None
    assert got_config == config.replace(eos_token_ids=(1,))
    assert set(got) == set(weights)
    for name, value in weights.items():
        assert got[name].shape == value.shape
        assert got[name].dtype == np.float32
        # norms went through 1 + w and back: equal up to one float32 rounding
        np.testing.assert_allclose(got[name], value, atol=1e-7 if "norm" in name else 0, rtol=0)


def test_gemma2_metadata_and_query_scalar(tmp_path: Path) -> None:
    config = get_preset("tiny-gemma2")
    path = write_gguf(tmp_path / "m.gguf", config, random_weights(config, 1))
    with pytest.raises(ConfigError, match="query_pre_attn_scalar: GGUF does not record it"):
        load_gguf(path)
    got, _, _ = load_gguf(path, query_pre_attn_scalar=20)
    assert (got.attn_logit_softcap, got.final_logit_softcap, got.sliding_window) == (50.0, 30.0, 8)
    assert got.query_pre_attn_scalar == 20


@pytest.mark.parametrize(("qtype", "rel"), [("F16", 1e-3), ("Q8_0", 1e-2)])
def test_quantised_tensors_dequantise_close(tmp_path: Path, qtype: str, rel: float) -> None:
    config = get_preset("tiny-gemma")
    weights = random_weights(config, 2)
    _, got, _ = load_gguf(write_gguf(tmp_path / "m.gguf", config, weights, qtype=qtype))
    for name, value in weights.items():
        err = np.abs(got[name] - value).max() / np.abs(value).max()
        assert err <= rel, name
    assert not np.array_equal(got["model.layers.0.mlp.up_proj.weight"],
                              weights["model.layers.0.mlp.up_proj.weight"])


def test_loaded_model_matches_the_source_weights(tmp_path: Path) -> None:
    config = get_preset("tiny-gemma3")
    weights = random_weights(config, 3)
    path = write_gguf(tmp_path / "m.gguf", config, weights)
    ours = gemma_core.load(path, query_pre_attn_scalar=16)
    ref = gemma_core.Model(config, weights)
    ids = np.array([[2, 7, 9, 11, 13]])
    np.testing.assert_allclose(ours.forward(ids).logits, ref.forward(ids).logits, atol=1e-5)


def test_tokenizer_rebuilt_from_metadata(tmp_path: Path, spm_file: Path) -> None:
    spm = GemmaTokenizer(spm_file)
    pieces = [spm.sp.id_to_piece(i) for i in range(spm.vocab_size)]
    types = []
    for i in range(spm.vocab_size):
        sp = spm.sp
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 4 if pieces[i] in ("\n", "\n\n", "\u2581\u2581", "\u2581\u2581\u2581\u2581", "\t")
                     else 1)
    # llama.cpp writes user-defined pieces with real spaces
    tokens = [p.replace("\u2581", " ") if t == 4 else p for p, t in zip(pieces, types, strict=True)]
    scores = [spm.sp.get_score(i) for i in range(spm.vocab_size)]
    config = get_preset("tiny-gemma3")
    path = write_gguf(tmp_path / "m.gguf", config, random_weights(config, 0),
                      tokenizer=(tokens, scores, types))
    _, _, tok = load_gguf(path, query_pre_attn_scalar=16)
    assert tok is not None
    for text in [*CORPUS, "a  b", "x\n\ny", "<start_of_turn>user\nhi<end_of_turn>"]:
        assert tok.encode(text) == spm.encode(text), text
        assert tok.decode(tok.encode(text)) == spm.decode(spm.encode(text))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 1, 0, 3)


def test_canonical_names_follow_each_generation() -> None:
    from gemma_core.config import Architecture as A

    layer = "model.layers.3."
    assert canonical_name("blk.3.ffn_norm.weight", A.GEMMA) == layer + "post_attention_layernorm.weight"
    assert canonical_name("blk.3.ffn_norm.weight", A.GEMMA2) == layer + "pre_feedforward_layernorm.weight"
    assert canonical_name("blk.3.post_attention_norm.weight", A.GEMMA3) == (
        "model.layers.3.post_attention_layernorm.weight")
    assert canonical_name("rope_freqs.weight", A.GEMMA3) is None


def test_bad_files(tmp_path: Path) -> None:
    config = get_preset("tiny-gemma")
    weights = random_weights(config, 0)
    good = write_gguf(tmp_path / "m.gguf", config, weights)
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_gguf(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(tmp_path / "junk.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:200])
    with pytest.raises(CheckpointError, match="truncated GGUF header"):
        load_gguf(tmp_path / "head.gguf")
    with pytest.raises(CheckpointError, match="no such file"):
        load_gguf(tmp_path / "missing.gguf")
    llama = write_gguf(tmp_path / "llama.gguf", config, weights, arch_name="llama")
    with pytest.raises(ConfigError, match=r"general\.architecture 'llama' is not supported"):
        load_gguf(llama)
    q4 = write_gguf(tmp_path / "q4.gguf", config, weights, qtype="Q4_0")
    with pytest.raises(CheckpointError, match="quantisation type Q4_0, not supported"):
        load_gguf(q4)


@pytest.mark.parametrize("scheme", ["int8", "int4-mixed"])
def test_quantising_on_load_streams_rows_and_equals_quantising_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str) -> None:
    from gemma_core.formats import gguf as gguf_format
    from gemma_core.weights import quantize_model

    config = get_preset("tiny-gemma")
    path = write_gguf(tmp_path / "m.gguf", config, random_weights(config, 4), qtype="Q8_0")
    monkeypatch.setattr(gguf_format, "QUANTIZE_ROWS", 7)  # several row blocks per tensor
    streamed = gemma_core.load(str(path), quantize=scheme)
    float_config, weights, _ = load_gguf(path)
    want_config, want = quantize_model(float_config, weights, scheme)
    assert streamed.config.quantization == want_config.quantization
    got = dict(streamed.weights)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
