"""Continuous batching: requests join and leave one running batch at every decode step.

The engine owns one static cache of `max_batch` rows ("slots") and `slots` positions. Rows
decode in lock-step: every step writes slot `length` of every row, an idle row with a masked
pad. A row's tokens are contiguous and end at the cache's length, as in a left-padded batch,
so the sliding-window rule (which counts slots) sees exactly the tokens a request alone would:
each response equals its single-request output.

- **Join.** Waiting requests are prefilled together in a cache of their own whose length is
  placed so that their prompts end at the running batch's length, then each is spliced into a
  free row (`gemma_core.cache.write_row`). When the batch is younger than the prompt, every row
  moves later first (`shift_slots`); an empty batch simply restarts at the prompt's width.
- **Leave.** A finished, cancelled or failed request frees its row at once: the row's slots
  are marked invalid and the next join overwrites them.
- **Prefix cache.** A prompt that begins like a recent one (a shared system prompt, a chat's
  next turn) starts from a copy of that prompt's cache, cropped to what they share and moved to
  its place, and prefills only the rest (`gemma_core.serving.prefix`).
- **Compaction.** When the length reaches the cache's slots, every row moves earlier by the
  slots no active row uses (`shift_slots`). The cache holds twice the per-request `context`
  by default, so this happens at most once every `context` steps.

Sampling, stop strings and logprobs are per request, on host numpy, with the same functions
as `Model.generate` (`gemma_core.sampling`, `gemma_core.processors`). `on_event` callbacks run
on the engine's thread; an exception in one of them, or in a step, never stops the engine (a
failed step ends the requests it held with an "error" event and resets the cache).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gemma_core.cache import KVCache, batch_ids, reorder_cache, shift_slots, write_row
from gemma_core.decoding import _bucket, _left_pad, default_eos_ids, stop_cut
from gemma_core.errors import InputError
from gemma_core.generation import RowState
from gemma_core.processors import ProcessorConfig, log_softmax, plain_greedy, top_entries
from gemma_core.sampling import SamplingConfig, choose, process
from gemma_core.serving.prefix import PrefixCache

if TYPE_CHECKING:
    from gemma_core.model import Model

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings (OpenAI's names). `temperature=0` is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, cut from the text
    logprobs: int | None = None  # None: none; n: the chosen token's logprob and n alternatives
    ignore_eos: bool = False
    # a logits processor (ids [1, T], scores [1, V]) -> scores, before the sampling warpers,
    # called once per step with the prompt and the tokens so far (e.g. structured output:
    # gemma_core.structured.constraint_processor)
    processor: Callable[[np.ndarray, np.ndarray], Any] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> InputError:
            return InputError(f"{name}: must be {rule}, got {getattr(self, name)!r}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "a positive integer")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise bad("temperature", "a finite number >= 0")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise bad("top_p", "in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "a non-negative integer")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise bad("seed", "a non-negative integer")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        n = self.logprobs
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_LOGPROBS):
            raise bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}]")
        if self.processor is not None and not callable(self.processor):
            raise bad("processor", "a callable (ids, scores) -> scores")

    def sampling(self) -> SamplingConfig:
        """The `SamplingConfig` these settings mean (greedy at temperature 0)."""
        if self.temperature == 0:
            return SamplingConfig()
        return SamplingConfig(do_sample=True, temperature=float(self.temperature),
                              top_k=self.top_k or None, top_p=float(self.top_p) if self.top_p < 1 else None)


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """A request's next token (or its end). `finish_reason` is None while it runs, then "stop"
    (eos or a stop string), "length", "cancelled" or "error" on its last event."""

    token_id: int | None  # None on a last event without a token (cancelled, error)
    text: str  # the text this token adds (stop strings cut; a partial character waits)
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None
    error: str | None = None


class QueueFull(Exception):
    """The engine's queue of waiting requests is full: try again later (HTTP 429)."""


class EngineClosed(Exception):
    """The engine is shutting down and accepts no request (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class EngineMetrics:
    """Counters since the engine started, and its state now."""

    queue_depth: int
    active: int  # in the batch, or taken from the queue and being prefilled into it
    max_batch: int
    requests_total: int
    prompt_tokens_total: int
    tokens_generated_total: int
    steps_total: int
    compactions_total: int
    prefix_hits_total: int = 0  # requests whose prompt began like a recent one's (prefix cache)
    prefix_tokens_total: int = 0  # prompt tokens those hits did not prefill again


class Request:
    """A submitted request: its id, prompt size and `cancel()`."""

    def __init__(self, engine: Engine, rid: str, prompt_ids: list[int], params: SamplingParams,
                 on_event: Callable[[TokenEvent], None]) -> None:
        self.id, self.prompt_ids, self.params = rid, prompt_ids, params
        self.prompt_tokens = len(prompt_ids)
        self._engine, self._on_event = engine, on_event
        self.cancelled = False
        self.done = threading.Event()  # set after the last event was delivered

    def cancel(self) -> None:
        """Stop this request at the next step; its last event has finish_reason "cancelled"."""
        self._engine.cancel(self)


class _Row:
    """A request decoding in a row of the batch."""

    def __init__(self, request: Request, tokenizer: Any, eos: frozenset[int], start: int) -> None:
        self.request, self.params = request, request.params
        self.sampling = request.params.sampling()
        self.rng = np.random.default_rng(request.params.seed)
        self.text = RowState(1, tokenizer, request.params.stop)
        self.eos = frozenset() if request.params.ignore_eos else eos
        self.start = start  # the row's first slot
        self.last = -1  # the token to feed next
        # the raw argmax decides: the device may reduce the logits (Model.greedy_tokens)
        self.plain = (plain_greedy(self.sampling, ProcessorConfig()) and self.params.processor is None
                      and self.params.logprobs is None)


class Engine:
    """Continuous batching over `model` (any backend). `context`: the most prompt + max_tokens
    tokens one request may use (default the model's, at most 2048); `slots`: the cache's length
    (default twice the context, within the model's positions), which bounds how often the batch
    is compacted; `prefix_cache`: how many recent prompts' caches to keep for prompts that begin
    alike (`gemma_core.serving.prefix`; 0: none; each holds one row of `slots`)."""

    def __init__(self, model: Model, *, max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None, slots: int | None = None, prefix_cache: int = 4) -> None:
        limit = model.config.max_position_embeddings
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name}: must be a positive integer, got {value!r}")
        context = min(limit, 2048) if context is None else context
        if isinstance(context, bool) or not isinstance(context, int) or not 2 <= context <= limit:
            raise InputError(f"context: must be an integer in [2, {limit}], got {context!r}")
        slots = min(2 * context, limit) if slots is None else slots
        if isinstance(slots, bool) or not isinstance(slots, int) or not context <= slots <= limit:
            raise InputError(f"slots: must be an integer in [context={context}, {limit}], got {slots!r}")
        self.model, self.tokenizer = model, model.tokenizer
        self.max_batch, self.max_queue, self.context, self.slots = max_batch, max_queue, context, slots
        self._eos = frozenset(default_eos_ids(model))
        self._cache = model.new_cache(1, slots)  # rows follow the load (`_fit`), up to max_batch
        self._prefix = PrefixCache(model, prefix_cache) if prefix_cache > 0 else None
        self._rows: list[_Row | None] = [None]
        self._queue: collections.deque[Request] = collections.deque()
        self._admitting: list[Request] = []  # out of the queue, not yet in a row
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._counts = dict.fromkeys(("requests", "prompt_tokens", "tokens", "steps", "compactions"), 0)

    # -- the public, thread-safe side ------------------------------------------------------

    def start(self) -> None:
        """Start the decode thread (idempotent)."""
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gemma-engine", daemon=True)
                self._thread.start()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               on_event: Callable[[TokenEvent], None]) -> Request:
        """Queue a request; `on_event` gets each `TokenEvent` on the engine's thread (it must
        not block). Raises `InputError` for a bad prompt, `QueueFull`, or `EngineClosed`."""
        ids = self._check_prompt(prompt_ids, params)
        with self._cv:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue {self.max_queue})")
            request = Request(self, f"req-{next(self._ids)}", ids, params, on_event)
            self._queue.append(request)
            self._counts["requests"] += 1
            self._counts["prompt_tokens"] += len(ids)
            self._cv.notify_all()
        return request

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Submit and iterate the request's events in this thread (tests, scripts)."""
        import queue

        events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        request = self.submit(prompt_ids, params, events.put)
        try:
            while True:
                event = events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not request.done.is_set():
                request.cancel()

    def cancel(self, request: Request) -> None:
        """Stop `request` at the next step (a queued one never starts)."""
        with self._cv:
            request.cancelled = True
            self._cv.notify_all()

    def metrics(self) -> EngineMetrics:
        """The counters and the queue and batch occupancy now."""
        with self._cv:
            c = self._counts
            p = self._prefix
            active = sum(r is not None for r in self._rows) + len(self._admitting)
            return EngineMetrics(len(self._queue), active, self.max_batch,
                                 c["requests"], c["prompt_tokens"], c["tokens"], c["steps"], c["compactions"],
                                 p.hits if p else 0, p.tokens_saved if p else 0)

    def shutdown(self, *, cancel: bool = False, timeout: float | None = None) -> None:
        """Accept no more requests; finish the ones queued and running (or cancel them), waiting
        up to `timeout` seconds before cancelling what is left."""
        with self._cv:
            self._closing = True
            if cancel:
                self._cancel_all()
            self._cv.notify_all()
            thread = self._thread
        if thread is None:
            with self._cv:
                self._cancel_all()
                self._deliver_cancelled()
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._cv:
                self._cancel_all()
                self._cv.notify_all()
            thread.join()

    # -- the engine thread -----------------------------------------------------------------

    def _check_prompt(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        if not isinstance(params, SamplingParams):
            raise InputError(f"params: expected SamplingParams, got {type(params).__name__}")
        try:
            ids = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise InputError("prompt: expected a list of token ids") from None
        if not ids:
            raise InputError("prompt: empty")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InputError(f"prompt: token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        if len(ids) + params.max_tokens > self.context:
            raise InputError(f"prompt: {len(ids)} tokens plus max_tokens {params.max_tokens} exceed the "
                             f"context of {self.context} tokens")
        if params.stop and self.tokenizer is None:
            raise InputError("stop: needs a tokenizer to decode text")
        return ids

    def _cancel_all(self) -> None:
        for request in (*self._queue, *self._admitting):
            request.cancelled = True
        for row in self._rows:
            if row is not None:
                row.request.cancelled = True

    def _deliver_cancelled(self) -> None:
        """End every cancelled request, queued or running (called with the lock held)."""
        keep = collections.deque(r for r in self._queue if not r.cancelled)
        for request in self._queue:
            if request.cancelled:
                self._emit(request, TokenEvent(None, "", finish_reason="cancelled"))
        self._queue = keep
        for i, row in enumerate(self._rows):
            if row is not None and row.request.cancelled:
                self._free(i, TokenEvent(None, self._delta(row), finish_reason="cancelled"))

    def _delta(self, row: _Row) -> str:
        return row.text.delta(0) if self.tokenizer is not None else ""

    def _run(self) -> None:
        while True:
            with self._cv:
                self._deliver_cancelled()
                while not self._queue and not any(self._rows) and not self._closing:
                    self._cv.wait()
                    self._deliver_cancelled()
                if self._closing and not self._queue and not any(self._rows):
                    return
                active = sum(r is not None for r in self._rows)
                joins = [self._queue.popleft() for _ in range(min(self.max_batch - active, len(self._queue)))]
                self._admitting = list(joins)
            try:
                self._fit(active + len(joins))
                free = [i for i, r in enumerate(self._rows) if r is None]
                if joins:
                    self._admit(joins, free[:len(joins)])
                if any(self._rows):
                    self._decode()
                    self._fit(sum(r is not None for r in self._rows))
            except Exception as e:  # a failed step must not stop the server
                log.exception("engine step failed")
                self._fail(joins, e)

    def _fail(self, joins: list[Request], error: Exception) -> None:
        event = TokenEvent(None, "", finish_reason="error", error=f"{type(error).__name__}: {error}")
        with self._cv:
            self._admitting = []
            for request in joins:
                if not request.done.is_set():
                    self._emit(request, event)
            for i, row in enumerate(self._rows):
                if row is not None:
                    self._free(i, event)
            self._cache = self.model.new_cache(1, self.slots)
            self._rows = [None]

    def _fit(self, needed: int) -> None:
        """Hold the batch in as many rows as `needed` asks (a power of two up to max_batch): a
        step computes every row, so a lone request must not pay for a full batch. Grows at
        once; shrinks when a quarter of the rows would do (few reshapes as requests come and
        go). Active rows keep their order, first; the cache's rows are gathered on the device."""
        size = min(_bucket(max(needed, 1), smallest=1), self.max_batch)
        if size <= len(self._rows) < 4 * size:
            return
        active = [i for i, r in enumerate(self._rows) if r is not None]
        index = np.array(active + [0] * (size - len(active)), np.int64)  # past the active: free rows
        model = self.model
        cache = reorder_cache(model.backend, self._cache, index, model.dtype, model.device)
        cache.valid[len(active):] = False
        cache.seen[len(active):] = 0
        with self._cv:
            self._cache = cache
            self._rows = [self._rows[i] for i in active] + [None] * (size - len(active))

    def _emit(self, request: Request, event: TokenEvent) -> None:
        try:
            request._on_event(event)
        except Exception:  # the listener's problem (e.g. a closed connection), not the batch's
            log.exception("on_event of %s failed", request.id)
            request.cancelled = True
        if event.finish_reason is not None:
            request.done.set()

    def _free(self, i: int, event: TokenEvent) -> None:
        row = self._rows[i]
        assert row is not None
        self._rows[i] = None
        self._cache.valid[i] = False  # the next join overwrites its slots
        self._cache.seen[i] = 0
        self._emit(row.request, event)

    def _admit(self, requests: list[Request], rows: list[int]) -> None:
        """Start `requests` in `rows`: those whose prompt begins like a recent one from its
        cached prefix, one by one; the others prefilled together."""
        fresh: list[tuple[Request, int]] = []
        for request, i in zip(requests, rows, strict=True):
            ids = request.prompt_ids
            bucket = _bucket if self.model.static_shapes else None
            hit = self._prefix.lookup(ids, bucket) if self._prefix is not None else None
            if hit is None:
                fresh.append((request, i))
                continue
            c, prefix = hit
            cache = self._room(len(ids))
            model = self.model
            # the prefix moves to where the prompt must end: at the batch's length
            source = shift_slots(model.backend, prefix, len(ids) - cache.length, model.dtype, model.device)
            out = model.forward([ids[c:]], None, source, last_only=True, donate_cache=True)
            self._join(cache, [request], [i], out, len(ids))
        if fresh:
            self._prefill([r for r, _ in fresh], [i for _, i in fresh])

    def _room(self, width: int) -> KVCache:
        """The batch's cache with at least `width` slots before its length (a joining prompt
        ends at the length) and at least one slot after it."""
        cache = self._cache
        if not any(self._rows):  # an empty batch restarts at the prompts' width
            cache.valid[:] = False
            cache.seen[:] = 0
            return dataclasses.replace(cache, length=width)
        if cache.length >= self.slots:
            cache = self._compact(cache)
        if cache.length < width:  # every row moves later, to make room before the length
            cache = self._shift(cache, cache.length - width)
        return cache

    def _prefill(self, requests: list[Request], rows: list[int]) -> None:
        """Prefill `requests` together, their prompts ending at the batch's length."""
        model = self.model
        ids, mask = batch_ids([r.prompt_ids for r in requests], model.config.pad_token_id)
        n, width = ids.shape
        if model.static_shapes:  # compiled steps: few shapes (pads change no logit)
            width = min(max(_bucket(width), width), self.slots)
            ids, mask = _left_pad(ids, mask, width, model.config.pad_token_id)
            height = min(_bucket(n, smallest=1), self.max_batch)
            ids = np.concatenate([ids, np.full((height - n, width), model.config.pad_token_id, ids.dtype)])
            mask = np.concatenate([mask, np.zeros((height - n, width), mask.dtype)])
        cache = self._room(width)
        source = model.new_cache(len(ids), self.slots)
        source = dataclasses.replace(source, length=cache.length - width)
        out = model.forward(ids, mask, source, last_only=True, donate_cache=True)
        if self._prefix is not None:  # kept as they are; a hit extracts its row
            for j, request in enumerate(requests):
                self._prefix.store(request.prompt_ids, out.cache, j, cache.length - request.prompt_tokens)
        self._join(cache, requests, rows, out, width)

    def _join(self, cache: KVCache, requests: list[Request], rows: list[int], out: Any,
              width: int) -> None:
        """Splice row j of the prefill `out` into `rows[j]` of `cache` and emit the first tokens."""
        model = self.model
        for j, i in enumerate(rows):
            cache = write_row(model.backend, cache, i, out.cache, j, model.dtype, model.device)
        self._cache = cache
        logits = model.to_numpy(out.logits)[:len(requests), -1].astype(np.float32)
        for j, (request, i) in enumerate(zip(requests, rows, strict=True)):
            row = _Row(request, self.tokenizer, self._eos, cache.length - width)
            with self._cv:
                self._rows[i] = row
                self._admitting.remove(request)
                self._advance(i, row, logits[j])

    def _shift(self, cache: KVCache, shift: int) -> KVCache:
        model = self.model
        cache = shift_slots(model.backend, cache, shift, model.dtype, model.device)
        for row in self._rows:
            if row is not None:
                row.start -= shift
        return cache

    def _compact(self, cache: KVCache) -> KVCache:
        """Move every row earlier by the slots before the oldest active row's first one."""
        spare = min(r.start for r in self._rows if r is not None)
        if spare <= 0:  # a row spans the whole cache; submit's context check prevents it
            raise RuntimeError(f"the batch cannot be compacted: a row uses all {self.slots} slots")
        self._counts["compactions"] += 1
        return self._shift(cache, spare)

    def _decode(self) -> None:
        """One step of every active row."""
        model, cache = self.model, self._cache
        if cache.length >= self.slots:
            cache = self._compact(cache)
        active = [r is not None for r in self._rows]
        pad = model.config.pad_token_id
        feed = np.array([[r.last if r is not None else pad] for r in self._rows], np.int64)
        mask = np.array([[a] for a in active], np.int64)
        out = model.forward(feed, mask, cache, last_only=True, donate_cache=True)
        self._cache = out.cache
        if all(r is None or r.plain for r in self._rows):  # B ids to the host, not B x V floats
            logits, tokens = None, model.greedy_tokens(out.logits)
        else:
            logits, tokens = model.to_numpy(out.logits)[:, -1].astype(np.float32), None
        with self._cv:
            self._counts["steps"] += 1
            for i, row in enumerate(self._rows):
                if row is not None and active[i]:
                    if tokens is not None:
                        self._advance(i, row, None, int(tokens[i]))
                    else:
                        self._advance(i, row, logits[i])

    def _advance(self, i: int, row: _Row, logits: np.ndarray | None, token: int = -1) -> None:
        """Choose row `i`'s next token from its logits (or take `token`, the argmax of a plain
        greedy row reduced on the device) and emit it (the lock held)."""
        params = row.params
        if row.request.cancelled:
            self._free(i, TokenEvent(None, self._delta(row), finish_reason="cancelled"))
            return
        scores = None
        if logits is not None:
            scores = logits[None]
            if params.processor is not None:
                ids = np.array([row.request.prompt_ids + row.text.ids[0]], np.int64)
                scores = np.asarray(params.processor(ids, scores), np.float32)
            scores = process(scores, row.sampling, [])
            token = int(choose(scores, row.sampling, row.rng)[0])
        logprob: float | None = None
        top: tuple[tuple[int, float], ...] = ()
        if params.logprobs is not None and scores is not None:
            lp = log_softmax(scores)
            logprob = float(lp[0, token])
            if params.logprobs:
                ids, vals = top_entries(lp, params.logprobs)
                top = tuple((int(t), float(v)) for t, v in zip(ids[0], vals[0], strict=True))
        text = row.text
        text.ids[0].append(token)
        self._counts["tokens"] += 1
        reason = None
        if token in row.eos or (params.stop and stop_cut(text.text(0), params.stop) is not None):
            reason = "stop"
        elif len(text.ids[0]) >= params.max_tokens:
            reason = "length"
        if reason is not None:
            text.reasons[0] = reason
        delta = self._delta(row)
        event = TokenEvent(token, delta, logprob, top, reason)
        row.last = token
        if reason is not None:
            self._free(i, event)
        else:
            self._emit(row.request, event)
