"""What every decoding strategy (`gemma_core.generation`'s greedy and sampling, `gemma_core.beam`)
shares: reading the prompt (texts, id lists, or transformers-style `input_ids`/`attention_mask`),
planning the cache, stop strings, default eos ids, and the `GenerationResult`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gemma_core.errors import InputError

if TYPE_CHECKING:
    from gemma_core.model import Model
    from gemma_core.tokenizer import GemmaTokenizer

Prompt = str | Sequence[int]


DEFAULT_MAX_NEW_TOKENS = 64  # the API's and the CLI's default


@dataclasses.dataclass
class GenerationResult:
    """Per row: the generated ids (a stopping eos included), their text, and why it stopped.

    With `output_scores`: per generated token its log-probability (`logprobs`) and the
    `top_logprobs` best `(token, logprob)` pairs, under the distribution the token was chosen
    from: log-softmax of the processed scores (greedy, sampling), or beam search's processed
    log-softmax (transformers' beam `scores`); `sequence_scores`: each beam's final score."""

    prompt_ids: list[list[int]]
    token_ids: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]  # "eos", "stop_string", "stopping_criteria" or "length"
    cache: Any = None  # holds the prompt and every generated token but the last (None for beams)
    logprobs: list[list[float]] | None = None
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None
    sequence_scores: list[float] | None = None  # beam search: transformers' `sequences_scores`
    # speculative decoding (`gemma_core.speculative`): candidates the target kept / proposed
    acceptance_rate: float | None = None


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


def _host_ids(model: Model, x: Any, name: str) -> np.ndarray:
    """A [B, T] host array of ids or mask values (numpy, lists, or a backend's arrays)."""
    arr = np.asarray(x) if isinstance(x, (np.ndarray, list, tuple)) else model.to_numpy(x)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.dtype.kind not in "iub":
        raise InputError(f"{name}: expected a non-empty [batch, length] integer array, got shape "
                         f"{arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64)


def prepare_inputs(model: Model, prompts: Prompt | Sequence[Prompt] | None, input_ids: Any = None,
                   attention_mask: Any = None) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """(each row's real prompt ids, ids [B, T], mask [B, T]) from prompts (texts or id lists,
    left-padded here) or from transformers-style `input_ids`/`attention_mask` (left-padded
    rows; without a mask, pad tokens are masked out unless pad is an eos, as transformers
    infers it)."""
    pad = model.config.pad_token_id
    if prompts is not None and input_ids is None and hasattr(prompts, "shape"):
        prompts, input_ids = None, prompts  # an array: transformers' positional `inputs`
    if input_ids is None:
        if attention_mask is not None:
            raise InputError("attention_mask: given without input_ids")
        if prompts is None:
            raise InputError("prompts: expected prompts or input_ids")
        from gemma_core.cache import batch_ids

        rows = _encode_prompts(prompts, model.tokenizer)
        ids, mask = batch_ids(rows, pad)
        return rows, ids, mask
    if prompts is not None:
        raise InputError("prompts: give prompts or input_ids, not both")
    ids = _host_ids(model, input_ids, "input_ids")
    if attention_mask is None:
        infer = (ids == pad).any() and pad not in model.config.eos_token_ids
        mask = (ids != pad).astype(np.int64) if infer else np.ones_like(ids)
    else:
        mask = _host_ids(model, attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask: shape {mask.shape} differs from input_ids {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise InputError("attention_mask: values must be 0 or 1")
    if not mask[:, -1].all() or (np.diff(mask, axis=1) < 0).any():
        raise InputError("attention_mask: generation needs left padding (every row's real tokens "
                         "last, at least one); a row has padding after a real token")
    return [row[m.astype(bool)].tolist() for row, m in zip(ids, mask, strict=True)], ids, mask


def pairs(ids: np.ndarray, logprobs: np.ndarray) -> list[tuple[int, float]]:
    """`(token, logprob)` pairs of one row's top entries."""
    return [(int(i), float(v)) for i, v in zip(ids, logprobs, strict=True)]


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


def stop_cut(text: str, stops: Sequence[str]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def check_stop_strings(model: Model, stop_strings: Sequence[str]) -> None:
    """Refuse one string, empty strings, and stop strings without a tokenizer."""
    if isinstance(stop_strings, str):
        raise InputError("stop_strings: expected a list of strings, got one string")
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise InputError(f"stop_strings: each must be a non-empty string (an empty one would stop "
                         f"at once), got {list(stop_strings)!r}")
    if stop_strings and model.tokenizer is None:
        raise InputError("stop_strings: need a tokenizer to decode text")


def plan_cache(model: Model, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int,
               cache: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, mask, cache length): the prompt left-padded to a bucket for compiled steps, and
    the slots the cache needs; refuses a generation past the model's or the cache's context."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}")
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
    if cache is not None and len(ids) != cache.batch_size:
        raise InputError(f"prompts: {len(ids)} rows for a cache of {cache.batch_size}")
    if total > limit:
        held = f"{past} cached and " if past else ""
        raise InputError(f"prompt: {held}{ids.shape[1]} tokens plus max_new_tokens {max_new_tokens} "
                         f"exceed the {'model' if cache is None else 'cache'}'s context of {limit} tokens")
    return ids, mask, total


def check_top_logprobs(top_logprobs: int, vocab: int) -> None:
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, (int, np.integer)) \
            or not 0 <= top_logprobs <= vocab:
        raise InputError(f"top_logprobs: must be an integer in [0, {vocab}], got {top_logprobs!r}")


def default_eos_ids(model: Model) -> tuple[int, ...]:
    """The config's eos ids, plus the tokenizer's eos and end-of-turn (chat models stop there)."""
    ids = list(model.config.eos_token_ids)
    tok = model.tokenizer
    if tok is not None:
        ids.append(tok.eos_id)
        if tok.end_of_turn_id is not None:
            ids.append(tok.end_of_turn_id)
    return tuple(dict.fromkeys(ids))
