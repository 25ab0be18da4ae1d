"""Autoregressive generation on any backend: prefill once, then one token per step from the cache.

Apart from the model on purpose (gpt-fast's `generate.py` shape): the model only maps ids to
logits; choosing tokens, stopping and streaming text live here, on host numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gemma_core.errors import InputError
from gemma_core.sampling import SamplingConfig, choose, process

if TYPE_CHECKING:
    from gemma_core.model import Model
    from gemma_core.tokenizer import GemmaTokenizer

Prompt = str | Sequence[int]
DEFAULT_MAX_NEW_TOKENS = 64  # the API's and the CLI's default


@dataclasses.dataclass
class GenerationResult:
    """Per row: the generated ids (a stopping eos included), their text, and why it stopped."""

    prompt_ids: list[list[int]]
    token_ids: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]  # "eos", "stop_string" or "length"
    cache: Any = None  # holds the prompt and every generated token but the last


@dataclasses.dataclass
class StepEvent:
    """One decode step: each row's new token (None once the row has finished) and new text."""

    step: int
    tokens: list[int | None]
    text_deltas: list[str] | None


def _encode_prompts(prompts: Prompt | Sequence[Prompt], tokenizer: GemmaTokenizer | None) -> list[list[int]]:
    batch: list[Any]
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                    and all(isinstance(t, (int, np.integer)) for t in prompts)):
        batch = [prompts]
    elif isinstance(prompts, Sequence) and prompts:
        batch = list(prompts)
    else:
        raise InputError("prompts: expected a prompt or a non-empty list of prompts")
    rows = []
    for p in batch:
        if isinstance(p, str):
            if not p:
                raise InputError("prompt: empty")
            if tokenizer is None:
                raise InputError("prompt: this model has no tokenizer; pass token ids instead of text")
            rows.append(tokenizer.encode(p))
        else:
            ids = [int(t) for t in p]
            if not ids:
                raise InputError("prompt: empty")
            rows.append(ids)
    return rows


def _bucket(n: int, smallest: int = 16) -> int:
    """The next power of two at or above `n` (at least `smallest`)."""
    return max(smallest, 1 << (n - 1).bit_length())


def _left_pad(ids: np.ndarray, mask: np.ndarray, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    extra = width - ids.shape[1]
    if extra <= 0:
        return ids, mask
    rows = len(ids)
    return (np.concatenate([np.full((rows, extra), pad_id, ids.dtype), ids], axis=1),
            np.concatenate([np.zeros((rows, extra), mask.dtype), mask], axis=1))


def _stop_cut(text: str, stops: Sequence[str]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be streamed: not a trailing partial UTF-8 character, nor a
    suffix that may still grow into a stop string."""
    end = len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


class _Rows:
    """Per-row state: generated ids, finish reasons, streamed text."""

    def __init__(self, n: int, tokenizer: GemmaTokenizer | None, stops: Sequence[str]) -> None:
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.reasons: list[str | None] = [None] * n
        self.emitted = [0] * n
        self.tokenizer, self.stops = tokenizer, stops
        self._text = [""] * n  # the text of ids[:_read], extended a few tokens at a time
        self._window = [0] * n  # ids from here on are decoded to extend it
        self._read = [0] * n

    def _decode(self, ids: Sequence[int]) -> str:
        assert self.tokenizer is not None
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, row: int) -> str:
        """The row's text so far, without a trailing partial UTF-8 character. Decoding the whole
        row every step costs O(n^2) over a generation (0.7 ms a step at 2000 tokens), so the
        last step's tokens and the new ones are decoded together, and what the new ones add to
        the old ones' text is appended (a window's first token decodes alike either way)."""
        ids, start, read = self.ids[row], self._window[row], self._read[row]
        if read < len(ids):
            before, after = self._decode(ids[start:read]), self._decode(ids[start:])
            text = (self._text[row] + after[len(before):] if after.startswith(before)
                    else self._decode(ids))  # (not seen with Gemma's tokenizers) decoded whole
            if not text.endswith("\ufffd"):  # else wait for the character's other bytes
                self._text[row] = text
                self._window[row], self._read[row] = read, len(ids)
        return self._text[row]

    def final_text(self, row: int) -> str:
        text = self._decode(self.ids[row])  # once, whole: a trailing partial character shows
        cut = _stop_cut(text, self.stops)
        return text if cut is None else text[:cut]

    def delta(self, row: int) -> str:
        if self.reasons[row] is not None:
            full = self.final_text(row)
            end = len(full)
        else:
            full = self.text(row)
            end = _safe_end(full, self.stops)
        out = full[self.emitted[row]:end]
        self.emitted[row] = max(self.emitted[row], end)
        return out


def generate_stream(model: Model, prompts: Prompt | Sequence[Prompt], *,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    sampling: SamplingConfig | None = None, seed: int | None = None,
                    eos_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                    result: list[GenerationResult] | None = None,
                    cache: Any = None, donate_cache: bool = False) -> Iterator[StepEvent]:
    """Yield a `StepEvent` per decode step; append the `GenerationResult` to `result` at the end.

    With `cache`, the prompt continues what the cache holds (multi-turn chat); the cache is left
    as it was (the prefill runs on a copy) unless `donate_cache` hands it over. The caches of
    the decode steps are this loop's own, updated in place."""
    if cache is not None:
        cache.check_usable()
    sampling = sampling or SamplingConfig()
    tokenizer = model.tokenizer
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}")
    if isinstance(stop_strings, str):
        raise InputError("stop_strings: expected a list of strings, got one string")
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise InputError(f"stop_strings: each must be a non-empty string (an empty one would stop "
                         f"at once), got {list(stop_strings)!r}")
    if stop_strings and tokenizer is None:
        raise InputError("stop_strings: need a tokenizer to decode text")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise InputError(f"seed: must be a non-negative integer, got {seed!r}")
    rows_ids = _encode_prompts(prompts, tokenizer)
    from gemma_core.cache import batch_ids

    ids, mask = batch_ids(rows_ids, model.config.pad_token_id)
    past = 0 if cache is None else cache.length
    total = past + ids.shape[1] + max_new_tokens
    limit = model.config.max_position_embeddings if cache is None else cache.max_length
    if model.static_shapes and cache is None and total <= limit:
        # compiled steps specialise on shapes: left-pad the prompt to a bucket (positions come
        # from the mask, so the logits do not change) and round the cache up, so that prompts
        # of similar lengths reuse one compiled prefill and one compiled decode step
        width = min(_bucket(ids.shape[1]), limit - max_new_tokens)
        ids, mask = _left_pad(ids, mask, width, model.config.pad_token_id)
        total = min(_bucket(width + max_new_tokens), limit)
    if cache is not None and len(rows_ids) != cache.batch_size:
        raise InputError(f"prompts: {len(rows_ids)} rows for a cache of {cache.batch_size}")
    if total > limit:
        held = f"{past} cached and " if past else ""
        raise InputError(f"prompt: {held}{ids.shape[1]} tokens plus max_new_tokens {max_new_tokens} "
                         f"exceed the {'model' if cache is None else 'cache'}'s context of {limit} tokens")
    eos = set(eos_token_ids if eos_token_ids is not None else default_eos_ids(model))
    rng = np.random.default_rng(seed)
    rows = _Rows(len(rows_ids), tokenizer, tuple(stop_strings))
    history = [list(r) for r in rows_ids]
    owned = cache is None or donate_cache
    if cache is None:
        cache = model.new_cache(len(rows_ids), total)
    out = model.forward(ids, mask, cache, last_only=True, donate_cache=owned)
    for step in range(max_new_tokens):
        scores = model.to_numpy(out.logits)[:, -1].astype(np.float32)  # [B,V]
        nxt = choose(process(scores, sampling, history), sampling, rng)
        tokens: list[int | None] = []
        for row, token in enumerate(int(t) for t in nxt):
            if rows.reasons[row] is not None:
                tokens.append(None)
                continue
            tokens.append(token)
            rows.ids[row].append(token)
            history[row].append(token)
            if token in eos:
                rows.reasons[row] = "eos"
            elif stop_strings and _stop_cut(rows.text(row), stop_strings) is not None:
                rows.reasons[row] = "stop_string"
            elif step == max_new_tokens - 1:
                rows.reasons[row] = "length"
        deltas = [rows.delta(r) for r in range(len(rows_ids))] if tokenizer is not None else None
        yield StepEvent(step, tokens, deltas)
        if all(r is not None for r in rows.reasons):
            break
        feed = np.array([[t if t is not None else model.config.pad_token_id] for t in tokens])
        out = model.forward(feed, None, out.cache, last_only=True, donate_cache=True)
    if result is not None:
        texts = [rows.final_text(r) for r in range(len(rows_ids))] if tokenizer is not None else None
        result.append(GenerationResult(rows_ids, rows.ids, texts,
                                       [r or "length" for r in rows.reasons], out.cache))


def generate(model: Model, prompts: Prompt | Sequence[Prompt], *,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             sampling: SamplingConfig | None = None, seed: int | None = None,
             eos_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
             streamer: Callable[[StepEvent], Any] | None = None, cache: Any = None,
             donate_cache: bool = False) -> GenerationResult:
    """Generate for one prompt or a batch (left-padded); `streamer` is called after every step.
    `cache` and `donate_cache` as for `generate_stream`."""
    result: list[GenerationResult] = []
    for event in generate_stream(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                 seed=seed, eos_token_ids=eos_token_ids, stop_strings=stop_strings,
                                 result=result, cache=cache, donate_cache=donate_cache):
        if streamer is not None:
            streamer(event)
    return result[0]


def default_eos_ids(model: Model) -> tuple[int, ...]:
    """The config's eos ids, plus the tokenizer's eos and end-of-turn (chat models stop there)."""
    ids = list(model.config.eos_token_ids)
    tok = model.tokenizer
    if tok is not None:
        ids.append(tok.eos_id)
        if tok.end_of_turn_id is not None:
            ids.append(tok.end_of_turn_id)
    return tuple(dict.fromkeys(ids))
