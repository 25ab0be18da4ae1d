"""Training data for `gemma finetune`: examples read from a file, then batches of a fixed shape
in an order fixed by the seed, resumable from a step.

Files:
- `.txt`: documents separated by blank lines; every token is trained on.
- `.jsonl`: one object a line, one of
  - `{"text": ...}`: a document, every token trained on;
  - `{"messages": [{"role", "content"}, ...]}`: a chat in the model's Gemma chat format, trained
    on the model's turns only (each reply and its `<end_of_turn>`), as TRL's assistant-only loss;
  - `{"prompt": ..., "completion": ...}`: trained on the completion only.
A document is `<bos>` + its tokens + `<eos>`; a chat starts with `<bos>` as its template does.

Batches are `(ids, mask, labels)` `[B, T]`: `labels` are the ids where a token is trained on and
-100 elsewhere (the loss shifts them: the logit at t - 1 predicts the label at t). Padding puts
one example a row, truncated to T and padded on the right; packing concatenates the examples (in
the epoch's order) into one stream cut into rows of T, each row attending across the documents it
holds (as TRL's packing without per-document positions). Epoch `e` visits the examples in the
order `numpy.random.default_rng(seed + e).permutation`, so step `k` of a run is the same batch
every time: a run resumed at step `k` (`Batches.from_step`) continues exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from gemma_core.errors import InputError
from gemma_core.tokenizer import render_chat

IGNORE_INDEX = -100  # labels the loss skips, as transformers


@dataclasses.dataclass(frozen=True)
class Example:
    """Token ids and, per token, whether the loss trains on it."""

    ids: tuple[int, ...]
    targets: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.targets):
            raise ValueError("ids and targets differ in length")


def _segments(tokenizer: Any, parts: Sequence[tuple[str, bool]], bos: bool, eos: bool) -> Example:
    """An example from text parts, each tokenized on its own and marked trained on or not."""
    ids: list[int] = [tokenizer.bos_id] if bos else []
    targets: list[bool] = [False] if bos else []
    for text, target in parts:
        piece = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids += piece
        targets += [target] * len(piece)
    if eos:
        ids.append(tokenizer.eos_id)
        targets.append(True)
    return Example(tuple(ids), tuple(targets))


def chat_example(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> Example:
    """A chat rendered in the tokenizer's Gemma format, trained on the model's turns: each turn
    (its header, its content, `<end_of_turn>`) tokenized on its own, so that a reply's tokens
    are the same whatever came before it."""
    rendered = render_chat(messages, tokenizer.chat_format, False, bos="")  # validates roles
    turns = rendered.split("<start_of_turn>")[1:]
    parts: list[tuple[str, bool]] = []
    for turn in turns:
        role, _, rest = turn.partition("\n")
        content = rest.removesuffix("<end_of_turn>\n")
        model = role == "model"
        parts += [(f"<start_of_turn>{role}\n", False), (content + "<end_of_turn>", model), ("\n", False)]
    return _segments(tokenizer, parts, bos=True, eos=False)


def _example(tokenizer: Any, record: Any, where: str) -> Example:
    if not isinstance(record, Mapping):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if "messages" in keys:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        try:
            return chat_example(tokenizer, messages)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    if "text" in keys:
        if not isinstance(record["text"], str):
            raise InputError(f"{where}: 'text' must be a string")
        return _segments(tokenizer, [(record["text"], True)], bos=True, eos=True)
    if {"prompt", "completion"} <= keys:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise InputError(f"{where}: 'prompt' and 'completion' must be strings")
        return _segments(tokenizer, [(prompt, False), (completion, True)], bos=True, eos=True)
    raise InputError(f"{where}: expected a 'text', 'messages' or 'prompt'/'completion' field, "
                     f"got {sorted(keys)}")


def read_examples(path: str | os.PathLike[str], tokenizer: Any) -> list[Example]:
    """The examples of a `.txt` or `.jsonl` file (see the module text); a malformed line is an
    `InputError` naming the file and line."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"data: cannot read {name}: {e}") from None
    if name.endswith(".jsonl"):
        out = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{name}:{number}: not JSON: {e.msg}") from None
            out.append(_example(tokenizer, record, f"{name}:{number}"))
    elif name.endswith(".txt"):
        docs = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n")]
        out = [_segments(tokenizer, [(d, True)], bos=True, eos=True) for d in docs if d]
    else:
        raise InputError(f"data: {name}: expected a .jsonl or .txt file")
    if not any(any(e.targets) for e in out):
        raise InputError(f"data: {name} holds no token to train on")
    return out


@dataclasses.dataclass(frozen=True)
class Batch:
    """One step's `ids`, `mask` (True for real tokens) and `labels` (-100: not trained on), `[B, T]`."""

    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray

    @property
    def tokens(self) -> int:
        """Real tokens in the batch."""
        return int(self.mask.sum())


def _rows(examples: Sequence[Example], order: np.ndarray, seq_len: int, pack: bool,
          pad_id: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One epoch's rows `(ids, mask, labels)` of `seq_len`, in `order`."""
    rows = []
    if pack:
        ids = np.concatenate([np.asarray(examples[i].ids, np.int64) for i in order])
        targets = np.concatenate([np.asarray(examples[i].targets, bool) for i in order])
        for start in range(0, len(ids) - seq_len + 1, seq_len):  # the tail shorter than a row is dropped
            chunk, use = ids[start:start + seq_len], targets[start:start + seq_len]
            rows.append((chunk, np.ones(seq_len, bool), np.where(use, chunk, IGNORE_INDEX)))
        return rows
    for i in order:
        ex = examples[i]
        n = min(len(ex.ids), seq_len)
        ids = np.full(seq_len, pad_id, np.int64)
        ids[:n] = ex.ids[:n]
        mask = np.arange(seq_len) < n
        use = np.zeros(seq_len, bool)
        use[:n] = ex.targets[:n]
        rows.append((ids, mask, np.where(use, ids, IGNORE_INDEX)))
    return rows


class Batches:
    """Batches of `batch_size` rows of `seq_len` tokens for `epochs` epochs, the same sequence for
    the same seed; `from_step(k)` starts at step k (a resumed run). A last partial batch of an
    epoch is dropped, so every step has the same shape (one compiled step)."""

    def __init__(self, examples: Sequence[Example], *, batch_size: int, seq_len: int, epochs: int = 1,
                 pack: bool = True, seed: int = 0, pad_id: int = 0) -> None:
        if batch_size < 1 or seq_len < 2 or epochs < 1:
            raise InputError("data: batch_size >= 1, seq_len >= 2 and epochs >= 1 are needed")
        self.examples, self.batch_size, self.seq_len = list(examples), batch_size, seq_len
        self.epochs, self.pack, self.seed, self.pad_id = epochs, pack, seed, pad_id
        self.start = 0
        rows = len(self._epoch_rows(0))
        self.steps_per_epoch = rows // batch_size
        if self.steps_per_epoch == 0:
            raise InputError(f"data: {rows} rows of {seq_len} tokens make no batch of {batch_size}; "
                             "use a smaller batch size or sequence length, or more data")

    def _epoch_rows(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.examples))
        return _rows(self.examples, order, self.seq_len, self.pack, self.pad_id)

    def __len__(self) -> int:
        """Steps in the whole run (every epoch)."""
        return self.steps_per_epoch * self.epochs

    def from_step(self, step: int) -> Batches:
        """The same batches, starting at `step` (0-based)."""
        if not 0 <= step <= len(self):
            raise InputError(f"data: step {step} is outside the run's {len(self)} steps")
        other = copy.copy(self)
        other.start = step
        return other

    def __iter__(self) -> Iterator[Batch]:
        first_epoch = self.start // self.steps_per_epoch
        for epoch in range(first_epoch, self.epochs):
            rows = self._epoch_rows(epoch)
            for k in range(self.steps_per_epoch):
                if epoch * self.steps_per_epoch + k < self.start:
                    continue
                chunk = rows[k * self.batch_size:(k + 1) * self.batch_size]
                ids, mask, labels = (np.stack(col) for col in zip(*chunk, strict=True))
                yield Batch(ids, mask, labels)
