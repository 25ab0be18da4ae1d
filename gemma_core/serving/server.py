"""The HTTP side of `gemma serve`: an OpenAI-compatible API (FastAPI on uvicorn) over the
batching `Engine` (`gemma_core.serving.engine`).

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with
`stream: true`), GET /v1/models, /health and /metrics (Prometheus text). Bodies and their
checks live in `protocol.py`; this file bridges the engine's thread to asyncio and maps
engine outcomes to HTTP: QueueFull -> 429 with Retry-After, InputError -> 400, a request
timeout -> 504 (or an error event mid-stream), a client gone -> its request cancelled so its
batch slot frees, anything unexpected -> a 500 body (the server outlives any one request).

The app owns the engine's life: its lifespan starts the engine and, at shutdown (SIGTERM:
uvicorn stops accepting and lets in-flight requests finish), drains then cancels it.
Needs the `serve` extra (fastapi, uvicorn, prometheus-client).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemma_core.errors import GemmaError, InputError
from gemma_core.serving import protocol as P
from gemma_core.serving.engine import EngineClosed, QueueFull, SamplingParams, TokenEvent

MAX_BODY_BYTES = 8 * 2**20  # far above any context's worth of text; bigger bodies are 413
POLL_S = 0.25  # how often a waiting non-streaming request looks for its client having gone
RETRY_AFTER_S = 1  # the Retry-After of a 429: a slot frees within a few decode steps
# seconds; decode on CPU runs from milliseconds (tiny models) to minutes (long answers)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _Timeout(Exception):
    pass


class _Disconnected(Exception):
    pass


class _EngineCollector:
    """The engine's own counters and gauges, read at each scrape."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def describe(self) -> list[Any]:
        return self._families(None)

    def collect(self) -> list[Any]:
        return self._families(self.engine.metrics())

    @staticmethod
    def _families(m: Any) -> list[Any]:
        def value(name: str) -> float:
            return 0.0 if m is None else float(getattr(m, name))

        return [
            GaugeMetricFamily("gemma_queue_depth", "Requests waiting for a batch slot",
                              value=value("queue_depth")),
            GaugeMetricFamily("gemma_active_requests", "Requests decoding in the batch",
                              value=value("active")),
            GaugeMetricFamily("gemma_max_batch", "Batch slots", value=value("max_batch")),
            CounterMetricFamily("gemma_engine_requests", "Requests the engine accepted",
                                value=value("requests_total")),
            CounterMetricFamily("gemma_prompt_tokens", "Prompt tokens prefilled (rate() = prefill tokens/s)",
                                value=value("prompt_tokens_total")),
            CounterMetricFamily("gemma_generation_tokens", "Tokens generated (rate() = decode tokens/s)",
                                value=value("tokens_generated_total")),
            CounterMetricFamily("gemma_engine_steps", "Batched decode steps", value=value("steps_total")),
            CounterMetricFamily("gemma_engine_compactions", "Times the batch's cache was compacted",
                                value=value("compactions_total")),
            CounterMetricFamily("gemma_prefix_cache_hits", "Requests started from a cached prompt prefix",
                                value=value("prefix_hits_total")),
            CounterMetricFamily("gemma_prefix_cache_tokens", "Prompt tokens a prefix-cache hit did not "
                                "prefill again", value=value("prefix_tokens_total")),
        ]


class _Metrics:
    """The server's Prometheus registry: the engine's collector, latency and TTFT histograms,
    responses by path and status. One registry per app, so that apps can coexist (tests)."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.latency = Histogram("gemma_request_duration_seconds", "Submission to the last token",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("gemma_time_to_first_token_seconds", "Submission to the first token",
                              ["endpoint"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.responses = Counter("gemma_http_responses", "HTTP responses by path and status",
                                 ["path", "status"], registry=self.registry)
        self.timeouts = Counter("gemma_request_timeouts", "Requests cancelled at --request-timeout",
                                registry=self.registry)
        self.disconnects = Counter("gemma_client_disconnects", "Requests cancelled as their client left",
                                   registry=self.registry)


@dataclasses.dataclass
class _State:
    engine: Any
    model_name: str
    api_key: str | None
    request_timeout: float | None
    shutdown_timeout: float
    metrics: _Metrics
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    draining: bool = False


class _Job:
    """One submitted request: the engine's events, handed from its thread to this loop."""

    def __init__(self, state: _State, endpoint: str) -> None:
        self.state, self.endpoint = state, endpoint
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.request: Any = None
        self.finished = False
        self.started = time.perf_counter()
        self.deadline = None if state.request_timeout is None else time.monotonic() + state.request_timeout
        self._first = True
        self._next_poll = time.monotonic() + POLL_S

    def on_event(self, ev: TokenEvent) -> None:
        """Runs on the engine thread: must not block."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    async def next_event(self, is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> TokenEvent:
        """The next event; `_Timeout` past the deadline, `_Disconnected` once the client has gone
        (looked for every POLL_S seconds, whether or not tokens are coming)."""
        while True:
            now = time.monotonic()
            if is_disconnected is not None and now >= self._next_poll:
                self._next_poll = now + POLL_S
                if await is_disconnected():
                    self.state.metrics.disconnects.inc()
                    raise _Disconnected
            wait = POLL_S if is_disconnected is not None else None
            if self.deadline is not None:
                left = self.deadline - now
                if left <= 0:
                    self.state.metrics.timeouts.inc()
                    raise _Timeout
                wait = left if wait is None else min(wait, left)
            try:
                ev = await asyncio.wait_for(self.queue.get(), wait)
            except asyncio.TimeoutError:
                continue
            self._observe(ev)
            return ev

    def _observe(self, ev: TokenEvent) -> None:
        elapsed = time.perf_counter() - self.started
        if self._first and ev.token_id is not None:
            self._first = False
            self.state.metrics.ttft.labels(self.endpoint).observe(elapsed)
        if ev.finish_reason is not None:
            self.finished = True
            if ev.finish_reason in ("stop", "length"):
                self.state.metrics.latency.labels(self.endpoint).observe(elapsed)

    def close(self) -> None:
        """Cancel the request unless it has finished (client gone, timeout, error): frees its slot."""
        if not self.finished and self.request is not None:
            self.finished = True
            self.state.engine.cancel(self.request)


def create_app(engine: Any, *, model_name: str, api_key: str | None = None,
               request_timeout: float | None = None, shutdown_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`. Its lifespan starts the engine and, at
    shutdown, lets in-flight requests finish for up to `shutdown_timeout` seconds, then cancels
    what is left. `api_key`: /v1/* need `Authorization: Bearer <api_key>`."""
    state = _State(engine=engine, model_name=model_name, api_key=api_key, request_timeout=request_timeout,
                   shutdown_timeout=shutdown_timeout, metrics=_Metrics(engine))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            state.draining = True
            await asyncio.to_thread(engine.shutdown, cancel=False, timeout=shutdown_timeout)
            await asyncio.to_thread(engine.shutdown, cancel=True, timeout=shutdown_timeout)

    app = FastAPI(title="gemma-core", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gemma = state
    _add_error_handlers(app)
    _add_response_counter(app, state)

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        _authorize(state, request)
        return JSONResponse(P.models_body(state.model_name, state.created))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        _authorize(state, request)
        body = await _parse(request, P.CompletionRequest)
        _check_model(state, body.model)
        ids = _prompt_ids(state, body.prompt)
        params = _params(state, body, ids, body.max_tokens, body.logprobs, "prompt")
        job = _submit(state, "completions", ids, params)
        if body.stream:
            return _sse(_completion_stream(state, job, body))
        return await _completion_response(state, request, job, body)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        _authorize(state, request)
        body = await _parse(request, P.ChatRequest)
        _check_model(state, body.model)
        try:
            ids = state.engine.tokenizer.apply_chat_template(
                [m.template_dict() for m in body.messages], add_generation_prompt=True, tokenize=True)
        except InputError as e:
            raise P.APIError(400, str(e), param="messages") from None
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(state, body, ids, body.token_budget, top, "messages")
        job = _submit(state, "chat", ids, params)
        if body.stream:
            return _sse(_chat_stream(state, job, body))
        return await _chat_response(state, request, job, body)

    return app


# ---- requests -------------------------------------------------------------------------------

def _authorize(state: _State, request: Request) -> None:
    if state.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: as long whether the key is right or wrong, so timing does not leak it
    if not (scheme.lower() == "bearer"
            and hmac.compare_digest(token.strip().encode(), state.api_key.encode())):
        raise P.APIError(401, "Incorrect or missing API key: send Authorization: Bearer <key>",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body as `model`: 413 past MAX_BODY_BYTES, 400 for malformed JSON or fields."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise P.APIError(413, f"request body too large (at most {MAX_BODY_BYTES} bytes)",
                         code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise P.APIError(413, f"request body too large (at most {MAX_BODY_BYTES} bytes)",
                             code="request_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise P.APIError(400, f"We could not parse the JSON body of your request: {e}",
                         code="invalid_json") from None
    if not isinstance(data, dict):
        raise P.APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                         code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise P.validation_error(e) from None


def _check_model(state: _State, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise P.APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`",
                         param="model", code="model_not_found")


def _prompt_ids(state: _State, prompt: str | list[int]) -> list[int]:
    tok = state.engine.tokenizer
    if isinstance(prompt, str):
        return list(tok.encode(prompt))  # with BOS, as `gemma generate` encodes a prompt
    bad = [t for t in prompt if not 0 <= t < tok.vocab_size]
    if bad:
        raise P.APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})",
                         param="prompt")
    return list(prompt)


def _params(state: _State, body: Any, ids: list[int], max_tokens: int | None, logprobs: int | None,
            what: str) -> SamplingParams:
    """The engine's parameters; 400 naming the context when prompt + max_tokens exceed it."""
    context = int(state.engine.context)
    budget = context - len(ids) if max_tokens is None else max_tokens  # chat: the rest of the context
    if len(ids) + max(budget, 1) > context:
        raise P.APIError(
            400, f"This model's maximum context length is {context} tokens. However, you requested "
                 f"{len(ids) + max(budget, 1)} tokens ({len(ids)} in the {what}, {max(budget, 1)} in the "
                 f"completion). Please reduce the length of the {what} or the completion.",
            param=what, code="context_length_exceeded")
    processor = None
    if body.response_format is not None:  # a grammar on every step (gemma_core.structured)
        from gemma_core.structured import constraint_processor

        try:
            processor = constraint_processor(state.engine.model, response_format=body.response_format)
        except GemmaError as e:  # a bad schema, or the structured extra missing
            raise P.APIError(400, str(e), param="response_format") from None
    return SamplingParams(
        max_tokens=budget, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
        stop=tuple(body.stop), logprobs=logprobs, ignore_eos=body.ignore_eos, processor=processor)


def _submit(state: _State, endpoint: str, ids: list[int], params: SamplingParams) -> _Job:
    if state.draining:
        raise P.APIError(503, "the server is shutting down", type="service_unavailable", code="shutting_down")
    job = _Job(state, endpoint)
    try:
        job.request = state.engine.submit(ids, params, job.on_event)
    except QueueFull as e:
        raise P.APIError(429, f"the server is busy (request queue full): {e}".rstrip(": "),
                         type="rate_limit_error", code="queue_full",
                         headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except EngineClosed:
        raise P.APIError(503, "the server is shutting down", type="service_unavailable",
                         code="shutting_down") from None
    except InputError as e:
        raise P.APIError(400, str(e)) from None
    return job


def _failure(ev: TokenEvent) -> P.APIError | None:
    """The error a final event that is not a completion stands for."""
    if ev.finish_reason == "error":
        return P.APIError(500, f"generation failed: {ev.error or 'engine error'}", type="server_error")
    if ev.finish_reason == "cancelled":
        return P.APIError(503, "the request was cancelled (the server is shutting down)",
                          type="service_unavailable", code="cancelled")
    return None


_TIMEOUT = "the request took longer than the server's request timeout ({}s) and was cancelled"


async def _collect(state: _State, request: Request, job: _Job) -> list[TokenEvent]:
    """Every event of a non-streaming request; its client leaving or the timeout cancels it."""
    events = []
    try:
        while True:
            ev = await job.next_event(request.is_disconnected)
            events.append(ev)
            if ev.finish_reason is not None:
                break
    except _Timeout:
        raise P.APIError(504, _TIMEOUT.format(state.request_timeout), type="timeout",
                         code="request_timeout") from None
    except _Disconnected:  # nobody reads this answer; 499 is nginx's "client closed request", for logs
        raise P.APIError(499, "the client closed the connection", code="client_closed") from None
    finally:
        job.close()
    error = _failure(events[-1])
    if error is not None:
        raise error
    return events


def _tokens(state: _State, events: list[TokenEvent]) -> tuple[int, list[TokenEvent]]:
    """The count of generated tokens, and the events whose logprobs are shown (visible tokens:
    not the eos or end-of-turn that ended the text)."""
    tok = state.engine.tokenizer
    generated = [ev for ev in events if ev.token_id is not None]
    shown = [ev for ev in generated if ev.logprob is not None and not tok.is_special(ev.token_id)]
    return len(generated), shown


async def _completion_response(state: _State, request: Request, job: _Job, body: Any) -> Response:
    events = await _collect(state, request, job)
    n, shown = _tokens(state, events)
    lp = (P.completion_logprobs(state.engine.tokenizer, shown, 0) if body.logprobs is not None else None)
    return JSONResponse(P.completion_body(P.new_id("cmpl"), state.model_name, "".join(e.text for e in events),
                                          P.finish_reason(events[-1].finish_reason), lp,
                                          P.usage(job.request.prompt_tokens, n)))


async def _chat_response(state: _State, request: Request, job: _Job, body: Any) -> Response:
    events = await _collect(state, request, job)
    n, shown = _tokens(state, events)
    lp = P.chat_logprobs(state.engine.tokenizer, shown) if body.logprobs else None
    return JSONResponse(P.chat_body(P.new_id("chatcmpl"), state.model_name, "".join(e.text for e in events),
                                    P.finish_reason(events[-1].finish_reason), lp,
                                    P.usage(job.request.prompt_tokens, n)))


# ---- streams --------------------------------------------------------------------------------

def _event(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream_events(state: _State, job: _Job) -> AsyncIterator[TokenEvent | P.APIError]:
    """The job's events, then an APIError in place of a failed or timed-out end. A client that
    disconnects cancels this generator's task (Starlette listens for it): `close` then cancels
    the request in the engine. Any exception becomes an error event: headers are sent."""
    try:
        while True:
            try:
                ev = await job.next_event()
            except _Timeout:
                yield P.APIError(504, _TIMEOUT.format(state.request_timeout), type="timeout",
                                 code="request_timeout")
                return
            error = _failure(ev) if ev.finish_reason is not None else None
            yield ev if error is None else error
            if ev.finish_reason is not None:
                return
    except (asyncio.CancelledError, GeneratorExit):  # the client has gone
        if not job.finished:
            state.metrics.disconnects.inc()
        raise
    finally:
        job.close()


async def _completion_stream(state: _State, job: _Job, body: Any) -> AsyncIterator[str]:
    rid, created, model, tok = P.new_id("cmpl"), int(time.time()), state.model_name, state.engine.tokenizer
    n, offset = 0, 0
    try:
        async for ev in _stream_events(state, job):
            if isinstance(ev, P.APIError):
                yield _event(ev.body())
                break
            n += ev.token_id is not None
            _, shown = _tokens(state, [ev])
            lp = P.completion_logprobs(tok, shown, offset) if body.logprobs is not None else None
            offset += len(ev.text)
            reason = P.finish_reason(ev.finish_reason)
            if ev.text or (lp and shown) or reason:
                yield _event(P.completion_body(rid, model, ev.text, reason, lp, None, created))
            if reason and body.include_usage:
                use = P.usage(job.request.prompt_tokens, n)
                yield _event(P.completion_usage_chunk(rid, model, created, use))
    except Exception as e:  # the response has started: report it in the stream
        yield _event(P.APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body())
    finally:  # also when Starlette drops this generator at a yield (client gone while sending)
        job.close()
    yield _event("[DONE]")


async def _chat_stream(state: _State, job: _Job, body: Any) -> AsyncIterator[str]:
    rid, created, model = P.new_id("chatcmpl"), int(time.time()), state.model_name
    tok = state.engine.tokenizer
    n = 0
    try:
        yield _event(P.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
        async for ev in _stream_events(state, job):
            if isinstance(ev, P.APIError):
                yield _event(ev.body())
                break
            n += ev.token_id is not None
            _, shown = _tokens(state, [ev])
            lp = P.chat_logprobs(tok, shown) if body.logprobs else None
            if ev.text or (lp and shown):
                yield _event(P.chat_chunk(rid, model, created, {"content": ev.text}, None, lp))
            if ev.finish_reason is not None:
                yield _event(P.chat_chunk(rid, model, created, {}, P.finish_reason(ev.finish_reason)))
                if body.include_usage:
                    yield _event(P.chat_chunk(rid, model, created, None,
                                              use=P.usage(job.request.prompt_tokens, n)))
    except Exception as e:  # the response has started: report it in the stream
        yield _event(P.APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body())
    finally:  # also when Starlette drops this generator at a yield (client gone while sending)
        job.close()
    yield _event("[DONE]")


# ---- errors and counting --------------------------------------------------------------------

def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(P.APIError)
    async def api_error(request: Request, e: P.APIError) -> Response:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        message = f"{e.detail}: {request.method} {request.url.path}"
        return JSONResponse(P.APIError(e.status_code, message, code="not_found" if e.status_code == 404
                                       else None).body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:  # OpenAI's 422 is a 400
        return JSONResponse(P.APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> Response:
        # Starlette logs the traceback after this answer; the server carries on
        return JSONResponse(P.APIError(500, f"internal error: {type(e).__name__}: {e}",
                                       type="server_error").body(), status_code=500)


def _add_response_counter(app: FastAPI, state: _State) -> None:
    """Count responses by path and status (a plain ASGI wrapper: streams pass straight through)."""
    inner = app.build_middleware_stack

    def build() -> Any:
        asgi = inner()

        async def counted(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await asgi(scope, receive, send)
                return
            path = scope.get("path", "")

            async def send_counted(message: Any) -> None:
                if message["type"] == "http.response.start":
                    state.metrics.responses.labels(path if path in _PATHS else "other",
                                                   str(message["status"])).inc()
                await send(message)

            await asgi(scope, receive, send_counted)

        return counted

    app.build_middleware_stack = build  # type: ignore[method-assign]


# ---- running --------------------------------------------------------------------------------

class _Server(uvicorn.Server):
    """uvicorn's server, marking the app as draining as soon as SIGTERM/SIGINT arrives (new
    requests on kept-alive connections get 503, /health turns 503 for load balancers)."""

    def __init__(self, config: uvicorn.Config, state: _State) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._state.draining = True
        super().handle_exit(sig, frame)


def make_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for `create_app`'s app; `.run()` serves until SIGTERM/SIGINT (or
    `should_exit`), waiting up to the app's shutdown timeout for in-flight requests."""
    state: _State = app.state.gemma
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(state.shutdown_timeout) or 1)
    return _Server(config, state)


def serve(engine: Any, *, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, request_timeout: float | None = None,
          shutdown_timeout: float = 30.0, log_level: str = "info",
          on_listen: Callable[[], None] | None = None) -> None:
    """Serve `engine` over HTTP until SIGTERM/SIGINT (`gemma serve`); `on_listen` runs once the
    address is bound."""
    app = create_app(engine, model_name=model_name, api_key=api_key, request_timeout=request_timeout,
                     shutdown_timeout=shutdown_timeout)
    # bound here rather than by uvicorn, which logs a bind failure and exits: an OSError here
    # reaches the CLI as one error line ("Address already in use")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    if on_listen is not None:
        on_listen()
    make_server(app, host=host, port=port, log_level=log_level).run(sockets=[sock])
