"""The continuous-batching engine: every response equals its single-request output while
requests join, leave, queue, shift and compact the batch; cache row splicing and slot shifts
change no logit; cancellation, errors and shutdown end requests cleanly."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
from conftest import exhaustive
from serving_helpers import wait_idle

import gemma_core
from gemma_core.cache import shift_slots, write_row
from gemma_core.errors import InputError
from gemma_core.serving.engine import (
    Engine,
    EngineClosed,
    QueueFull,
    SamplingParams,
    TokenEvent,
)

# the whole engine on jax and tensorflow takes minutes of compiles or eager dispatch: their cache
# hooks (write_cache_row, shift_cache_layer) are proven by the splice test on every backend
BACKENDS = ["numpy", "torch", exhaustive("jax", id="jax"), exhaustive("tensorflow", id="tensorflow"),
            exhaustive("jax-jit", id="jax-jit"), exhaustive("tensorflow-xla", id="tensorflow-xla")]
OPTIONS = {"torch": {}, "jax": {"compile": False}, "tensorflow": {"compile": False},
           "jax-jit": {}, "tensorflow-xla": {}}


@pytest.fixture(scope="module")
def tiny3() -> gemma_core.Model:
    """tiny-gemma3: sliding window 8, so rows wrap their rings within a few steps."""
    return gemma_core.load("tiny-gemma3", backend="numpy", seed=5)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=int(rng.integers(1, 14))).tolist() for _ in range(n)]


def _greedy(model: gemma_core.Model, prompt: list[int], n: int) -> list[int]:
    out = model.generate([prompt], max_new_tokens=n, eos_token_ids=[])
    return out.token_ids[0]


def _collect(engine: Engine, prompts: list[list[int]],
             params: list[SamplingParams]) -> list[list[TokenEvent]]:
    events: list[list[TokenEvent]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def listener(i: int):  # type: ignore[no-untyped-def]
        def on_event(ev: TokenEvent) -> None:
            events[i].append(ev)
            if ev.finish_reason is not None:
                done.release()
        return on_event

    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.submit(p, sp, listener(i))
    engine.start()  # after every submit: the same joins on every backend, however fast
    for _ in prompts:
        assert done.acquire(timeout=120)
    return events


@pytest.mark.parametrize("backend", BACKENDS)
def test_responses_equal_single_requests(backend: str, tiny3: gemma_core.Model) -> None:
    """More requests than rows, prompts of different lengths (the batch shifts later for long
    ones), few slots (the batch compacts), a window of 8 (rings wrap): each greedy response
    equals `generate` of its prompt alone."""
    model = tiny3 if backend == "numpy" else gemma_core.load(
        "tiny-gemma3", backend=backend.split("-")[0], seed=5, **OPTIONS[backend])
    prompts = _prompts(7)
    lengths = [15, 25, 6, 20, 12, 3, 22]
    engine = Engine(model, max_batch=3, max_queue=16, context=40, slots=44)
    try:
        events = _collect(engine, prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
                                            for n in lengths])
        assert engine.metrics().compactions_total > 0
    finally:
        engine.shutdown()
    for p, n, evs in zip(prompts, lengths, events, strict=True):
        assert [e.token_id for e in evs] == _greedy(tiny3, p, n)
        assert [e.finish_reason for e in evs] == [None] * (n - 1) + ["length"]


def test_device_greedy_rows_beside_rows_that_need_the_logits(tiny3: gemma_core.Model) -> None:
    """All-plain-greedy steps reduce on the device (Model.greedy_tokens); a step with a logprobs
    row takes the host path for every row: tokens equal generate's either way."""
    prompts = _prompts(3, seed=4)
    seen: list[int] = []
    reduce = tiny3.backend.greedy_tokens
    tiny3.backend.greedy_tokens = lambda logits: seen.append(1) or reduce(logits)  # type: ignore[method-assign]
    engine = Engine(tiny3, max_batch=4)
    try:
        plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        events = _collect(engine, prompts, [plain, SamplingParams(max_tokens=3, temperature=0,
                                                                  ignore_eos=True, logprobs=0), plain])
    finally:
        engine.shutdown()
        del tiny3.backend.greedy_tokens
    assert 0 < len(seen) < 5  # of 5 decode steps: the host while the logprobs row ran, then the device
    assert [e.token_id for e in events[1]] == _greedy(tiny3, prompts[1], 3)
    assert all(e.logprob is not None for e in events[1])
    for i in (0, 2):
        assert [e.token_id for e in events[i]] == _greedy(tiny3, prompts[i], 6)
        assert all(e.logprob is None for e in events[i])


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax", "tensorflow", "array_api"])
def test_row_splice_and_shift_change_no_logit(backend: str) -> None:
    """A prompt prefilled at an offset and spliced into a batch row, then shifted, decodes the
    same logits as the prompt alone (the backends' cache hooks, and the host path of array_api)."""
    model = gemma_core.load("tiny-gemma3", backend=backend, seed=5,
                            **({"compile": False} if backend in ("jax", "tensorflow") else {}))
    prompt = _prompts(1, seed=3)[0] + [7, 8, 9, 10, 11, 12, 13, 14, 15]
    alone = model.forward([prompt], max_length=40)
    nxt = int(np.argmax(model.to_numpy(alone.logits)[0, -1]))
    ref = model.to_numpy(model.forward([[nxt]], cache=alone.cache).logits)[0, -1]
    big = model.new_cache(2, 40)
    big = dataclasses.replace(big, length=len(prompt) + 6)
    src = dataclasses.replace(model.new_cache(1, 40), length=6)
    src = model.forward([prompt], cache=src).cache
    big = write_row(model.backend, big, 1, src, 0, model.dtype, model.device)
    for shift in (0, 4, -10):
        moved = shift_slots(model.backend, model.copy_cache(big), shift, model.dtype, model.device)
        out = model.forward([[0], [nxt]], [[0], [1]], moved)
        np.testing.assert_allclose(model.to_numpy(out.logits)[1, -1], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="drop real tokens"):
        shift_slots(model.backend, big, 7, model.dtype, model.device)


def test_sampling_logprobs_stop_and_eos(tiny3: gemma_core.Model, tiny_model_folder) -> None:  # type: ignore[no-untyped-def]
    model = gemma_core.load(tiny_model_folder, backend="numpy")
    engine = Engine(model, max_batch=2, context=64)
    engine.start()
    try:
        prompt = model.tokenizer.encode("hello world")
        sampled = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
        a = [e.token_id for e in engine.stream(prompt, sampled)]
        b = [e.token_id for e in engine.stream(prompt, sampled)]
        assert a == b  # a seed fixes the draw, whatever else runs in the batch
        evs = list(engine.stream(prompt, SamplingParams(max_tokens=6, temperature=0, logprobs=3)))
        ref = model.generate([prompt], max_new_tokens=6, output_scores=True, top_logprobs=3)
        assert [e.token_id for e in evs] == ref.token_ids[0]
        np.testing.assert_allclose([e.logprob for e in evs], ref.logprobs[0], rtol=1e-4, atol=1e-4)
        tops = [[t for t, _ in r] for r in ref.top_logprobs[0]]
        assert [[t for t, _ in e.top_logprobs] for e in evs] == tops
        assert "".join(e.text for e in evs) == ref.texts[0]
        full = ref.texts[0]
        if len(full) > 2:
            stop = full[1:3]
            evs = list(engine.stream(prompt, SamplingParams(max_tokens=6, temperature=0, stop=(stop,))))
            assert evs[-1].finish_reason == "stop" and "".join(e.text for e in evs) == full[:full.find(stop)]
    finally:
        engine.shutdown()


def test_cancel_queue_full_and_shutdown(tiny3: gemma_core.Model) -> None:
    engine = Engine(tiny3, max_batch=1, max_queue=2, context=200)  # not started: both wait
    long = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)
    got: list[TokenEvent] = []
    first = threading.Event()

    def on_event(ev: TokenEvent) -> None:
        got.append(ev)
        first.set()

    running = engine.submit([5, 6, 7], long, on_event)
    queued = engine.submit([5, 6], long, lambda ev: None)
    with pytest.raises(QueueFull):
        engine.submit([5], long, lambda ev: None)
    engine.start()
    assert first.wait(30)
    running.cancel()
    queued.cancel()
    assert running.done.wait(30) and queued.done.wait(30)
    assert got[-1].finish_reason == "cancelled" and len(got) < 150
    assert wait_idle(engine)
    with pytest.raises(InputError, match="context"):
        engine.submit([1] * 100, SamplingParams(max_tokens=101), lambda ev: None)
    with pytest.raises(InputError, match="token ids"):
        engine.submit([10**6], SamplingParams(), lambda ev: None)
    with pytest.raises(InputError, match="temperature"):
        SamplingParams(temperature=-1)
    engine.shutdown()
    with pytest.raises(EngineClosed):
        engine.submit([5], long, lambda ev: None)


def _view(model: gemma_core.Model, forward) -> object:  # type: ignore[no-untyped-def]
    """A view of `model` for an engine, with another `forward`."""
    view = type("M", (), {})()
    for name in ("config", "tokenizer", "backend", "dtype", "device", "static_shapes", "new_cache",
                 "to_numpy", "greedy_tokens"):
        setattr(view, name, getattr(model, name))
    view.forward = forward
    return view


def test_a_request_being_prefilled_is_counted_and_cancelled(tiny3: gemma_core.Model) -> None:
    """Between the queue and the batch (its prefill running) a request is active in `metrics()`,
    so the engine never looks idle while it holds work, and `shutdown(cancel=True)` ends it."""
    entered, release = threading.Event(), threading.Event()

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        entered.set()
        assert release.wait(30)
        return tiny3.forward(*args, **kwargs)

    engine = Engine(tiny3, max_batch=2, context=200)
    engine.model = _view(tiny3, slow)
    events: list[TokenEvent] = []
    request = engine.submit([4, 5, 6], SamplingParams(max_tokens=150, temperature=0, ignore_eos=True),
                            events.append)
    engine.start()
    assert entered.wait(30)
    m = engine.metrics()
    assert (m.queue_depth, m.active) == (0, 1) and not wait_idle(engine, 0.2)
    closing = threading.Thread(target=engine.shutdown, kwargs={"cancel": True})
    closing.start()
    time.sleep(0.1)
    release.set()
    closing.join(30)
    assert not closing.is_alive() and request.done.is_set()
    assert events[-1].finish_reason == "cancelled" and len(events) < 150
    assert engine.metrics().active == 0


def test_a_failing_step_ends_its_requests_and_the_engine_goes_on(tiny3: gemma_core.Model) -> None:
    engine = Engine(tiny3, max_batch=2, context=32)
    real, calls = tiny3.forward, []

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    engine.model = _view(tiny3, flaky)
    engine.start()
    try:
        evs = list(engine.stream([4, 5], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
        assert evs[-1].finish_reason == "error" and "device lost" in evs[-1].error
        again = [e.token_id for e in engine.stream([4, 5], SamplingParams(max_tokens=4, temperature=0,
                                                                           ignore_eos=True))]
        assert again == _greedy(tiny3, [4, 5], 4)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_prefix_cache_hits_give_the_same_tokens(backend: str, tiny3: gemma_core.Model) -> None:
    """Prompts sharing a long prefix (a system prompt; a chat's next turn) start from the cached
    prefix, within the window (crop) and past it (the whole entry); tokens equal generate's."""
    model = tiny3 if backend == "numpy" else gemma_core.load("tiny-gemma3", backend=backend, seed=5)
    rng = np.random.default_rng(9)
    system = rng.integers(3, 500, 20).tolist()  # longer than the window of 8: rings wrapped
    first = [*system, 11, 12, 13]
    turn = [*first, 14, 15]  # begins with the whole first prompt: no crop needed
    short = [*system[:6], 40, 41]  # shares 6 < smallest
    window = rng.integers(3, 500, 5).tolist()
    alike = [[*window, 50, 51], [*window, 60]]  # share 5 tokens, 7 stored within the window: cropped
    engine = Engine(model, max_batch=2, context=48, prefix_cache=4)
    engine.start()
    try:
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        for prompt in (first, turn, short):
            assert [e.token_id for e in engine.stream(prompt, params)] == _greedy(tiny3, prompt, 6)
        assert engine.metrics().prefix_hits_total == 1 and engine.metrics().prefix_tokens_total == 23
        engine._prefix.smallest = 4  # type: ignore[union-attr]
        for prompt in alike:
            assert [e.token_id for e in engine.stream(prompt, params)] == _greedy(tiny3, prompt, 6)
        assert engine.metrics().prefix_hits_total == 2  # the crop to 5: no ring had wrapped
    finally:
        engine.shutdown()


def test_the_batch_rows_follow_the_load(tiny3: gemma_core.Model) -> None:
    """A step computes every row: a lone request runs in a batch of one, a burst grows the batch
    (to a power of two), and it shrinks back once a quarter of its rows would do."""
    engine = Engine(tiny3, max_batch=8, context=40)
    seen: list[int] = []
    engine.submit([4, 5, 6], SamplingParams(max_tokens=3, temperature=0),
                  lambda ev: seen.append(len(engine._rows)))
    engine.start()
    try:
        assert wait_idle(engine, 60) and seen == [1, 1, 1]
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in range(2, 8)]
        events = _collect(engine, _prompts(6, seed=2), params)
        assert [len(e) for e in events] == list(range(2, 8)) and wait_idle(engine, 60)
        assert len(engine._rows) <= 2  # 8 rows for the six, shrunk as they finished
    finally:
        engine.shutdown()
