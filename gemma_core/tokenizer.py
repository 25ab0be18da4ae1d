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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from gemma_core.errors import CheckpointError, InputError

GEMMA3_START_OF_TURN = 105
# Gemma's marker pieces: special (split out of text, skipped by `skip_special_tokens`) whether the
# file stores them USER_DEFINED (Google's) or CONTROL (rebuilt by other tools from llama.cpp types)
SPECIAL_MARKERS = re.compile(r"<start_of_turn>|<end_of_turn>|<mask>|<unused\d+>|<2mass>|\[@BOS@\]")


PADDING = (True, False, "longest", "max_length", "do_not_pad")
TENSOR_TYPES = ("np", "pt", "jax", "tf")


@dataclasses.dataclass(frozen=True, eq=False)
class BatchEncoding:
    """`input_ids [B, T]` and `attention_mask [B, T]` (1 for real tokens): numpy arrays, a
    framework's tensors (`return_tensors`) or, unpadded, lists. Reads as a mapping too
    (`enc["input_ids"]`, `model(**enc)`), as transformers' BatchEncoding."""

    input_ids: Any
    attention_mask: Any

    def keys(self) -> tuple[str, ...]:
        """The field names, so `**enc` passes them as keyword arguments."""
        return ("input_ids", "attention_mask")

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def items(self) -> list[tuple[str, Any]]:
        """(name, value) pairs, as a dict's."""
        return [(k, getattr(self, k)) for k in self.keys()]


class GemmaTokenizer:
    """A SentencePiece model (from a `tokenizer.model` file or serialized bytes) used the Gemma way."""

    def __init__(self, model: str | os.PathLike[str] | bytes, *, add_bos: bool = True,
                 chat_format: str | None = None, chat_template: str | None = None,
                 special_pieces: Mapping[str, int] | None = None) -> None:
        """`special_pieces`: the model's {piece: id} of `special_pieces` when already known (the
        load cache keeps it: finding it walks 262k pieces, ~0.2 s), checked against the model's
        pieces; found from the model otherwise."""
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
        self.padding_side = "left"  # transformers' Gemma default, and what generation needs
        self.truncation_side = "right"
        if special_pieces is None:
            self._control = _special_pieces(self.sp.serialized_model_proto())
        else:
            self._control = dict(special_pieces)
            size = self.sp.get_piece_size()
            wrong = next((p for p, i in self._control.items() if not (isinstance(i, int) and 0 <= i < size)
                          or self.sp.id_to_piece(i) != p), None)
            if wrong is not None:
                raise InputError(f"special_pieces: {wrong!r} is not the piece of id "
                                 f"{self._control[wrong]!r} in {source}")
        self._control_ids = frozenset(self._control.values())
        # text is split on the special pieces by a scan (`_split_special`), not by one regex of
        # them all: compiling the alternation of Gemma 3's 6250 pieces cost ~0.5 s of CPU a process
        self._piece_lengths = sorted({len(p) for p in self._control if p}, reverse=True)
        starts = "".join(sorted({p[0] for p in self._control if p}))
        self._piece_starts = re.compile(f"[{re.escape(starts)}]") if starts else None
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

    @property
    def special_pieces(self) -> dict[str, int]:
        """{piece: id} of the CONTROL and UNKNOWN pieces and of Gemma's USER_DEFINED markers."""
        return dict(self._control)

    def is_special(self, token_id: int) -> bool:
        """Special tokens: pad, eos, bos, unk, mask, turn markers, unused, ... (not html tags)."""
        return token_id in self._control_ids

    # ---- encode / decode --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first when `add_special_tokens` and the tokenizer adds it."""
        if not isinstance(text, str):
            raise InputError(f"text: expected a string, got {type(text).__name__}")
        ids = [self.bos_id] if add_special_tokens and self.add_bos else []
        for piece in self._split_special(text):
            if piece in self._control:
                ids.append(self._control[piece])
            elif piece:
                ids.extend(self.sp.encode(piece))
        return ids

    def _split_special(self, text: str) -> list[str]:
        """`text` cut around its special pieces: [plain, special, plain, ..., plain], as
        `re.split` with an alternation of the pieces, longest first, gives it (at each position
        from the left, the longest piece that starts there)."""
        if self._piece_starts is None:
            return [text]
        out, done = [], 0
        for m in self._piece_starts.finditer(text):
            at = m.start()
            if at < done:  # inside the piece just taken
                continue
            for n in self._piece_lengths:
                piece = text[at:at + n]  # shorter near the end: then it is a shorter piece or none
                if piece in self._control:
                    out += [text[done:at], piece]
                    done = at + len(piece)
                    break
        out.append(text[done:])
        return out

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = True, *,
                 padding: bool | str = True, max_length: int | None = None,
                 truncation: bool | str = False, return_tensors: str | None = None,
                 padding_side: str | None = None, pad_to_multiple_of: int | None = None) -> BatchEncoding:
        """Encode one text or a batch as transformers' tokenizers do.

        `truncation` cuts rows to `max_length` tokens (on `truncation_side`, BOS included);
        `padding` True/"longest" pads to the longest row, "max_length" to `max_length`, False
        not at all, with the pad id on `padding_side` (default `self.padding_side`, "left").
        `return_tensors`: "np", "pt" (torch), "jax" or "tf"; None gives numpy arrays [B, T]
        when padded (even for one text: unlike transformers' lists) and transformers' lists
        when not (a flat list for one text)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            raise InputError("texts: expected at least one text")
        padding, truncate = _padding_strategy(padding), _truncation(truncation)
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise InputError(f"padding_side: expected 'left' or 'right', got {side!r}")
        if return_tensors is not None and return_tensors not in TENSOR_TYPES:
            raise InputError(f"return_tensors: unknown value {return_tensors!r} "
                             f"(known: {', '.join(TENSOR_TYPES)})")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise InputError(f"max_length: expected a positive integer, got {max_length!r}")
        if padding == "max_length" and max_length is None:
            raise InputError("padding='max_length' needs max_length")
        rows = [self.encode(t, add_special_tokens) for t in batch]
        if truncate and max_length is not None:  # no limit otherwise: the model's is ~1e30
            left = self.truncation_side == "left"
            rows = [r[max(0, len(r) - max_length):] if left else r[:max_length] for r in rows]
        if not padding:
            masks = [[1] * len(r) for r in rows]
            if return_tensors is None:
                if isinstance(texts, str):
                    return BatchEncoding(rows[0], masks[0])
                return BatchEncoding(rows, masks)
            if len({len(r) for r in rows}) > 1:
                raise InputError("return_tensors: rows of different lengths need padding=True")
            return BatchEncoding(_tensor(rows, return_tensors), _tensor(masks, return_tensors))
        width = max(len(r) for r in rows)
        if padding == "max_length":
            if width > max_length:  # type: ignore[operator]
                raise InputError(f"max_length: a row of {width} tokens is longer than {max_length}; "
                                 "pass truncation=True to cut it")
            width = int(max_length)  # type: ignore[arg-type]
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        ids = np.full((len(rows), width), self.pad_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            if row:
                at = slice(width - len(row), width) if side == "left" else slice(0, len(row))
                ids[i, at] = row
                mask[i, at] = 1
        return BatchEncoding(_tensor(ids, return_tensors), _tensor(mask, return_tensors))

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """`decode` of each row of `sequences` (a [B, T] array or tensor, or id lists)."""
        rows = _host(sequences)
        if isinstance(rows, np.ndarray) and rows.ndim != 2:
            raise InputError(f"sequences: expected [batch, length] ids, got shape {rows.shape}")
        return [self.decode(row, skip_special_tokens) for row in rows]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; control tokens are written as their strings unless skipped."""
        out: list[str] = []
        run: list[int] = []
        for token in (int(i) for i in np.asarray(_host(ids)).reshape(-1)):
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


def _padding_strategy(padding: bool | str) -> bool | str:
    """`padding` as False, "longest" or "max_length" (transformers' spellings accepted)."""
    if padding not in PADDING:
        raise InputError(f"padding: unknown value {padding!r} (known: True, False, 'longest', "
                         "'max_length', 'do_not_pad')")
    if padding in (False, "do_not_pad"):
        return False
    return "max_length" if padding == "max_length" else "longest"


def _truncation(truncation: bool | str) -> bool:
    """`truncation` as a flag: True or transformers' single-sequence strategies, or False."""
    known = (True, False, "longest_first", "only_first", "do_not_truncate")
    if truncation not in known:
        raise InputError(f"truncation: unknown value {truncation!r} (known: {', '.join(map(repr, known))})")
    return truncation not in (False, "do_not_truncate")


def _tensor(x: Any, kind: str | None) -> Any:
    """Integer rows as numpy (`kind` None or "np") or the framework's tensor, imported only here."""
    x = np.asarray(x, np.int64)
    if kind in (None, "np"):
        return x
    if kind == "pt":
        import torch

        return torch.from_numpy(x)
    if kind == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x)  # int32 unless jax runs with x64, as jax's own arrays
    import tensorflow as tf

    return tf.constant(x)


def _host(ids: Any) -> Any:
    """Token ids as numpy or lists: a framework tensor (on any device) copied to the host."""
    if isinstance(ids, (np.ndarray, list, tuple)) or not hasattr(ids, "__array__"):
        return ids
    try:
        return np.asarray(ids)
    except (TypeError, RuntimeError):  # a torch tensor on an accelerator
        return np.asarray(ids.cpu())


def _special_pieces(proto: bytes) -> dict[str, int]:
    """{piece: id} of the CONTROL and UNKNOWN pieces and of Gemma's USER_DEFINED markers."""
    import importlib

    pb: Any = importlib.import_module("sentencepiece.sentencepiece_model_pb2")
    kinds = pb.ModelProto.SentencePiece
    m = pb.ModelProto()
    m.ParseFromString(proto)
    special, user = (kinds.CONTROL, kinds.UNKNOWN), kinds.USER_DEFINED
    out = {}
    for i, p in enumerate(m.pieces):  # a piece's text only where its type asks (262k pieces)
        kind = p.type
        if kind in special or (kind == user and SPECIAL_MARKERS.fullmatch(p.piece)):
            out[p.piece] = i
    return out


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
