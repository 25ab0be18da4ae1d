"""The OpenAI wire format of `gemma serve`: request bodies as pydantic models (OpenAI's field
names, ranges and defaults; unknown fields refused as OpenAI refuses them), the error body, and
the response and stream-chunk bodies built from the engine's `TokenEvent`s.

Kept apart from the HTTP layer (`server.py`) so that the format can be read, and tested, as data.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# OpenAI's own limits: 4 stop sequences, 20 top logprobs in chat (5 in completions; we allow
# chat's bound for both, the engine computes them alike).
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20



class APIError(Exception):
    """An error answered as OpenAI's body `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of the response (and of an SSE error event)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Body(BaseModel):
    # OpenAI answers an unknown parameter with 400 "Unrecognized request argument supplied"
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The fields completions and chat share."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, validate_default=True)  # a list once validated
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI parameters without an engine counterpart: accepted at their neutral value only, so
    # that clients sending the defaults (LangChain sends both penalties) work
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # structured output: {"type": "json_schema", "json_schema": {...}} or {"type": "json_object"}
    response_format: dict[str, Any] | None = None
    # extensions with vLLM's names
    top_k: int | None = Field(None, ge=0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @model_validator(mode="after")
    def _supported(self) -> _Sampling:
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise ValueError(f"{name}: only 0 is supported")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        # by hand rather than as a union: pydantic's union error names each branch it tried
        if isinstance(v, str):
            return v
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            return v[0]
        if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return v
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            raise ValueError(f"only one prompt per request is supported, got {len(v)}")
        raise ValueError("expected a string, a list of one string or a list of token ids")

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo: not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported")
        if self.suffix:
            raise ValueError("suffix: not supported")
        return self


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # fields a client echoes back from a response (refusal, annotations, ...) are ignored
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as `apply_chat_template` takes it (developer is OpenAI's new system)."""
        role = "system" if self.role == "developer" else self.role
        content = (self.content if isinstance(self.content, str) or self.content is None
                   else [p.model_dump() for p in self.content])
        return {"role": role, "content": content}


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self

    @property
    def token_budget(self) -> int | None:
        """max_completion_tokens (OpenAI's new name) or max_tokens (deprecated), if given."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _is_branch(part: object) -> bool:
    """Whether a pydantic error location part names a union branch rather than a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none"))


def validation_error(e: ValidationError) -> APIError:
    """OpenAI's 400 for the first problem pydantic found, naming the parameter."""
    errors = e.errors(include_url=False)
    err = errors[0]
    loc = tuple(err["loc"])
    tag = next((i for i, p in enumerate(loc) if _is_branch(p)), None)
    if tag is not None:  # a union: pydantic tried each branch ("str", "list[str]") at loc[:tag]
        path = ".".join(str(p) for p in loc[:tag])
        tried = dict.fromkeys(str(x["loc"][tag]) for x in errors
                              if tuple(x["loc"][:tag]) == loc[:tag] and len(x["loc"]) > tag)
        return APIError(400, f"{path}: expected {' or '.join(tried)}", param=path)
    path = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {path}", param=path)
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not path and ":" in msg:  # a model-level check names its field first
        path = msg.split(":", 1)[0]
    return APIError(400, f"{path}: {msg}" if path and not msg.startswith(path) else msg,
                    param=path or None)


# ---- responses ------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's finish_reason for the engine's ("stop" and "length" are the same words)."""
    return reason if reason in (None, "stop", "length") else "stop"


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_text(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    """A token's text and UTF-8 bytes as OpenAI's logprobs show them: a byte-fallback piece is
    its one byte (its text U+FFFD, as it cannot decode alone)."""
    piece = tokenizer.sp.id_to_piece(int(token_id))
    m = _BYTE_PIECE.fullmatch(piece)
    if m:
        return "\ufffd", [int(m.group(1), 16)]
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def chat_logprobs(tokenizer: Any, events: Sequence[Any]) -> dict[str, Any]:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for ev in events:
        text, raw = token_text(tokenizer, ev.token_id)
        tops = []
        for tid, lp in ev.top_logprobs:
            t, b = token_text(tokenizer, tid)
            tops.append({"token": t, "logprob": float(lp), "bytes": b})
        content.append({"token": text, "logprob": float(ev.logprob), "bytes": raw, "top_logprobs": tops})
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: Any, events: Sequence[Any], offset: int) -> dict[str, Any]:
    """Completions' `logprobs`: parallel lists tokens, token_logprobs, top_logprobs, text_offset
    (`offset`: characters of completion text before the first of `events`)."""
    tokens, lps, tops, offsets = [], [], [], []
    for ev in events:
        text, _ = token_text(tokenizer, ev.token_id)
        tokens.append(text)
        lps.append(float(ev.logprob))
        tops.append({token_text(tokenizer, tid)[0]: float(lp) for tid, lp in ev.top_logprobs})
        offsets.append(offset)
        offset += len(ev.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_body(rid: str, model: str, text: str, reason: str | None, logprobs: dict | None,
                    use: dict[str, int] | None, created: int | None = None) -> dict[str, Any]:
    """A /v1/completions response, or (reason None, or an empty text) one stream chunk."""
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}],
            "usage": use, "system_fingerprint": None}


def chat_body(rid: str, model: str, text: str, reason: str | None, logprobs: dict | None,
              use: dict[str, int], created: int | None = None) -> dict[str, Any]:
    """A /v1/chat/completions response."""
    message = {"role": "assistant", "content": text, "refusal": None}
    return {"id": rid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": reason}],
            "usage": use, "system_fingerprint": None}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any] | None, reason: str | None = None,
               logprobs: dict | None = None, use: dict[str, int] | None = None) -> dict[str, Any]:
    """One chat stream chunk; `delta=None` is the usage-only chunk (no choices), as OpenAI's."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": reason}]
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, "usage": use, "system_fingerprint": None}


def completion_usage_chunk(rid: str, model: str, created: int, use: dict[str, int]) -> dict[str, Any]:
    """The last completions stream chunk with stream_options.include_usage (no choices)."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
            "usage": use, "system_fingerprint": None}


def models_body(model: str, created: int) -> dict[str, Any]:
    """GET /v1/models."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "gemma-core"}]}
