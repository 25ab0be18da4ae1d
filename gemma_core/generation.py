"""Autoregressive generation on any backend: prefill once, then one token per step from the cache.

Apart from the model on purpose (gpt-fast's `generate.py` shape): the model only maps ids to
logits; choosing tokens, stopping and streaming text live here, on host numpy (processors and
stopping criteria in `gemma_core.processors`, beam search in `gemma_core.beam`, what both share
in `gemma_core.decoding`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gemma_core.beam import beam_search
from gemma_core.decoding import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerationResult,
    Prompt,
    check_stop_strings,
    check_top_logprobs,
    default_eos_ids,
    pairs,
    plan_cache,
    prepare_inputs,
    stop_cut,
)
from gemma_core.errors import InputError
from gemma_core.processors import (
    ProcessorConfig,
    apply_all,
    log_softmax,
    plain_greedy,
    stopped,
    top_entries,
)
from gemma_core.sampling import SamplingConfig, choose

if TYPE_CHECKING:
    from gemma_core.model import Model
    from gemma_core.tokenizer import GemmaTokenizer

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "GenerationResult", "StepEvent", "default_eos_ids", "generate",
           "generate_stream"]


@dataclasses.dataclass
class StepEvent:
    """One decode step: each row's new token (None once the row has finished) and new text."""

    step: int
    tokens: list[int | None]
    text_deltas: list[str] | None


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


class RowState:
    """Per-row state of a generation: generated ids, finish reasons, streamed text and stop
    strings (shared by `generate`, speculative decoding and the serving engine)."""

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
        cut = stop_cut(text, self.stops)
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


def generate_stream(model: Model, prompts: Prompt | Sequence[Prompt] | None = None, *,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    sampling: SamplingConfig | None = None, seed: int | None = None,
                    eos_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                    result: list[GenerationResult] | None = None,
                    cache: Any = None, donate_cache: bool = False, input_ids: Any = None,
                    attention_mask: Any = None, processors: ProcessorConfig | None = None,
                    output_scores: bool = False, top_logprobs: int = 0) -> Iterator[StepEvent]:
    """Yield a `StepEvent` per decode step; append the `GenerationResult` to `result` at the end.

    The prompt: `prompts`, or transformers-style `input_ids`/`attention_mask` (`prepare_inputs`).
    With `cache`, the prompt continues what the cache holds (multi-turn chat); the cache is left
    as it was (the prefill runs on a copy) unless `donate_cache` hands it over. The caches of
    the decode steps are this loop's own, updated in place. `processors` and the stopping
    criteria see the prompt as given (left pads included) and the tokens generated, with the
    pad id appended to rows that have finished, as transformers' `input_ids`."""
    if cache is not None:
        cache.check_usable()
    sampling = sampling or SamplingConfig()
    procs = processors or ProcessorConfig()
    tokenizer = model.tokenizer
    check_top_logprobs(top_logprobs, model.config.vocab_size)
    check_stop_strings(model, stop_strings)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise InputError(f"seed: must be a non-negative integer, got {seed!r}")
    rows_ids, ids, mask = prepare_inputs(model, prompts, input_ids, attention_mask)
    seq, pads = ids.copy(), (mask == 0).sum(axis=1)  # what processors see, as transformers' input_ids
    ids, mask, total = plan_cache(model, ids, mask, max_new_tokens, cache)
    eos_list = list(eos_token_ids if eos_token_ids is not None else default_eos_ids(model))
    eos = set(eos_list)
    rng = np.random.default_rng(seed)
    rows = RowState(len(rows_ids), tokenizer, tuple(stop_strings))
    logprobs: list[list[float]] = [[] for _ in rows_ids]
    tops: list[list[list[tuple[int, float]]]] = [[] for _ in rows_ids]
    owned = cache is None or donate_cache
    if cache is None:
        cache = model.new_cache(len(rows_ids), total)
    out = model.forward(ids, mask, cache, last_only=True, donate_cache=owned)
    on_device = plain_greedy(sampling, procs) and not output_scores
    for step in range(max_new_tokens):
        if on_device:  # B ids to the host, not B x V floats
            scores, nxt = None, model.greedy_tokens(out.logits)
        else:
            logits = model.to_numpy(out.logits)[:, -1].astype(np.float32)  # [B,V]
            scores = apply_all(seq, logits, pads, step, sampling, procs, eos_list)
            nxt = choose(scores, sampling, rng)
        seq = np.concatenate([seq, np.where([r is None for r in rows.reasons], nxt,
                                            model.config.pad_token_id)[:, None]], axis=1)
        hits = stopped(procs, seq, scores) if scores is not None and procs.stopping_criteria else None
        lp = log_softmax(scores) if scores is not None and output_scores else None
        top = top_entries(lp, top_logprobs) if lp is not None and top_logprobs else None
        tokens: list[int | None] = []
        for row, token in enumerate(int(t) for t in nxt):
            if rows.reasons[row] is not None:
                tokens.append(None)
                continue
            tokens.append(token)
            rows.ids[row].append(token)
            if lp is not None:
                logprobs[row].append(float(lp[row, token]))
                if top is not None:
                    tops[row].append(pairs(top[0][row], top[1][row]))
            if token in eos:
                rows.reasons[row] = "eos"
            elif hits is not None and hits[row]:
                rows.reasons[row] = "stopping_criteria"
            elif stop_strings and stop_cut(rows.text(row), stop_strings) is not None:
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
        result.append(GenerationResult(rows_ids, rows.ids, texts, [r or "length" for r in rows.reasons],
                                       out.cache, logprobs if output_scores else None,
                                       tops if output_scores else None))


def generate(model: Model, prompts: Prompt | Sequence[Prompt] | None = None, *,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             sampling: SamplingConfig | None = None, seed: int | None = None,
             eos_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
             streamer: Callable[[StepEvent], Any] | None = None, cache: Any = None,
             donate_cache: bool = False, input_ids: Any = None, attention_mask: Any = None,
             processors: ProcessorConfig | None = None, output_scores: bool = False,
             top_logprobs: int = 0, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, num_return_sequences: int = 1) -> GenerationResult:
    """Generate for one prompt or a batch (left-padded); `streamer` is called after every step.
    The other arguments as for `generate_stream`. `num_beams > 1` runs beam search
    (`gemma_core.beam.beam_search`: `length_penalty`, `early_stopping`, `num_return_sequences`,
    no streaming); otherwise `num_return_sequences` must be 1."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise InputError(f"num_beams: must be a positive integer, got {num_beams!r}")
    if num_beams > 1:
        if streamer is not None:
            raise InputError("streamer: beam search keeps several hypotheses until the end; "
                             "it cannot stream (use num_beams=1)")
        return beam_search(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                           eos_token_ids=eos_token_ids, stop_strings=stop_strings, cache=cache,
                           donate_cache=donate_cache, input_ids=input_ids, attention_mask=attention_mask,
                           processors=processors, output_scores=output_scores, top_logprobs=top_logprobs,
                           num_beams=int(num_beams), length_penalty=length_penalty,
                           early_stopping=early_stopping, num_return_sequences=num_return_sequences)
    if num_return_sequences != 1:
        raise InputError(f"num_return_sequences: {num_return_sequences!r} needs beam search "
                         "(num_beams >= num_return_sequences); greedy and sampling return one per prompt")
    result: list[GenerationResult] = []
    for event in generate_stream(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                 seed=seed, eos_token_ids=eos_token_ids, stop_strings=stop_strings,
                                 result=result, cache=cache, donate_cache=donate_cache,
                                 input_ids=input_ids, attention_mask=attention_mask,
                                 processors=processors, output_scores=output_scores,
                                 top_logprobs=top_logprobs):
        if streamer is not None:
            streamer(event)
    return result[0]
