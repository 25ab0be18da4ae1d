"""Beam search, step for step as transformers' vectorised `_beam_search` (v4.50+), on host numpy.

Per prompt, `num_beams` running hypotheses and `num_beams` finished ones. Each step scores every
running beam's continuations with its processed log-softmax plus the beam's running sum, keeps
the best `max(2, 1 + n_eos) * num_beams` candidates, moves those that stop (eos, a stopping
criterion, a stop string, the last step) into the finished set under the length penalty, and
continues the best `num_beams` that did not stop, each from its parent's cache
(`gemma_core.cache.reorder_cache`). Scores are float32 and "impossible" is -1e9, as there, so
ties and the early-stopping heuristics resolve alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gemma_core.cache import reorder_cache
from gemma_core.decoding import (
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
from gemma_core.processors import ProcessorConfig, apply_all, log_softmax, stopped, top_entries
from gemma_core.sampling import SamplingConfig

if TYPE_CHECKING:
    from gemma_core.model import Model

NEG = np.float32(-1.0e9)  # transformers' "never": large, finite, so sums stay comparable
REASONS = ("", "eos", "stopping_criteria", "stop_string", "length")


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k largest values, largest first (ties: the lower index)."""
    part = np.argpartition(-x, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(x, part, axis=-1)
    return np.take_along_axis(part, np.lexsort((part, -vals), axis=-1), axis=-1)


def _gather(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`x [B, N, ...]` at beams `idx [B, M]` -> `[B, M, ...]`."""
    return x[np.arange(len(x))[:, None], idx]


def _check_beam_args(sampling: SamplingConfig, num_beams: int, length_penalty: float,
                     early_stopping: bool | str, num_return_sequences: int) -> None:
    if sampling.do_sample:
        raise InputError("num_beams: beam search here is deterministic (do_sample=False); "
                         "sampling with beams is not supported")
    if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, (int, np.integer)) \
            or not 1 <= num_return_sequences <= num_beams:
        raise InputError(f"num_return_sequences: must be an integer in [1, num_beams={num_beams}], "
                         f"got {num_return_sequences!r}")
    if early_stopping not in (True, False, "never") or not isinstance(early_stopping, (bool, str)):
        raise InputError(f"early_stopping: expected True, False or 'never', got {early_stopping!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
            or not math.isfinite(length_penalty):
        raise InputError(f"length_penalty: must be a finite number, got {length_penalty!r}")


def beam_search(model: Model, prompts: Prompt | Sequence[Prompt] | None = None, *, max_new_tokens: int,
                num_beams: int, sampling: SamplingConfig | None = None,
                eos_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                cache: Any = None, donate_cache: bool = False, input_ids: Any = None,
                attention_mask: Any = None, processors: ProcessorConfig | None = None,
                output_scores: bool = False, top_logprobs: int = 0, length_penalty: float = 1.0,
                early_stopping: bool | str = False, num_return_sequences: int = 1) -> GenerationResult:
    """The `num_return_sequences` best finished beams of each prompt, best first, as rows of
    one `GenerationResult` (prompt `i`'s at rows `i * num_return_sequences + j`, as
    transformers flattens them). Its `cache` is None: the beams' caches do not match the rows."""
    sampling = sampling or SamplingConfig()
    procs = processors or ProcessorConfig()
    _check_beam_args(sampling, num_beams, length_penalty, early_stopping, num_return_sequences)
    check_stop_strings(model, stop_strings)
    check_top_logprobs(top_logprobs, model.config.vocab_size)
    if cache is not None:
        cache.check_usable()
    rows_ids, ids, mask = prepare_inputs(model, prompts, input_ids, attention_mask)
    b, nb, steps, vocab = len(rows_ids), num_beams, max_new_tokens, model.config.vocab_size
    prompt = np.repeat(ids, nb, axis=0)  # [B*nb, T0]: what processors see, as transformers' input_ids
    pads = np.repeat((mask == 0).sum(axis=1), nb)
    ids, mask, total = plan_cache(model, ids, mask, max_new_tokens, cache)
    eos = list(dict.fromkeys(eos_token_ids if eos_token_ids is not None else default_eos_ids(model)))
    keep = max(2, 1 + len(eos)) * nb
    k = top_logprobs if output_scores else 0
    owned = cache is None or donate_cache
    if cache is None:
        cache = model.new_cache(b, total)
    out = model.forward(ids, mask, cache, last_only=True, donate_cache=owned)
    expand = np.repeat(np.arange(b), nb)
    kv = reorder_cache(model.backend, out.cache, expand, model.dtype, model.device)
    logits = model.to_numpy(out.logits)[:, -1][expand]

    # running beams [B, nb, ...] and finished ones [B, nb, ...]; generated tokens only
    run: dict[str, np.ndarray] = {
        "gen": np.full((b, nb, steps), -1, np.int64), "lp": np.zeros((b, nb, steps), np.float32),
        "top_ids": np.zeros((b, nb, steps, k), np.int64), "top_lp": np.zeros((b, nb, steps, k), np.float32)}
    run_scores = np.zeros((b, nb), np.float32)
    run_scores[:, 1:] = NEG  # only the first beam's continuations at the first step
    fin: dict[str, np.ndarray] = {**{key: v.copy() for key, v in run.items()},
                                  "len": np.zeros((b, nb), np.int64), "reason": np.zeros((b, nb), np.int64)}
    fin_scores = np.full((b, nb), NEG, np.float32)
    fin_done = np.zeros((b, nb), bool)
    improvable = np.ones((b, 1), bool)
    offsets = np.arange(b)[:, None] * nb
    for s in range(steps):
        if s:
            out = model.forward(run["gen"][:, :, s - 1].reshape(-1, 1), None, kv, last_only=True,
                                donate_cache=True)
            kv, logits = out.cache, model.to_numpy(out.logits)[:, -1]
        flat = np.concatenate([prompt, run["gen"].reshape(b * nb, steps)[:, :s]], axis=1)
        logp = apply_all(flat, log_softmax(logits.astype(np.float32)), pads, s, sampling, procs, eos)
        step_top = top_entries(logp, k) if k else None
        acc = (logp.reshape(b, nb, vocab) + run_scores[:, :, None]).reshape(b, nb * vocab)
        picked = _topk(acc, keep)  # [B, keep]
        cand_scores = np.take_along_axis(acc, picked, axis=1)
        parent, token = picked // vocab, picked % vocab
        rows = parent + offsets  # [B, keep]: the parents' rows in the flat batch
        cand = {key: _gather(v, parent) for key, v in run.items()}
        cand["gen"][:, :, s] = token
        cand["lp"][:, :, s] = logp[rows, token]
        if step_top is not None:
            cand["top_ids"][:, :, s], cand["top_lp"][:, :, s] = step_top[0][rows], step_top[1][rows]
        reason = _stop_reasons(model, procs, stop_strings, eos, prompt, cand["gen"][:, :, :s + 1],
                               rows, logp, token, last=s == steps - 1)
        hits = reason > 0

        # the best nb candidates that go on
        go_scores = cand_scores + hits.astype(np.float32) * NEG
        nxt = _topk(go_scores, nb)
        run = {key: _gather(v, nxt) for key, v in cand.items()}
        run_scores = np.take_along_axis(go_scores, nxt, axis=1)
        parents = np.take_along_axis(rows, nxt, axis=1)

        # the finished set: the old one and the top-nb candidates that just stopped, best nb kept
        just = hits & (np.arange(keep) < nb)[None]
        fin_new = cand_scores / np.float32((s + 1) ** length_penalty)
        full = fin_done.all(axis=-1, keepdims=True) & (early_stopping is True)
        fin_new = fin_new + full.astype(np.float32) * NEG + (~improvable).astype(np.float32) * NEG
        fin_new = fin_new + (~just).astype(np.float32) * NEG
        merged_scores = np.concatenate([fin_scores, fin_new], axis=1)
        best = _topk(merged_scores, nb)
        extra = {"len": np.full((b, keep), s + 1, np.int64), "reason": reason}
        fin = {key: _gather(np.concatenate([v, extra.get(key, cand.get(key))], axis=1), best)
               for key, v in fin.items()}
        fin_scores = np.take_along_axis(merged_scores, best, axis=1)
        fin_done = _gather(np.concatenate([fin_done, just], axis=1), best)

        # whether any running beam can still beat the worst finished one (transformers' heuristic)
        horizon = steps if early_stopping == "never" and length_penalty > 0.0 else s + 1
        best_possible = run_scores[:, :1] / np.float32(horizon ** length_penalty)
        worst = np.where(fin_done, fin_scores.min(axis=1, keepdims=True), NEG)
        improvable &= (best_possible > worst).any(axis=-1, keepdims=True)
        if not improvable.any() or (fin_done.all() and early_stopping is True) or hits.all():
            break
        kv = reorder_cache(model.backend, kv, parents.ravel(), model.dtype, model.device)
    return _result(model, rows_ids, fin, fin_scores, num_return_sequences, stop_strings, output_scores, k)


def _stop_reasons(model: Model, procs: ProcessorConfig, stop_strings: Sequence[str], eos: Sequence[int],
                  prompt: np.ndarray, gen: np.ndarray, rows: np.ndarray, logp: np.ndarray,
                  token: np.ndarray, *, last: bool) -> np.ndarray:
    """Per candidate `[B, keep]`: why it stops (an index of REASONS; 0: it goes on)."""
    b, keep = token.shape
    reason = np.where(np.isin(token, eos), 1, 0)
    if procs.stopping_criteria:
        ids = np.concatenate([prompt[rows.ravel()], gen.reshape(b * keep, -1)], axis=1)
        hit = stopped(procs, ids, logp[rows.ravel()]).reshape(b, keep)
        reason = np.where((reason == 0) & hit, 2, reason)
    if stop_strings:
        tok = model.tokenizer
        assert tok is not None  # check_stop_strings refused stop strings without one
        hit = np.array([[stop_cut(tok.decode(g.tolist(), skip_special_tokens=True), stop_strings) is not None
                         for g in row] for row in gen])
        reason = np.where((reason == 0) & hit, 3, reason)
    if last:
        reason = np.where(reason == 0, 4, reason)
    return reason


def _result(model: Model, rows_ids: list[list[int]], fin: dict[str, np.ndarray], fin_scores: np.ndarray,
            n: int, stop_strings: Sequence[str], output_scores: bool, k: int) -> GenerationResult:
    prompt_ids, token_ids, reasons, scores = [], [], [], []
    logprobs: list[list[float]] = []
    tops: list[list[list[tuple[int, float]]]] = []
    for i, prompt in enumerate(rows_ids):
        for j in range(n):
            length = int(fin["len"][i, j])
            prompt_ids.append(list(prompt))
            token_ids.append(fin["gen"][i, j, :length].tolist())
            reasons.append(REASONS[int(fin["reason"][i, j])] or "length")
            scores.append(float(fin_scores[i, j]))
            logprobs.append([float(v) for v in fin["lp"][i, j, :length]])
            tops.append([pairs(fin["top_ids"][i, j, t], fin["top_lp"][i, j, t]) for t in range(length)]
                        if k else [])
    texts = None
    tok = model.tokenizer
    if tok is not None:
        texts = []
        for ids in token_ids:
            text = tok.decode(ids, skip_special_tokens=True)
            cut = stop_cut(text, stop_strings) if stop_strings else None
            texts.append(text if cut is None else text[:cut])
    return GenerationResult(prompt_ids, token_ids, texts, reasons, None,
                            logprobs if output_scores else None, tops if output_scores else None,
                            scores)
