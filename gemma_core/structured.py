"""Structured output: decoding constrained by a JSON schema or a regular expression.

A `GrammarProcessor` is a logits processor (`gemma_core.processors`): at each step it lets
through only the tokens the grammar allows after what the row has generated, and the eos ids
only where the grammar accepts the text so far, so a generation that ends at eos is always valid
(one that `max_new_tokens` cuts short, finish reason "length", may be incomplete). The grammar
engine is llguidance (the Rust library behind guidance, also used by vLLM and llama.cpp),
installed with the optional extra `gemma-core[structured]`; nothing here imports it before a
constraint is asked for.

llguidance needs each token's bytes: a `GemmaTokenizer` piece with `▁` read as a space, a
byte-fallback piece `<0xNN>` as that byte, and special tokens (control, unknown, Gemma's
markers) under llguidance's 0xFF prefix, so no grammar can produce them. That index is built
once per tokenizer and head width (about 3 s for Gemma 3's 262k pieces) and cached; the
per-step masks are computed by llguidance in Rust, one bitmask row per row of the batch.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gemma_core.errors import ConfigError, InputError

if TYPE_CHECKING:
    from gemma_core.model import Model
    from gemma_core.tokenizer import GemmaTokenizer

EXTRA = "structured"
SPECIAL_PREFIX = b"\xff"  # llguidance's mark of a special token: never matched by text
# JSON without optional whitespace unless the schema's "x-guidance" asks for it: a small model
# let free between tokens can fill its whole budget with spaces and newlines
JSON_DEFAULTS: dict[str, Any] = {"whitespace_flexible": False}

_VOCABS: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()
_EXECUTOR: list[Any] = []  # one llguidance thread pool per process, made on first use


def _llguidance() -> Any:
    try:
        import llguidance
    except ModuleNotFoundError:
        raise ConfigError("structured output (json_schema, regex, response_format) needs llguidance: "
                          f"pip install 'gemma-core[{EXTRA}]'") from None
    return llguidance


def token_bytes(tokenizer: GemmaTokenizer) -> list[bytes]:
    """Each token's bytes as llguidance reads them (special tokens behind the 0xFF prefix)."""
    sp = tokenizer.sp
    out = []
    for i in range(tokenizer.vocab_size):
        piece = sp.id_to_piece(i)
        if tokenizer.is_special(i) or sp.is_control(i) or sp.is_unknown(i):
            out.append(SPECIAL_PREFIX + piece.encode("utf-8"))
        elif sp.is_byte(i):
            out.append(bytes([int(piece[3:5], 16)]))  # "<0xNN>"
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


class _Wrapped:
    """What `llguidance.TokenizerWrapper` reads of a tokenizer: ids, token bytes, encoding."""

    def __init__(self, tokenizer: GemmaTokenizer, tokens: list[bytes]) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = tokens
        self.special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(SPECIAL_PREFIX)]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special_tokens=False)


def ll_tokenizer(tokenizer: GemmaTokenizer, vocab_size: int) -> Any:
    """The llguidance tokenizer of `tokenizer` for a head of `vocab_size` logits (ids past the
    tokenizer's pieces are empty tokens, never allowed), built once per tokenizer and width."""
    llg = _llguidance()
    widths = _VOCABS.setdefault(tokenizer, {})
    if vocab_size not in widths:
        tokens = token_bytes(tokenizer)[:vocab_size]
        tokens += [b""] * (vocab_size - len(tokens))
        widths[vocab_size] = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped(tokenizer, tokens)),
                                             n_vocab=vocab_size)
    return widths[vocab_size]


def grammar_of(*, json_schema: Mapping[str, Any] | str | None = None, regex: str | None = None) -> str:
    """The llguidance grammar of a JSON schema (a dict or its JSON text) or of a regular
    expression (Rust `regex` syntax, matched against the whole output); exactly one."""
    llg = _llguidance()
    if (json_schema is None) == (regex is None):
        raise InputError("structured output: give exactly one of json_schema and regex")
    if regex is not None:
        if not isinstance(regex, str):
            raise InputError(f"regex: expected a string, got {type(regex).__name__}")
        return str(llg.LLMatcher.grammar_from_regex(regex))
    schema = json_schema
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InputError(f"json_schema: not valid JSON ({e})") from None
    if not isinstance(schema, Mapping):
        raise InputError(f"json_schema: expected a JSON object, got {type(schema).__name__}")
    try:
        return str(llg.LLMatcher.grammar_from_json_schema(dict(schema), defaults=JSON_DEFAULTS))
    except (ValueError, TypeError) as e:
        raise InputError(f"json_schema: {e}") from None


def response_format_grammar(response_format: Mapping[str, Any] | None) -> str | None:
    """The grammar of an OpenAI `response_format`: {"type": "json_schema", "json_schema":
    {"name", "schema", ...}}, {"type": "json_object"} (any JSON object), or {"type": "text"}
    and None (no constraint: returns None)."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InputError(f"response_format: expected an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return grammar_of(json_schema={"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise InputError("response_format: type json_schema needs a json_schema object "
                             "({\"name\": ..., \"schema\": {...}})")
        schema = spec.get("schema", {})  # OpenAI's schema is optional: then any JSON value
        return grammar_of(json_schema=schema)
    raise InputError(f"response_format: unknown type {kind!r} (known: text, json_object, json_schema)")


def _one_line(message: str) -> str:
    """llguidance's message on one line: its first line and the parser's "error:" lines (the
    rest draws carets under the source)."""
    lines = [line.strip() for line in message.strip().splitlines()]
    return " ".join([lines[0], *(line for line in lines[1:] if line.startswith("error:"))])


class GrammarProcessor:
    """A logits processor `(ids [N, T], scores [N, V]) -> scores` that keeps each row within a
    grammar (`grammar_of`). Row state is keyed by the tokens generated so far (the columns past
    the first call's width), so rows may progress differently, finish early (the pad ids
    appended after eos are ignored) or be reordered between steps (beam search). A call that
    is not one column wider than the last, or whose prompt differs, starts a new generation."""

    def __init__(self, tokenizer: GemmaTokenizer, vocab_size: int, grammar: str,
                 eos_token_ids: Sequence[int], *, what: str = "grammar") -> None:
        self._llg = _llguidance()
        self.eos = sorted({int(e) for e in eos_token_ids if 0 <= int(e) < vocab_size})
        if not self.eos:
            raise InputError("structured output: needs an eos token id within the vocabulary "
                             "(to end where the grammar is complete)")
        self._eos_set = frozenset(self.eos)
        self.vocab_size = int(vocab_size)
        self._lltok = ll_tokenizer(tokenizer, self.vocab_size)
        failed, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self._lltok)
        if failed:
            raise InputError(f"{what}: {_one_line(messages[0])}")
        self._root = self._llg.LLMatcher(self._lltok, grammar, log_level=0)
        if self._root.is_error():
            raise InputError(f"{what}: {self._root.get_error()}")
        self._prompt: np.ndarray | None = None
        self._width = 0
        self._states: dict[tuple[int, ...], Any] = {}

    def reset(self) -> None:
        """Forget the rows: the next call starts a new generation."""
        self._prompt, self._states = None, {}

    def _sync(self, ids: np.ndarray) -> list[tuple[int, ...]]:
        """Each row's generated tokens, the matcher of each advanced to its last token."""
        # a step of the same generation is one column wider than the last, with the same prompt
        if (self._prompt is None or ids.shape[1] != self._width + 1 or len(ids) != len(self._prompt)
                or not np.array_equal(ids[:, :self._prompt.shape[1]], self._prompt)):
            self._prompt, self._states = ids.copy(), {}
        self._width = ids.shape[1]
        keys = [tuple(int(t) for t in row) for row in ids[:, self._prompt.shape[1]:]]
        wanted = [k for k in dict.fromkeys(keys) if k not in self._states]
        children: dict[tuple[int, ...], int] = {}
        for key in wanted:
            if key:
                children[key[:-1]] = children.get(key[:-1], 0) + 1
        new = {k: self._states[k] for k in keys if k in self._states}
        for key in wanted:
            if not key:  # the first step
                new[key] = self._root.deep_copy()
                continue
            parent = key[:-1]
            if parent in self._states:
                children[parent] -= 1
                state = self._states[parent]
                # the last child advances the parent's matcher itself, earlier ones a copy
                if (children[parent] or parent in new) and state is not _DONE:
                    state = state.deep_copy()
            else:  # not a child of the last call's rows: replayed from the start
                state = self._root.deep_copy()
                for t in parent:
                    state = self._advance(state, t)
            new[key] = self._advance(state, key[-1])
        self._states = new
        return keys

    def _advance(self, state: Any, token: int) -> Any:
        if state is _DONE or token in self._eos_set:
            return _DONE  # eos is allowed only where the grammar accepts: the row is complete
        if not state.consume_token(token):
            raise InputError(f"structured output: token {token} is not allowed by the grammar here "
                             f"({state.get_error() or 'rejected'}); did another processor ban every "
                             "token the grammar allows?")
        return state

    def __call__(self, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        ids, scores = np.asarray(ids), np.asarray(scores, np.float32)
        if scores.shape[1] != self.vocab_size:
            raise InputError(f"structured output: scores have {scores.shape[1]} columns, the "
                             f"processor was built for {self.vocab_size}")
        keys = self._sync(ids)
        live = [k for k in dict.fromkeys(keys) if self._states[k] is not _DONE]
        if not live:
            return scores
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

        if not _EXECUTOR:
            _EXECUTOR.append(self._llg.LLExecutor())
        masks = allocate_token_bitmask(len(live), self.vocab_size)  # [L, ceil(V/32)] int32
        fill_next_token_bitmask_par(_EXECUTOR[0], [(self._states[k], i) for i, k in enumerate(live)], masks)
        # bit j of word w is token 32w+j: little-endian bytes, least significant bit first
        allowed = np.unpackbits(masks.astype("<i4").view(np.uint8), axis=1,
                                bitorder="little")[:, :self.vocab_size].astype(bool)  # [L, V]
        allowed[:, self._lltok.eos_token] = False  # eos: ours, and only where the grammar accepts
        accepting = np.array([self._states[k].is_accepting() for k in live])
        allowed[:, self.eos] = accepting[:, None]
        if live == keys:  # every row unfinished and in its own state: no gathering
            return np.where(allowed, scores, np.float32(-np.inf))
        mask_of = {k: i for i, k in enumerate(live)}
        rows = [r for r, k in enumerate(keys) if k in mask_of]  # the unfinished rows
        out = scores.copy()
        out[rows] = np.where(allowed[[mask_of[keys[r]] for r in rows]], scores[rows], np.float32(-np.inf))
        return out


class _Done:
    """The state of a row that has generated eos (later columns are pads)."""

    def __repr__(self) -> str:
        return "DONE"


_DONE = _Done()


def constraint_processor(model: Model, *, json_schema: Mapping[str, Any] | str | None = None,
                         regex: str | None = None, response_format: Mapping[str, Any] | None = None,
                         eos_token_ids: Sequence[int] | None = None) -> GrammarProcessor | None:
    """The `GrammarProcessor` of one of `json_schema`, `regex` or an OpenAI `response_format`
    for `model` (its tokenizer and head width; eos as generation's default unless given), or
    None when none constrains the output."""
    given = [n for n, v in (("json_schema", json_schema), ("regex", regex),
                            ("response_format", response_format)) if v is not None]
    if len(given) > 1:
        raise InputError(f"structured output: {' and '.join(given)} conflict; give one")
    if not given:
        return None
    if model.tokenizer is None:
        raise InputError(f"{given[0]}: structured output needs the model's tokenizer")
    if response_format is not None:
        grammar = response_format_grammar(response_format)
        if grammar is None:
            return None
    else:
        grammar = grammar_of(json_schema=json_schema, regex=regex)
    if eos_token_ids is None:
        from gemma_core.decoding import default_eos_ids

        eos_token_ids = default_eos_ids(model)
    return GrammarProcessor(model.tokenizer, model.config.vocab_size, grammar, eos_token_ids, what=given[0])


def with_constraint(model: Model, logits_processor: Sequence[Any] | None, **constraint: Any) -> Any:
    """`logits_processor` with the constraint's processor appended (`constraint_processor`'s
    arguments); unchanged when there is none."""
    proc = constraint_processor(model, **constraint)
    if proc is None:
        return logits_processor
    if callable(logits_processor):
        raise ConfigError("logits_processor/stopping_criteria: expected a list of callables, got one")
    return [*(logits_processor or ()), proc]


def schema_argument(value: str) -> Any:
    """A `--json-schema` value: a file holding the schema, or the schema's JSON text."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            value = f.read()
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise InputError(f"--json-schema: neither a file nor valid JSON ({e})") from None
