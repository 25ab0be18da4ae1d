"""`GemmaTokenizer`: SentencePiece with Gemma's conventions, and Gemma's chat templates.

BOS is added by default; there is no dummy prefix; digits are split and whitespace runs kept
(properties of the model file). The special tokens are the CONTROL pieces (in Google's files
`<pad>`, `<eos>`, `<bos>`), `<unk>` and Gemma's markers, which Google's files store as USER_DEFINED
(`<start_of_turn>`, `<end_of_turn>`, `<mask>`, `<unused*>`; Gemma 1/2 `<2mass>`, `[@BOS@]`) and
some converters as CONTROL. SentencePiece never matches a CONTROL piece inside text, so text is
first split on the special strings, as transformers does for its special tokens; that is also
what keeps a rendered chat from getting two BOS. (A USER_DEFINED piece SentencePiece matches
itself, to the same ids.)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gemma_core.errors import CheckpointError, InputError

GEMMA3_START_OF_TURN = 105
# Gemma's marker pieces: special (split out of text, skipped by `skip_special_tokens`) whether the
# file stores them USER_DEFINED (Google's) or CONTROL (rebuilt by other tools from llama.cpp types)
SPECIAL_MARKERS = re.compile(r"<start_of_turn>|<end_of_turn>|<mask>|<unused\d+>|<2mass>|\[@BOS@\]")


@dataclasses.dataclass(frozen=True)
class BatchEncoding:
    """Left-padded `input_ids [B, T]` and `attention_mask [B, T]` (1 for real tokens)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


class GemmaTokenizer:
    """A SentencePiece model (from a `tokenizer.model` file or serialized bytes) used the Gemma way."""

    def __init__(self, model: str | os.PathLike[str] | bytes, *, add_bos: bool = True,
                 chat_format: str | None = None, chat_template: str | None = None) -> None:
        import sentencepiece as spm

        if not isinstance(model, bytes) and not os.path.isfile(model):
            raise InputError(f"tokenizer: no such file {os.fspath(model)!r}")
        source = "tokenizer.model bytes" if isinstance(model, bytes) else repr(os.fspath(model))
        try:
            if isinstance(model, bytes):
                self.sp = spm.SentencePieceProcessor(model_proto=model)
            else:
                self.sp = spm.SentencePieceProcessor(model_file=os.fspath(model))
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"tokenizer: {source} is not a readable SentencePiece model "
                                  f"({str(e).strip() or type(e).__name__})") from None
        self.add_bos = add_bos
        self._control = _special_pieces(self.sp.serialized_model_proto())
        self._control_ids = frozenset(self._control.values())
        pattern = "|".join(re.escape(p) for p in sorted(self._control, key=len, reverse=True) if p)
        self._split = re.compile(f"({pattern})") if pattern else None
        self.start_of_turn_id = self._control.get("<start_of_turn>")
        self.end_of_turn_id = self._control.get("<end_of_turn>")
        if chat_format is None:
            chat_format = "gemma3" if self.start_of_turn_id == GEMMA3_START_OF_TURN else "gemma"
        if chat_format not in ("gemma", "gemma3"):
            raise InputError(f"chat_format: unknown value {chat_format!r} (known: gemma, gemma3)")
        self.chat_format = chat_format
        self.chat_template = chat_template  # the file's own Jinja template, kept for reference

    # ---- ids of the special tokens ----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return int(self.sp.pad_id())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def unk_id(self) -> int:
        return int(self.sp.unk_id())

    @property
    def mask_id(self) -> int | None:
        return self._control.get("<mask>")

    def is_special(self, token_id: int) -> bool:
        """Special tokens: pad, eos, bos, unk, mask, turn markers, unused, ... (not html tags)."""
        return token_id in self._control_ids

    # ---- encode / decode --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first when `add_special_tokens` and the tokenizer adds it."""
        if not isinstance(text, str):
            raise InputError(f"text: expected a string, got {type(text).__name__}")
        ids = [self.bos_id] if add_special_tokens and self.add_bos else []
        pieces = self._split.split(text) if self._split else [text]
        for piece in pieces:
            if piece in self._control:
                ids.append(self._control[piece])
            elif piece:
                ids.extend(self.sp.encode(piece))
        return ids

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = True) -> BatchEncoding:
        """Encode one text or a batch, left-padded with the pad id."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            raise InputError("texts: expected at least one text")
        rows = [self.encode(t, add_special_tokens) for t in batch]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row):] = row
                mask[i, width - len(row):] = 1
        return BatchEncoding(ids, mask)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; control tokens are written as their strings unless skipped."""
        out: list[str] = []
        run: list[int] = []
        for token in (int(i) for i in np.asarray(ids).reshape(-1)):
            if not 0 <= token < self.vocab_size:
                raise InputError(f"ids: token id {token} is outside the vocabulary [0, {self.vocab_size})")
            if token in self._control_ids:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.sp.id_to_piece(token))
            else:
                run.append(token)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        """Render `messages` ({"role", "content"}) in the Gemma format of this tokenizer.

        Roles alternate user/assistant (written `model`); Gemma 1/2 refuse a system message,
        Gemma 3 folds it into the first user turn. With `tokenize=True` the ids are returned,
        with exactly one BOS.
        """
        text = render_chat(messages, self.chat_format, add_generation_prompt,
                           bos=self.sp.id_to_piece(self.bos_id))
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _special_pieces(proto: bytes) -> dict[str, int]:
    """{piece: id} of the CONTROL and UNKNOWN pieces and of Gemma's USER_DEFINED markers."""
    import importlib

    pb: Any = importlib.import_module("sentencepiece.sentencepiece_model_pb2")
    kinds = pb.ModelProto.SentencePiece
    m = pb.ModelProto()
    m.ParseFromString(proto)
    return {p.piece: i for i, p in enumerate(m.pieces) if p.type in (kinds.CONTROL, kinds.UNKNOWN)
            or (p.type == kinds.USER_DEFINED and SPECIAL_MARKERS.fullmatch(p.piece))}


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for item in content:
            if not isinstance(item, Mapping) or item.get("type") != "text":
                raise InputError(f"content: only text parts are supported, got {item!r}")
            parts.append(str(item.get("text", "")).strip())
        return "".join(parts)
    raise InputError(f"content: expected a string or a list of text parts, got {content!r}")


def _system_text(message: Mapping[str, Any]) -> str:
    """A system message's text as Gemma 3's template takes it: untrimmed, the first part of a list."""
    content = message.get("content")
    if isinstance(content, list) and content:
        first = content[0]
        if not isinstance(first, Mapping) or first.get("type") != "text":
            raise InputError(f"content: only text parts are supported, got {first!r}")
        return str(first.get("text", ""))
    return _content(message)


def render_chat(messages: Sequence[Mapping[str, Any]], chat_format: str, add_generation_prompt: bool,
                bos: str = "<bos>") -> str:
    """The Gemma chat templates of the hub tokenizers, as plain code."""
    if not messages:
        raise InputError("messages: expected at least one message")
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m:
            raise InputError(f"messages: each message needs a role and content, got {m!r}")
    prefix = ""
    loop = list(messages)
    if loop[0]["role"] == "system":
        if chat_format != "gemma3":
            raise InputError("messages: System role not supported by the Gemma 1/2 chat format")
        prefix = _system_text(loop[0]) + "\n\n"
        loop = loop[1:]
    text = bos
    for i, m in enumerate(loop):
        if (m["role"] == "user") != (i % 2 == 0):
            raise InputError("messages: Conversation roles must alternate user/assistant/user/assistant/...")
        role = "model" if m["role"] == "assistant" else m["role"]
        first = prefix if i == 0 else ""
        text += f"<start_of_turn>{role}\n{first}{_content(m).strip()}<end_of_turn>\n"
    if add_generation_prompt:
        text += "<start_of_turn>model\n"
    return text
