"""Model quality on a fixed text: next-token log-likelihood and agreement between two models.

Used to measure how far quantisation moves a model (tests/test_real_weights.py,
benchmarks/quality.py). The text is cut into windows of `window` tokens, each starting with BOS
and scored on its own (no cache carried across windows).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per scored position: the log-probability of the actual next token and the argmax."""

    logprobs: np.ndarray  # [P] float64
    top1: np.ndarray  # [P] int

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-likelihood)."""
        return math.exp(-float(self.logprobs.mean()))


def windows(ids: Sequence[int], window: int, bos: int) -> list[list[int]]:
    """`ids` cut into runs of `window - 1` tokens, each led by BOS."""
    step = window - 1
    return [[bos, *ids[i:i + step]] for i in range(0, len(ids), step) if len(ids[i:i + step]) > 1]


def score(model: Any, ids: Sequence[int], window: int = 512) -> Scores:
    """Log-probabilities of every next token of `ids` (windows of `window` tokens) and the
    model's own top-1 prediction at each position."""
    logprobs, top1 = [], []
    for run in windows(list(ids), window, model.config.bos_token_id):
        logits = np.asarray(model.to_numpy(model.forward(np.array([run])).logits)[0, :-1], np.float32)
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1, dtype=np.float64)) + top[:, 0]  # [P]
        target = np.array(run[1:])
        logprobs.append(logits[np.arange(len(target)), target].astype(np.float64) - log_z)
        top1.append(logits.argmax(axis=-1))
    return Scores(np.concatenate(logprobs), np.concatenate(top1))


def compare(reference: Scores, candidate: Scores) -> dict[str, float]:
    """Top-1 agreement of the candidate with the reference, and both perplexities."""
    return {
        "top1_agreement": float((reference.top1 == candidate.top1).mean()),
        "perplexity": candidate.perplexity,
        "reference_perplexity": reference.perplexity,
        "perplexity_change": candidate.perplexity / reference.perplexity - 1.0,
    }
