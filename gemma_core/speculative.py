"""Greedy speculative decoding, as transformers' assisted generation: `generate(...,
prompt_lookup_num_tokens=k)` and `generate(..., assistant_model=draft)`.

Each round a candidate source proposes up to k tokens: n-gram prompt lookup over the prompt and
the generated ids (transformers' `PromptLookupCandidateGenerator`: the last
`max_matching_ngram_size` (default 2), then shorter, n-grams, first match from the left, the
candidate cut before an eos), or a draft `Model` with the same vocabulary decoding greedily
with its own cache (`num_assistant_tokens`, default 20, transformers' constant schedule; a
draft token below `assistant_confidence_threshold` probability, default 0.4, ends the draft).
The target verifies them in ONE forward of the pending token(s) plus the candidates, keeps the
longest prefix equal to its own choice at each position, appends its own next token, and crops
its cache (and the draft's) back to what was accepted. Each kept token is the token plain
greedy decoding would choose there (the same processors, stopping and streaming, one
`StepEvent` per token), so the ids equal `gemma_core.generation`'s greedy ones.

A sliding-window layer's cache is a ring (`gemma_core.cache`): once a chunk would wrap it, a
crop can no longer restore the overwritten window, so such a chunk runs on a copy of the cache
(`forward` without `donate_cache`) and a rejection returns to the cache from before the chunk,
the accepted tokens then fed with the next chunk. Batch size 1 only, as transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gemma_core.cache import KVCache, layer_capacity
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
from gemma_core.generation import RowState, StepEvent
from gemma_core.processors import ProcessorConfig, apply_all, log_softmax, stopped, top_entries
from gemma_core.sampling import SamplingConfig, choose

if TYPE_CHECKING:
    from gemma_core.model import Model

__all__ = ["DEFAULT_CONFIDENCE", "DEFAULT_NGRAM", "DEFAULT_NUM_ASSISTANT_TOKENS", "prompt_lookup",
           "speculative_generate", "speculative_stream"]

DEFAULT_NGRAM = 2  # transformers' max_matching_ngram_size
DEFAULT_NUM_ASSISTANT_TOKENS = 20  # transformers' GenerationConfig default (schedule "constant")
DEFAULT_CONFIDENCE = 0.4  # transformers' assistant_confidence_threshold default


def prompt_lookup(ids: Sequence[int], num_tokens: int, max_ngram: int = DEFAULT_NGRAM,
                  eos: Sequence[int] = ()) -> list[int]:
    """transformers' prompt-lookup candidates for the sequence `ids`: for n from `max_ngram`
    down to 1, the first earlier occurrence (from the left) of the last n ids that has a
    continuation gives up to `num_tokens` of it, cut before its first eos; [] if none."""
    seq = np.asarray(ids, np.int64)
    length = len(seq)
    for n in range(min(max_ngram, length - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq, n)
        for idx in np.flatnonzero((windows == seq[-n:]).all(axis=1)):
            start = int(idx) + n
            end = min(start + num_tokens, length)
            if start < end:
                chosen = seq[start:end].tolist()
                cut = next((i for i, t in enumerate(chosen) if t in eos), len(chosen))
                return chosen[:cut]  # transformers stops at the first match even if now empty
    return []


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name}: must be a positive integer, got {value!r}")
    return int(value)


def _min_capacity(model: Model, cache: KVCache) -> int:
    """The fewest slots any layer holds: past this length a chunk wraps a sliding ring."""
    return min(layer_capacity(model.config, i, cache.max_length) for i in range(model.config.num_layers))


class _Draft:
    """A draft model proposing tokens greedily from its own cache, which holds `seq[:done]`."""

    def __init__(self, draft: Model, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int) -> None:
        self.model = draft
        ids, mask, total = plan_cache(draft, ids, mask, max_new_tokens, None)
        self.offset = int((mask == 0).sum())  # left pads in its cache (its own bucket)
        out = draft.forward(ids, mask, draft.new_cache(1, total), last_only=True, donate_cache=True)
        self.cache, self.done = out.cache, int(mask.sum())
        self.base: int | None = None  # len(seq) at the last propose, until accepted
        self.before: tuple[KVCache, int] | None = None

    def propose(self, seq: list[int], limit: int, threshold: float | None,
                scores_of: Callable[[list[int], np.ndarray], np.ndarray], eos: set[int]) -> list[int]:
        """Up to `limit` tokens after `seq`; the cache then holds `seq` and all but the last."""
        model, cache = self.model, self.cache
        # the pending tokens in one call, then one call per candidate but the last
        wraps = cache.length + len(seq) - self.done + limit - 1 > _min_capacity(model, cache)
        self.before = (model.copy_cache(cache), self.done) if wraps else None
        feed, cands = seq[self.done:], []
        while True:
            out = model.forward(np.array([feed]), None, cache, last_only=True, donate_cache=True)
            cache = out.cache
            scores = scores_of(cands, model.to_numpy(out.logits)[:, -1].astype(np.float32))
            token = int(choose(scores, SamplingConfig(), None)[0])
            cands.append(token)
            if len(cands) == limit or token in eos:
                break
            if threshold and float(np.exp(log_softmax(scores)[0, token])) < threshold:
                break  # transformers' ConfidenceCriteria: a doubtful draft ends the round
            feed = [token]
        self.cache, self.base, self.done = cache, len(seq), len(seq) + len(cands) - 1
        return cands

    def accept(self, kept: int) -> None:
        """Keep, of what `propose` fed, `seq` and the first `kept` candidates."""
        if self.base is None:
            return
        keep, self.base = min(self.base + kept, self.done), None
        if keep == self.done:
            return
        if self.before is not None:  # a wrapped ring cannot be cropped: back to before the draft
            self.cache, self.done = self.before
        else:
            self.cache = self.model.crop_cache(self.cache, self.offset + keep, donate_cache=True)
            self.done = keep
        self.before = None


def check_speculative(model: Model, *, prompt_lookup_num_tokens: int | None,
                      max_matching_ngram_size: int | None, assistant_model: Any,
                      num_assistant_tokens: int | None, assistant_confidence_threshold: float | None,
                      sampling: SamplingConfig,
                      num_beams: int = 1, num_return_sequences: int = 1, cache: Any = None) -> None:
    """Refuse what speculative decoding here does not combine with, with the reason."""
    if prompt_lookup_num_tokens is not None and assistant_model is not None:
        raise InputError("prompt_lookup_num_tokens: given with assistant_model; candidates come "
                         "from one source, the prompt (n-gram lookup) or a draft model")
    if prompt_lookup_num_tokens is not None:
        _positive("prompt_lookup_num_tokens", prompt_lookup_num_tokens)
        if max_matching_ngram_size is not None:
            _positive("max_matching_ngram_size", max_matching_ngram_size)
        for name, value in (("num_assistant_tokens", num_assistant_tokens),
                            ("assistant_confidence_threshold", assistant_confidence_threshold)):
            if value is not None:
                raise InputError(f"{name}: applies to assistant_model; prompt lookup proposes "
                                 "prompt_lookup_num_tokens tokens")
    else:
        if max_matching_ngram_size is not None:
            raise InputError("max_matching_ngram_size: applies to prompt_lookup_num_tokens")
        # the model's own class (an import of gemma_core.model here would be a cycle)
        if not isinstance(assistant_model, type(model)) or assistant_model.task != "causal-lm":
            raise InputError(f"assistant_model: expected a causal-lm gemma_core Model, got "
                             f"{type(assistant_model).__name__}")
        if assistant_model.config.vocab_size != model.config.vocab_size:
            raise InputError(f"assistant_model: its vocabulary has {assistant_model.config.vocab_size} "
                             f"tokens, the model's {model.config.vocab_size}; a draft must share the "
                             "target's vocabulary (tokenizer)")
        if num_assistant_tokens is not None:
            _positive("num_assistant_tokens", num_assistant_tokens)
        t = assistant_confidence_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1):
            raise InputError(f"assistant_confidence_threshold: must be in [0, 1], got {t!r}")
    if sampling.do_sample:
        raise InputError("do_sample: speculative decoding here is greedy only (its output equals "
                         "greedy decoding); drop the sampling arguments or the speculation")
    if num_beams != 1 or num_return_sequences != 1:
        raise InputError("num_beams: speculative decoding is greedy, one sequence; it does not "
                         "combine with beam search or num_return_sequences")
    if cache is not None:
        raise InputError("cache: speculative decoding starts from the prompt; it does not continue a cache")


def speculative_stream(model: Model, prompts: Prompt | Sequence[Prompt] | None = None, *,
                       max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                       eos_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                       result: list[GenerationResult] | None = None, input_ids: Any = None,
                       attention_mask: Any = None, sampling: SamplingConfig | None = None,
                       processors: ProcessorConfig | None = None, output_scores: bool = False,
                       top_logprobs: int = 0, prompt_lookup_num_tokens: int | None = None,
                       max_matching_ngram_size: int | None = None, assistant_model: Model | None = None,
                       num_assistant_tokens: int | None = None,
                       assistant_confidence_threshold: float | None = None) -> Iterator[StepEvent]:
    """Yield a `StepEvent` per generated token, as `generation.generate_stream` (one prompt);
    append the `GenerationResult`, with its `acceptance_rate`, to `result` at the end."""
    sampling = sampling or SamplingConfig()
    procs = processors or ProcessorConfig()
    check_speculative(model, prompt_lookup_num_tokens=prompt_lookup_num_tokens,
                      max_matching_ngram_size=max_matching_ngram_size, assistant_model=assistant_model,
                      num_assistant_tokens=num_assistant_tokens,
                      assistant_confidence_threshold=assistant_confidence_threshold, sampling=sampling)
    check_top_logprobs(top_logprobs, model.config.vocab_size)
    check_stop_strings(model, stop_strings)
    rows_ids, ids, mask = prepare_inputs(model, prompts, input_ids, attention_mask)
    if len(rows_ids) != 1:
        raise InputError(f"prompts: speculative decoding takes one prompt (batch size 1, as "
                         f"transformers' assisted generation), got {len(rows_ids)}")
    history, pads = [int(t) for t in ids[0]], (mask == 0).sum(axis=1)  # what processors see
    padded, pmask, total = plan_cache(model, ids, mask, max_new_tokens, None)
    offset = int((pmask == 0).sum())  # left pads the target's cache holds before the prompt
    eos_list = list(eos_token_ids if eos_token_ids is not None else default_eos_ids(model))
    eos = set(eos_list)
    lookup = prompt_lookup_num_tokens is not None
    k = int(prompt_lookup_num_tokens if lookup else num_assistant_tokens or DEFAULT_NUM_ASSISTANT_TOKENS)
    ngram = int(max_matching_ngram_size or DEFAULT_NGRAM)
    threshold = assistant_confidence_threshold
    if threshold is None:
        threshold = DEFAULT_CONFIDENCE
    draft = None if assistant_model is None else _Draft(assistant_model, ids, mask, max_new_tokens)
    rows = RowState(1, model.tokenizer, tuple(stop_strings))
    gen = rows.ids[0]
    seq = list(rows_ids[0])  # the real ids: prompt, then what was generated
    logprobs: list[float] = []
    tops: list[list[tuple[int, float]]] = []
    proposed = accepted = 0

    def scores_of(extra: list[int], logits: np.ndarray) -> np.ndarray:
        """The processed scores after the history, the generated ids and `extra`."""
        hist = np.array([history + gen + extra])
        return apply_all(hist, logits, pads, len(gen) + len(extra), sampling, procs, eos_list)

    out = model.forward(padded, pmask, model.new_cache(1, total), last_only=True, donate_cache=True)
    cache, done = out.cache, len(seq)  # the target's cache holds seq[:done]
    before: tuple[KVCache, int] | None = None  # the cache from before a chunk that wraps a ring
    logits, cands = model.to_numpy(out.logits)[0, -1:].astype(np.float32), []
    finished = False
    while True:
        kept = 0
        for i in range(len(cands) + 1):
            scores = scores_of([], logits[i:i + 1])
            token = int(choose(scores, sampling, None)[0])
            matched = i < len(cands) and token == cands[i]
            accepted += matched
            gen.append(token)
            seq.append(token)
            if output_scores:
                lp = log_softmax(scores)
                logprobs.append(float(lp[0, token]))
                if top_logprobs:
                    best = top_entries(lp, top_logprobs)
                    tops.append(pairs(best[0][0], best[1][0]))
            if token in eos:
                rows.reasons[0] = "eos"
            elif procs.stopping_criteria and stopped(procs, np.array([history + gen]), scores)[0]:
                rows.reasons[0] = "stopping_criteria"
            elif stop_strings and stop_cut(rows.text(0), stop_strings) is not None:
                rows.reasons[0] = "stop_string"
            elif len(gen) == max_new_tokens:
                rows.reasons[0] = "length"
            yield StepEvent(len(gen) - 1, [token], [rows.delta(0)] if model.tokenizer is not None else None)
            if rows.reasons[0] is not None:
                finished = True
                break
            if not matched:
                break
            kept += 1
        # the cache holds seq[:done] and what was fed; keep seq[:-1] (its last token is not fed)
        cache, done = _settle(model, cache, done, before, seq, offset, refeed=finished)
        if draft is not None:
            draft.accept(kept)
        if finished:
            break
        limit = min(k, max_new_tokens - len(gen) - 1)  # the target adds one token of its own
        cands = []
        if limit > 0:
            cands = (prompt_lookup(seq, limit, ngram, eos) if lookup else
                     draft.propose(seq, limit, threshold, scores_of, eos))  # type: ignore[union-attr]
        proposed += len(cands)
        feed = seq[done:] + cands
        wraps = cache.length + len(feed) > _min_capacity(model, cache)
        before = (cache, done) if wraps else None  # kept as it was: forward runs on a copy
        out = model.forward(np.array([feed]), None, cache, last_only=not cands, donate_cache=not wraps)
        cache, done = out.cache, len(seq) + len(cands)
        logits = model.to_numpy(out.logits)[0, -(len(cands) + 1):].astype(np.float32)
    if result is not None:
        texts = [rows.final_text(0)] if model.tokenizer is not None else None
        result.append(GenerationResult(rows_ids, [gen], texts, [rows.reasons[0] or "length"], cache,
                                       [logprobs] if output_scores else None,
                                       [tops] if output_scores else None,
                                       acceptance_rate=accepted / proposed if proposed else 0.0))


def _settle(model: Model, cache: KVCache, done: int, before: tuple[KVCache, int] | None,
            seq: list[int], offset: int, *, refeed: bool) -> tuple[KVCache, int]:
    """The target's cache after a chunk, holding `seq[:done]` of the new `seq` at most
    `len(seq) - 1`: cropped there, or (a chunk that wrapped a ring) the cache from before the
    chunk, the rest pending for the next chunk, or fed now (`refeed`: the final cache)."""
    need = len(seq) - 1
    if done <= need:
        return cache, done
    if before is None:
        return model.crop_cache(cache, offset + need, donate_cache=True), need
    cache, done = before
    if refeed and done < need:
        cache = model.forward(np.array([seq[done:need]]), None, cache, last_only=True,
                              donate_cache=True).cache
        done = need
    return cache, done


def speculative_generate(model: Model, prompts: Prompt | Sequence[Prompt] | None = None, *,
                         streamer: Callable[[StepEvent], Any] | None = None,
                         **kwargs: Any) -> GenerationResult:
    """`speculative_stream` run to the end, `streamer` called with each token's event."""
    result: list[GenerationResult] = []
    for event in speculative_stream(model, prompts, result=result, **kwargs):
        if streamer is not None:
            streamer(event)
    return result[0]
