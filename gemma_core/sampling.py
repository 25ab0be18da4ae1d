"""Logits processors and sampling, in the order transformers applies them.

Order (transformers `_get_logits_processor`): repetition penalty, then the warpers temperature,
top-k, top-p, min-p, then a draw from softmax. All on host numpy float32 logits `[B, V]`.
`gemma_core.processors` adds the other processors between the penalty and the warpers.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from gemma_core.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the next token is chosen. `do_sample=False` is greedy (argmax)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ConfigError(f"temperature: must be a positive number, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"top_k: must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p: must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty is not None and not (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ConfigError(f"repetition_penalty: must be a positive finite number, got "
                              f"{self.repetition_penalty!r}")
        if not self.do_sample and (self.top_k is not None or self.top_p is not None
                                   or self.min_p is not None or self.temperature != 1.0):
            raise ConfigError("do_sample: temperature/top_k/top_p/min_p need sampling; "
                              "greedy decoding (do_sample=False) ignores them")


def sampling_config(*, do_sample: bool | None = None, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                    repetition_penalty: float | None = None) -> SamplingConfig:
    """The user-facing rule: greedy unless sampling is asked for (`do_sample=True`, or any of
    temperature > 0, top_k, top_p, min_p given); `temperature=0` means greedy."""
    wants = temperature not in (None, 0) or any(v is not None for v in (top_k, top_p, min_p))
    if do_sample is None:
        do_sample = wants
    if temperature == 0 and do_sample:
        raise ConfigError("temperature: 0 means greedy decoding, but sampling was asked for")
    return SamplingConfig(do_sample=do_sample, temperature=temperature if temperature else 1.0,
                          top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)


def repetition_penalty(scores: np.ndarray, history: list[list[int]], penalty: float) -> np.ndarray:
    """Tokens already seen: negative scores times the penalty, positive ones divided by it."""
    out = scores.copy()
    for row, seen in enumerate(history):
        idx = np.unique(np.asarray(seen, np.int64))
        s = out[row, idx]
        out[row, idx] = np.where(s < 0, s * penalty, s / penalty)
    return out


def temperature(scores: np.ndarray, t: float) -> np.ndarray:
    """Scores divided by `t`. Where 1/t overflows float32 (t about 1e-38 and below) the division
    would give inf - inf = NaN probabilities; its limit is kept instead: the best score of each
    row (ties included) at 0, every other at -inf, so sampling becomes greedy."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        out = scores / np.float32(t)
    if np.isfinite(out[np.isfinite(scores)]).all():
        return out
    best = scores.max(axis=-1, keepdims=True)
    return np.where(scores == best, np.float32(0), np.float32(-np.inf))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep the k best scores (ties with the k-th kept), the rest to -inf."""
    k = min(k, scores.shape[-1])
    kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
    return np.where(scores < kth, -np.inf, scores)


def _softmax(scores: np.ndarray) -> np.ndarray:
    z = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_p(scores: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: drop the least likely tokens whose cumulative probability is <= 1 - p; keep >= 1."""
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers sorts
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cum = np.cumsum(_softmax(sorted_scores), axis=-1)
    remove_sorted = cum <= 1 - p
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores)


def min_p(scores: np.ndarray, p: float) -> np.ndarray:
    """Drop tokens whose probability is below p times the most likely token's; keep >= 1."""
    probs = _softmax(scores)
    remove = probs < p * probs.max(axis=-1, keepdims=True)
    remove[np.arange(len(scores)), scores.argmax(-1)] = False
    return np.where(remove, -np.inf, scores)


def process(scores: np.ndarray, cfg: SamplingConfig, history: list[list[int]]) -> np.ndarray:
    """All processors of `cfg`, in transformers' order, on float32 `[B, V]` scores."""
    scores = np.asarray(scores, np.float32)
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, history, cfg.repetition_penalty)
    return warp(scores, cfg)


def warp(scores: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """The sampling warpers of `cfg` (temperature, top-k, top-p, min-p, in transformers' order);
    none for greedy decoding."""
    if not cfg.do_sample:
        return scores
    if cfg.temperature != 1.0:
        scores = temperature(scores, cfg.temperature)
    if cfg.top_k is not None:
        scores = top_k(scores, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        scores = top_p(scores, cfg.top_p)
    if cfg.min_p is not None and cfg.min_p > 0:
        scores = min_p(scores, cfg.min_p)
    return scores


def choose(scores: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token per row: argmax, or a draw from softmax(scores) (one uniform per row)."""
    if not cfg.do_sample:
        return scores.argmax(axis=-1)
    probs = _softmax(scores.astype(np.float64))
    cdf = np.cumsum(probs, axis=-1)
    u = (1.0 - rng.random((len(scores), 1))) * cdf[:, -1:]  # in (0, total]: never a zero-prob token
    picks = (cdf < u).sum(axis=-1)
    return np.minimum(picks, scores.shape[-1] - 1)
