"""`gemma serve`: the OpenAI-compatible server, driven by the official `openai` client (and
httpx for raw bodies) on loopback, over the real batching engine and the tiny random-weight
model with its test tokenizer. Greedy answers must equal `model.generate(..., do_sample=False)`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serving_helpers import wait_idle  # noqa: E402

import gemma_core  # noqa: E402
from gemma_core.serving.engine import Engine  # noqa: E402
from gemma_core.serving.server import create_app, make_server  # noqa: E402

KEY = "test-key"
NAME = "tiny"


@pytest.fixture(scope="module")
def model(tiny_model_folder: Path) -> Any:
    return gemma_core.load(tiny_model_folder)


class _Slow:
    """The model with every forward held while `gate` is closed and `delay` seconds slower:
    requests that last long enough to be queued behind, disconnected from or timed out."""

    def __init__(self, model: Any, delay: float = 0.0) -> None:
        self._model, self.delay = model, delay
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(15), "the test never opened the gate"
        time.sleep(self.delay)
        return self._model.forward(*args, **kwargs)


@dataclasses.dataclass
class Served:
    url: str
    engine: Engine
    server: Any
    thread: threading.Thread
    clients: list[Any] = dataclasses.field(default_factory=list)  # closed when serving ends

    def client(self, key: str | None = KEY) -> Any:
        """An openai client of the server, closed with it (a client dropped with its connection
        open warns of an unclosed socket wherever the garbage collector happens to run)."""
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=20)
        self.clients.append(client)
        return client

    def post(self, path: str, body: Any, key: str | None = KEY, timeout: float = 20) -> Any:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers=headers, timeout=timeout)


@contextlib.contextmanager
def serving(model: Any, *, max_batch: int = 4, max_queue: int = 16, request_timeout: float | None = None,
            api_key: str | None = KEY) -> Iterator[Served]:
    """The server on a free loopback port in a thread, stopped (gracefully) at the end."""
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue)
    app = create_app(engine, model_name=NAME, api_key=api_key, request_timeout=request_timeout,
                     shutdown_timeout=5)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = make_server(app, host="127.0.0.1", port=sock.getsockname()[1], log_level="error")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "the server did not start"
        time.sleep(0.01)
    served = Served(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, server, thread)
    try:
        yield served
    finally:
        for client in served.clients:
            client.close()
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def served(model: Any) -> Iterator[Served]:
    with serving(model) as s:
        yield s


def _greedy(model: Any, ids: list[int], n: int, **kwargs: Any) -> Any:
    return model.generate([ids], max_new_tokens=n, do_sample=False, **kwargs)


# ---- answers ----------------------------------------------------------------------------------

def test_completion_is_generate_greedy(served: Served, model: Any) -> None:
    out = served.client().completions.create(model=NAME, prompt="Hello world", max_tokens=12, temperature=0)
    ids = model.tokenizer.encode("Hello world")
    ref = _greedy(model, ids, 12)
    assert out.object == "text_completion" and out.model == NAME
    assert out.choices[0].text == ref.texts[0]
    assert out.choices[0].finish_reason == ("length" if ref.finish_reasons[0] == "length" else "stop")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(ref.token_ids[0]))
    # a list of one prompt, and token ids, are the same request
    for prompt in (["Hello world"], ids):
        again = served.client().completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert again.choices[0].text == ref.texts[0]


def test_completion_stream_is_the_same_text(served: Served, model: Any) -> None:
    ref = _greedy(model, model.tokenizer.encode("The year"), 20, eos_token_ids=[])
    chunks = list(served.client().completions.create(
        model=NAME, prompt="The year", max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.texts[0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # streamed, not one lump


def test_chat_is_generate_greedy_on_the_template(served: Served, model: Any) -> None:
    messages = [{"role": "user", "content": "Café naïve résumé"}]
    ids = model.tokenizer.apply_chat_template(messages, tokenize=True)
    ref = _greedy(model, ids, 15)
    client = served.client()
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=15, temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.texts[0]
    assert out.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=15,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.texts[0]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_four_concurrent_streams_each_equal_their_own_generate(served: Served, model: Any) -> None:
    prompts = ["The year 2024", "for i in range(10):", "Emoji 😀 and CJK 你好", "a  b   c"]
    texts: dict[int, str] = {}

    def run(i: int) -> None:
        stream = served.client().completions.create(model=NAME, prompt=prompts[i], max_tokens=24 + 3 * i,
                                                    temperature=0, stream=True)
        texts[i] = "".join(c.choices[0].text for c in stream)

    before = served.engine.metrics()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for i, p in enumerate(prompts):
        assert texts[i] == _greedy(model, model.tokenizer.encode(p), 24 + 3 * i).texts[0], p
    assert wait_idle(served.engine, 5.0)
    after = served.engine.metrics()
    # batched: fewer decode steps than tokens after the first of each (one request at a time: equal)
    tokens = after.tokens_generated_total - before.tokens_generated_total
    assert after.steps_total - before.steps_total < tokens - 4


def test_logprobs_are_generates_scores(served: Served, model: Any) -> None:
    ids = model.tokenizer.encode("Hello world")
    ref = _greedy(model, ids, 8, eos_token_ids=[], output_scores=True, top_logprobs=3)
    out = served.client().completions.create(model=NAME, prompt="Hello world", max_tokens=8, temperature=0,
                                             logprobs=3, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    shown = [t for t in ref.token_ids[0] if not model.tokenizer.is_special(t)]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(shown)
    keep = [j for j, t in enumerate(ref.token_ids[0]) if not model.tokenizer.is_special(t)]
    assert lp.token_logprobs == pytest.approx([ref.logprobs[0][j] for j in keep], abs=1e-4)
    for j, tops in zip(keep, lp.top_logprobs, strict=True):
        assert len(tops) <= 3
        assert max(tops.values()) == pytest.approx(ref.logprobs[0][j], abs=1e-4)  # greedy: the best
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    chat = served.client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


def test_stop_strings_cut_the_text(served: Served, model: Any) -> None:
    # seeded sampling: greedy text of random weights repeats one token, too plain to cut
    ids = model.tokenizer.encode("Hello")
    sample = {"max_new_tokens": 30, "temperature": 1.0, "seed": 7, "eos_token_ids": []}
    full = model.generate([ids], **sample).texts[0]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip() and full.index(stop) > 0, f"pick another prompt: {full!r}"
    ref = model.generate([ids], **sample, stop_strings=[stop]).texts[0]
    assert ref == full[:full.index(stop)]
    client = served.client()
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 30, "temperature": 1.0, "seed": 7,
            "extra_body": {"ignore_eos": True}}
    assert client.completions.create(**body).choices[0].text == full  # the engine samples as generate
    out = client.completions.create(**body, stop=stop)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (ref, "stop")
    stream = client.completions.create(**body, stop=[stop, "\x00never"], stream=True)
    assert "".join(c.choices[0].text for c in stream) == ref
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=30, temperature=1.0, seed=7, stop=[stop],
                                          extra_body={"ignore_eos": True})
    assert stop not in chat.choices[0].message.content


def test_seeded_sampling_repeats(served: Served) -> None:
    client = served.client()
    runs = [client.completions.create(model=NAME, prompt="Once", max_tokens=10, temperature=1.0,
                                      top_p=0.9, seed=7, extra_body={"top_k": 20}).choices[0].text
            for _ in range(2)]
    assert runs[0] == runs[1]


# ---- errors -----------------------------------------------------------------------------------

def test_response_format_constrains_the_answer(served: Served) -> None:
    """A JSON schema in `response_format` (chat and completions): sampled answers of the random
    model parse and follow the schema (structured output, gemma_core.structured)."""
    pytest.importorskip("llguidance")
    # a finite language: once complete only eos is allowed, so every answer ends there
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"enum": ["x", "y"]}},
              "required": ["a", "b"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    client = served.client()
    for seed in (1, 2):
        chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=60, seed=seed, response_format=fmt)
        text = client.completions.create(model=NAME, prompt="x", max_tokens=60, seed=seed,
                                         extra_body={"response_format": fmt}).choices[0]
        for answer, reason in ((chat.choices[0].message.content, chat.choices[0].finish_reason),
                               (text.text, text.finish_reason)):
            value = json.loads(answer)
            assert reason == "stop" and set(value) == {"a", "b"}
            assert isinstance(value["a"], bool) and value["b"] in ("x", "y")
    r = served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                             "response_format": {"type": "json_schema", "json_schema": {
                                                 "schema": {"type": "frob"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_api_key_is_required_on_v1(served: Served) -> None:
    with pytest.raises(openai.AuthenticationError):
        served.client("wrong").completions.create(model=NAME, prompt="x", max_tokens=2)
    r = served.post("/v1/completions", {"prompt": "x"}, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(served.url + "/v1/models").status_code == 401
    models = served.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}  # monitoring needs no key


@pytest.mark.parametrize(("body", "param", "words"), [
    ('{"prompt": "x", ', None, "parse the JSON"),
    ('["prompt"]', None, "JSON object"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
    ({"prompt": "x", "n": 2}, "n", "n=1"),
    ({"prompt": ["a", "b"]}, "prompt", "one prompt"),
    ({"prompt": [{"a": 1}]}, "prompt", "token ids"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "x", "temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"prompt": "x", "top_p": 0}, "top_p", "greater than 0"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "x", "stop": 5}, "stop", "expected str or list[str]"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "20"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ({"prompt": "x", "max_tokens": 400}, "prompt", "maximum context length is 256 tokens"),
    ({"prompt": "word " * 300}, "prompt", "maximum context length is 256 tokens"),
    ({"prompt": [70000]}, "prompt", "vocabulary"),
])
def test_bad_completion_requests_are_400_with_openai_bodies(served: Served, body: Any, param: str | None,
                                                           words: str) -> None:
    r = served.post("/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),  # the template refuses it
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
])
def test_bad_chat_requests_are_400(served: Served, body: Any, param: str) -> None:
    r = served.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_and_path_are_404(served: Served) -> None:
    with pytest.raises(openai.NotFoundError):
        served.client().completions.create(model="gpt-4", prompt="x", max_tokens=2)
    r = httpx.get(served.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_an_unexpected_error_is_a_500_body_and_the_server_carries_on(served: Served, model: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def __getattr__(self, name: str) -> Any:
            return getattr(model.tokenizer, name)

        def encode(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("boom")

    monkeypatch.setattr(served.engine, "tokenizer", Broken())
    r = served.post("/v1/completions", {"prompt": "x"})
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert served.post("/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_full_queue_is_429_with_retry_after(model: Any) -> None:
    slow = _Slow(model)
    with serving(slow, max_batch=1, max_queue=1) as s:
        slow.gate.clear()
        results: list[Any] = []
        body = {"prompt": "Hello", "max_tokens": 3}
        first = threading.Thread(target=lambda: results.append(s.post("/v1/completions", body)))
        first.start()
        assert slow.entered.wait(10)  # the engine holds the first request in the batch
        second = threading.Thread(target=lambda: results.append(s.post("/v1/completions", body)))
        second.start()
        end = time.monotonic() + 10
        while s.engine.metrics().queue_depth < 1:
            assert time.monotonic() < end
            time.sleep(0.01)
        r = s.post("/v1/completions", body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        slow.gate.set()
        first.join(20)
        second.join(20)
        assert [x.status_code for x in results] == [200, 200]


def test_a_client_leaving_mid_stream_frees_its_slot(model: Any) -> None:
    slow = _Slow(model, delay=0.02)  # 200 tokens would take >4 s
    with serving(slow) as s:
        body = {"prompt": "Hello", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", content=json.dumps(body),
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=20) as r:
            got = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(line)
                if len(got) == 3:
                    break
            assert s.engine.metrics().active == 1  # still decoding when the client leaves
        assert wait_idle(s.engine, 3.0), "the disconnected request still holds its slot"
        assert s.engine.metrics().tokens_generated_total < 150
        text = httpx.get(s.url + "/metrics").text
        assert "gemma_client_disconnects_total 1.0" in text


def test_a_client_leaving_a_plain_request_frees_its_slot(model: Any) -> None:
    slow = _Slow(model, delay=0.02)
    with serving(slow) as s:
        with pytest.raises(httpx.TimeoutException):
            s.post("/v1/completions", {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True},
                   timeout=0.5)
        assert wait_idle(s.engine, 3.0), "the abandoned request still holds its slot"
        assert s.engine.metrics().tokens_generated_total < 150


def test_a_body_over_the_limit_is_413(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    from gemma_core.serving import server

    monkeypatch.setattr(server, "MAX_BODY_BYTES", 100)
    r = served.post("/v1/completions", {"prompt": "x" * 200})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_the_request_timeout_cancels(model: Any) -> None:
    slow = _Slow(model, delay=0.05)
    with serving(slow, request_timeout=0.3) as s:
        r = s.post("/v1/completions", {"prompt": "Hello", "max_tokens": 100, "ignore_eos": True})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        with pytest.raises(openai.APIError, match="request timeout"):
            list(s.client().completions.create(model=NAME, prompt="Hello", max_tokens=100, stream=True,
                                               extra_body={"ignore_eos": True}))
        assert wait_idle(s.engine, 5.0)


def test_shutdown_lets_a_running_stream_finish(model: Any) -> None:
    import signal

    slow = _Slow(model, delay=0.01)
    with serving(slow) as s:
        chunks: list[Any] = []

        def run() -> None:
            chunks.extend(s.client().completions.create(model=NAME, prompt="Hello", max_tokens=40,
                                                        stream=True, extra_body={"ignore_eos": True}))

        t = threading.Thread(target=run)
        t.start()
        end = time.monotonic() + 10
        while s.engine.metrics().active == 0:
            assert time.monotonic() < end
            time.sleep(0.01)
        s.server.handle_exit(signal.SIGTERM, None)  # what uvicorn does on SIGTERM
        t.join(15)
        s.thread.join(15)
        assert not s.thread.is_alive()
        assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
        assert sum(1 for c in chunks if c.choices[0].text) > 0
        assert s.engine.metrics().tokens_generated_total == 40
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=2)


# ---- monitoring -------------------------------------------------------------------------------

def test_metrics_parse_as_prometheus_text(served: Served) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    served.client().completions.create(model=NAME, prompt="Hello", max_tokens=4)
    r = httpx.get(served.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("gemma_queue_depth", "gemma_active_requests", "gemma_max_batch", "gemma_generation_tokens",
                 "gemma_prompt_tokens", "gemma_request_duration_seconds", "gemma_time_to_first_token_seconds",
                 "gemma_http_responses"):
        assert name in families, name
    value = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    assert value["gemma_max_batch"] == 4 and value["gemma_generation_tokens_total"] >= 4
    counts = [s.value for s in families["gemma_request_duration_seconds"].samples
              if s.name.endswith("_count") and s.labels["endpoint"] == "completions"]
    assert counts and counts[0] >= 1
    ok = [s for s in families["gemma_http_responses"].samples
          if s.labels.get("path") == "/v1/completions" and s.labels.get("status") == "200"]
    assert ok and ok[0].value >= 1


def test_serve_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from gemma_core.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", "--model", "tiny-gemma3"]) == 2
    assert "gemma-core[serve]" in capsys.readouterr().err
