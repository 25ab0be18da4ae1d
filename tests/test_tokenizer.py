"""GemmaTokenizer against transformers' GemmaTokenizer on the same SentencePiece model file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS

from gemma_core.errors import InputError
from gemma_core.tokenizer import GemmaTokenizer, render_chat

EXTRA = ["12345", "Hello", " Hello", "  two spaces", "x\n\ny", "tab\there", "ẞ𝄞 unseen ǅ",
         "<start_of_turn>user\nhi<end_of_turn>\n", "literal <bos> in text", ""]

GEMMA12_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/"
    "user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' "
    "%}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(spm_file: Path) -> GemmaTokenizer:
    return GemmaTokenizer(spm_file)


@pytest.fixture(scope="module")
def hf_tok(spm_file: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_tok")
    shutil.copy(spm_file, folder / "tokenizer.model")
    return transformers.GemmaTokenizer.from_pretrained(folder, add_bos_token=True)


def test_special_ids(tok: GemmaTokenizer) -> None:
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert tok.chat_format == "gemma3"
    assert tok.is_special(105) and not tok.is_special(200)


@pytest.mark.parametrize("text", CORPUS + EXTRA)
def test_ids_and_decode_match_transformers(tok: GemmaTokenizer, hf_tok, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode(text)
    assert ids == hf_tok(text).input_ids
    assert tok.decode(ids) == hf_tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False).input_ids


def test_bos_digits_whitespace_and_bytes(tok: GemmaTokenizer) -> None:
    ids = tok.encode("12345")
    assert ids[0] == tok.bos_id
    assert [tok.decode([i]) for i in ids[1:]] == list("12345")  # digits split one per token
    assert tok.encode("Hello")[1] != tok.encode(" Hello")[1]  # no dummy prefix
    assert tok.sp.id_to_piece(tok.encode("a  b", add_special_tokens=False)[1]) == "\u2581\u2581"
    unseen = tok.encode("𝄞", add_special_tokens=False)
    assert all(tok.sp.is_byte(i) for i in unseen) and len(unseen) == 4  # byte fallback
    assert tok.decode(unseen) == "𝄞"


def test_control_strings_in_text_become_special_ids(tok: GemmaTokenizer) -> None:
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>", add_special_tokens=False)
    assert ids[0] == 105 and ids[-1] == 106
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_batch_left_padding(tok: GemmaTokenizer) -> None:
    enc = tok(["Hello world", "a"])
    long, short = tok.encode("Hello world"), tok.encode("a")
    assert enc.input_ids.shape == (2, len(long))
    np.testing.assert_array_equal(enc.input_ids[1, -len(short):], short)
    assert (enc.input_ids[1, :-len(short)] == tok.pad_id).all()
    np.testing.assert_array_equal(enc.attention_mask[1], [0] * (len(long) - len(short)) + [1] * len(short))


def test_gemma3_chat_template_literal(tok: GemmaTokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    expected = ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
                "Hello!<end_of_turn>\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n")
    assert tok.apply_chat_template(messages) == expected
    ids = tok.apply_chat_template(messages, tokenize=True)
    assert isinstance(ids, list)
    assert ids[:2] == [tok.bos_id, 105] and ids.count(tok.bos_id) == 1  # no double BOS


def test_gemma12_chat_template_matches_hub_jinja(hf_tok) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "  Hello  "}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "Bye"}]
    hf_tok.chat_template = GEMMA12_TEMPLATE
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_chat(messages, "gemma", True) == expected
    assert render_chat(messages[:1], "gemma", False) == "<bos><start_of_turn>user\nHello<end_of_turn>\n"


def test_chat_errors(tok: GemmaTokenizer) -> None:
    with pytest.raises(InputError, match="System role not supported"):
        render_chat([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], "gemma", True)
    with pytest.raises(InputError, match="must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(InputError, match="at least one message"):
        tok.apply_chat_template([])


def test_bad_inputs(tok: GemmaTokenizer, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(InputError, match="expected a string"):
        tok.encode(5)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no such file"):
        GemmaTokenizer(tmp_path / "missing.model")


@pytest.mark.parametrize("text", CORPUS)
def test_streamed_text_is_the_whole_decode(tok: GemmaTokenizer, text: str) -> None:
    """generate's incremental detokenisation (a window of the last tokens, not the whole row
    each step) gives, at every step, a prefix of the whole decode, and at the end all of it
    (byte-fallback tokens of one character arriving apart, control tokens skipped)."""
    from gemma_core.generation import RowState

    ids = tok.encode(text, add_special_tokens=False)
    ids = [*ids[:5], tok.bos_id, *ids[5:]]  # a control token mid-stream: skipped
    rows = RowState(1, tok, ())
    for token in ids:
        rows.ids[0].append(token)
        assert tok.decode(rows.ids[0], skip_special_tokens=True).startswith(rows.text(0))
    assert rows.text(0) == tok.decode(ids, skip_special_tokens=True)


def test_streamed_text_of_random_ids(tok: GemmaTokenizer) -> None:
    """Random ids (stray UTF-8 continuation bytes among them) stream to the whole decode too."""
    from gemma_core.generation import RowState

    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, tok.vocab_size, 40).tolist()
        rows = RowState(1, tok, ())
        for token in ids:
            rows.ids[0].append(token)
            rows.text(0)
        whole = tok.decode(ids, skip_special_tokens=True)
        assert whole.startswith(rows.text(0)) and rows.final_text(0) == whole
        if not whole.endswith("\ufffd"):  # else the last character may still be arriving
            assert rows.text(0) == whole
