"""Logits processors beyond sampling's, stopping criteria, and log-probabilities, as transformers
has them, on host numpy.

Each processor takes the sequences so far `ids [N, T]` (the prompt as given, left pads included,
then the generated tokens, as transformers' `input_ids`) and float32 `scores [N, V]`, and returns
new scores. `apply_all` runs everything in transformers' `_get_logits_processor` order:
repetition penalty, no-repeat n-gram, bad words, min new tokens, the caller's processors, then
the sampling warpers (temperature, top-k, top-p, min-p).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gemma_core.errors import ConfigError
from gemma_core.sampling import SamplingConfig, repetition_penalty, warp

LogitsProcessor = Callable[[np.ndarray, np.ndarray], Any]  # (ids, scores) -> scores
StoppingCriterion = Callable[[np.ndarray, np.ndarray], Any]  # (ids, scores) -> bool or [N] bools


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessorConfig:
    """The processors and stopping criteria of one generation, besides `SamplingConfig`'s."""

    min_new_tokens: int | None = None
    no_repeat_ngram_size: int | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    logits_processor: tuple[LogitsProcessor, ...] = ()
    stopping_criteria: tuple[StoppingCriterion, ...] = ()

    def __post_init__(self) -> None:
        for name in ("min_new_tokens", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 0):
                raise ConfigError(f"{name}: must be a non-negative integer, got {value!r}")
        words = self.bad_words_ids
        if words is not None and (not words or any(
                not w or any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0 for t in w)
                for w in words)):
            raise ConfigError(f"bad_words_ids: expected a non-empty list of non-empty token id lists, "
                              f"got {words!r}")
        for name in ("logits_processor", "stopping_criteria"):
            if any(not callable(f) for f in getattr(self, name)):
                raise ConfigError(f"{name}: expected a list of callables (ids, scores)")


def processor_config(*, min_new_tokens: int | None = None, no_repeat_ngram_size: int | None = None,
                     bad_words_ids: Sequence[Sequence[int]] | None = None,
                     logits_processor: Sequence[LogitsProcessor] | None = None,
                     stopping_criteria: Sequence[StoppingCriterion] | None = None) -> ProcessorConfig:
    """A `ProcessorConfig` from user arguments (lists accepted)."""
    if callable(logits_processor) or callable(stopping_criteria):
        raise ConfigError("logits_processor/stopping_criteria: expected a list of callables, got one")
    if bad_words_ids is not None and (isinstance(bad_words_ids, (str, bytes))
                                      or any(isinstance(w, (int, np.integer, str)) for w in bad_words_ids)):
        raise ConfigError(f"bad_words_ids: expected a list of token id lists, got {bad_words_ids!r}")
    words = None if bad_words_ids is None else tuple(tuple(w) for w in bad_words_ids)
    return ProcessorConfig(min_new_tokens=min_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size,
                           bad_words_ids=words, logits_processor=tuple(logits_processor or ()),
                           stopping_criteria=tuple(stopping_criteria or ()))


def no_repeat_ngram(ids: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """Ban every token that would complete an n-gram already in the row (the prompt counts)."""
    t = ids.shape[1]
    if n == 0 or t < n:
        return scores
    out = scores.copy()
    windows = np.lib.stride_tricks.sliding_window_view(ids, n, axis=1)  # [N, T-n+1, n]
    prefix = ids[:, t + 1 - n:]  # [N, n-1]: the suffix the next token would extend
    matches = (windows[:, :, :-1] == prefix[:, None]).all(-1)  # [N, T-n+1]
    rows, cols = np.nonzero(matches)
    tokens = windows[rows, cols, -1]
    keep = tokens < out.shape[1]  # ids past the head's width cannot be generated anyway
    out[rows[keep], tokens[keep]] = -np.inf
    return out


def bad_words(ids: np.ndarray, scores: np.ndarray, words: Sequence[Sequence[int]],
              eos: Sequence[int]) -> np.ndarray:
    """Ban each word's last token where the row ends with the rest of it (one-token words
    always); a word that is just an eos token is ignored, as transformers does."""
    vocab = scores.shape[1]
    bad = [t for w in words for t in w if t >= vocab]
    if bad:
        raise ConfigError(f"bad_words_ids: token ids {bad} are outside the vocabulary of {vocab}")
    out = scores.copy()
    eos_words = {(int(e),) for e in eos}
    for word in dict.fromkeys(tuple(int(t) for t in w) for w in words):
        if word in eos_words:
            continue
        head = np.asarray(word[:-1], ids.dtype)
        if len(head) > ids.shape[1]:
            continue
        hit = (ids[:, ids.shape[1] - len(head):] == head).all(-1) if len(head) else np.ones(len(ids), bool)
        out[hit, word[-1]] = -np.inf
    return out


def min_new_tokens(scores: np.ndarray, generated: int, minimum: int, eos: Sequence[int]) -> np.ndarray:
    """The eos tokens banned while fewer than `minimum` tokens have been generated."""
    if generated >= minimum or not eos:
        return scores
    out = scores.copy()
    out[:, [e for e in eos if e < scores.shape[1]]] = -np.inf
    return out


def _history(ids: np.ndarray, pads: np.ndarray) -> list[list[int]]:
    return [row[p:].tolist() for row, p in zip(ids, pads, strict=True)]


def apply_all(ids: np.ndarray, scores: np.ndarray, pads: np.ndarray, generated: int,
              sampling: SamplingConfig, procs: ProcessorConfig, eos: Sequence[int]) -> np.ndarray:
    """Every processor, in transformers' order, on float32 `scores [N, V]`. `pads [N]`: each
    row's left pads (skipped by the repetition penalty, as transformers' `prompt_ignore_length`);
    `generated`: tokens generated so far."""
    scores = np.asarray(scores, np.float32)
    if sampling.repetition_penalty is not None and sampling.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, _history(ids, pads), sampling.repetition_penalty)
    if procs.no_repeat_ngram_size:
        scores = no_repeat_ngram(ids, scores, procs.no_repeat_ngram_size)
    if procs.bad_words_ids:
        scores = bad_words(ids, scores, procs.bad_words_ids, eos)
    if procs.min_new_tokens:
        scores = min_new_tokens(scores, generated, procs.min_new_tokens, list(eos))
    for fn in procs.logits_processor:
        new = np.asarray(fn(ids.copy(), scores.copy()), np.float32)
        if new.shape != scores.shape:
            raise ConfigError(f"logits_processor: {fn!r} returned shape {new.shape}, expected {scores.shape}")
        scores = new
    return warp(scores, sampling)


def plain_greedy(sampling: SamplingConfig, procs: ProcessorConfig) -> bool:
    """Whether the next token is the raw logits' argmax: greedy, and no processor or stopping
    criterion that reads the scores (so the device can reduce them: `Model.greedy_tokens`)."""
    return (not sampling.do_sample and sampling.repetition_penalty in (None, 1.0)
            and not procs.no_repeat_ngram_size and not procs.bad_words_ids and not procs.min_new_tokens
            and not procs.logits_processor and not procs.stopping_criteria)


def stopped(procs: ProcessorConfig, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per row: whether any stopping criterion holds for `ids [N, T]` (its last token new)."""
    done = np.zeros(len(ids), bool)
    for fn in procs.stopping_criteria:
        hit = np.asarray(fn(ids.copy(), scores), bool)
        if hit.ndim > 1 or (hit.ndim == 1 and len(hit) != len(ids)):
            raise ConfigError(f"stopping_criteria: {fn!r} returned shape {hit.shape}, expected a bool "
                              f"or {len(ids)} bools")
        done |= hit
    return done


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """Log-probabilities of float32 `scores [N, V]` (-inf scores stay -inf)."""
    scores = np.asarray(scores, np.float32)
    top = scores.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    z = scores - top
    with np.errstate(divide="ignore"):
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def top_entries(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best `(ids [N, k], logprobs [N, k])` of each row, best first (ties: lower id)."""
    k = min(k, logprobs.shape[-1])
    part = np.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(logprobs, part, axis=-1)
    order = np.lexsort((part, -vals), axis=-1)
    ids = np.take_along_axis(part, order, axis=-1)
    return ids, np.take_along_axis(logprobs, ids, axis=-1)
