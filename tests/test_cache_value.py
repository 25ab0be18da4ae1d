"""The KV cache is a value: `forward(ids, cache=c)` leaves `c` as it was on every backend, so a
prefix cache forks into several continuations; `donate_cache=True` hands it over and leaves it
spent, and a spent cache is refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import exhaustive

import gemma_core
from gemma_core.errors import InputError

PREFIX, WINDOW, MAX_LENGTH = 7, 4, 13  # sliding rings of 4 slots wrap in the prefill already
ROWS = 2  # every test feeds [2, 7] and [2, 1] ids into caches of MAX_LENGTH: two compiles
# (a continuation by a chunk of several tokens: the conformance case fork-prefix-cache)

# the steps that update buffers in place (numpy, torch) or donate them (jax's jit), and the
# functional ones (tensorflow, jax eager); each is compared with the numpy reference
BACKENDS = [
    pytest.param(("numpy", {}), id="numpy"),
    pytest.param(("torch", {}), id="torch"),
    # compiled torch: the same host-side fork over inductor's step (67 s), exhaustive only
    exhaustive(("torch", {"compile": True}), id="torch-compiled"),
    pytest.param(("jax", {}), id="jax"),
    pytest.param(("jax", {"compile": False}), id="jax-eager", marks=pytest.mark.slow),
    pytest.param(("tensorflow", {}), id="tensorflow", marks=pytest.mark.slow),  # XLA: 4 s a shape
]


def _load(backend: str, **options: Any) -> gemma_core.Model:
    return gemma_core.load("tiny-gemma3", backend=backend, seed=3, sliding_window=WINDOW, **options)


@pytest.fixture(scope="module")
def ref() -> gemma_core.Model:
    return _load("numpy")


@pytest.fixture(scope="module", params=BACKENDS)
def model(request: pytest.FixtureRequest) -> gemma_core.Model:
    backend, options = request.param
    if backend != "numpy":
        pytest.importorskip(backend)
    return _load(backend, **options)


def _prefix(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 512, (ROWS, PREFIX))


def _close(model: gemma_core.Model, got: Any, want: Any) -> None:
    got, want = model.to_numpy(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * want.std()


def _same_state(a: Any, b: Any, exact: bool = True) -> None:
    assert a.length == b.length
    np.testing.assert_array_equal(a.seen, b.seen)
    for layer, (ka, kb, va, vb) in enumerate(zip(a.keys, b.keys, a.values, b.values, strict=True)):
        assert ka.shape == kb.shape, layer
        if exact:
            np.testing.assert_array_equal(ka, kb, err_msg=f"layer {layer}")
            np.testing.assert_array_equal(va, vb, err_msg=f"layer {layer}")
        else:
            np.testing.assert_allclose(ka, kb, atol=1e-5, err_msg=f"layer {layer}")
            np.testing.assert_allclose(va, vb, atol=1e-5, err_msg=f"layer {layer}")


def _continue(model: gemma_core.Model, cache: Any, tokens: np.ndarray,
              chunks: tuple[int, ...]) -> tuple[np.ndarray, Any]:
    logits, at = [], 0
    for size in chunks:
        out = model.forward(tokens[:, at:at + size], cache=cache)
        logits.append(model.to_numpy(out.logits))
        cache, at = out.cache, at + size
    return np.concatenate(logits, axis=1), cache


def test_forked_prefix_gives_each_continuation_the_full_forward(model: gemma_core.Model,
                                                                ref: gemma_core.Model) -> None:
    prefix = _prefix()
    shared = model.forward(prefix, max_length=MAX_LENGTH).cache
    before = model.export_cache(shared)
    rng = np.random.default_rng(1)
    for steps in (6, 4):
        tokens = rng.integers(3, 512, (ROWS, steps))
        got, cache = _continue(model, shared, tokens, (1,) * steps)
        full = ref.forward(np.concatenate([prefix, tokens], axis=1), max_length=MAX_LENGTH)
        _close(model, got, full.logits[:, PREFIX:])
        _same_state(model.export_cache(cache), ref.export_cache(full.cache), exact=False)
        _same_state(model.export_cache(shared), before)  # the prefix cache passed is unchanged


def test_donated_cache_is_spent_and_refused(model: gemma_core.Model) -> None:
    cache = model.forward(_prefix(), max_length=MAX_LENGTH).cache
    before = model.export_cache(cache)
    fork = model.copy_cache(cache)
    token = np.full((ROWS, 1), 9)
    out = model.forward(token, cache=fork, donate_cache=True)
    assert fork.spent and not out.cache.spent
    _same_state(model.export_cache(cache), before)  # the copy was handed over, not the original
    _close(model, out.logits, model.to_numpy(model.forward(token, cache=cache).logits))
    spent = "handed to forward\\(donate_cache=True\\).*pass a copy"
    with pytest.raises(InputError, match=spent):
        model.forward(token, cache=fork)
    with pytest.raises(InputError, match=spent):
        model.export_cache(fork)
    with pytest.raises(InputError, match=spent):
        model.copy_cache(fork)
    with pytest.raises(InputError, match=spent):
        model.generate([[10]] * ROWS, max_new_tokens=2, cache=fork)
    nxt = model.forward(token, cache=out.cache, donate_cache=True)  # the one returned goes on
    assert nxt.cache.length == PREFIX + 2


def test_a_step_that_fails_its_checks_does_not_spend_the_cache(ref: gemma_core.Model) -> None:
    cache = ref.forward(_prefix(), max_length=PREFIX + 1).cache
    with pytest.raises(InputError, match="exceed the cache's max_length"):
        ref.forward(np.ones((ROWS, 2), np.int64), cache=cache, donate_cache=True)
    assert not cache.spent
    ref.export_cache(cache)


def test_generate_from_a_cache_leaves_it_usable(model: gemma_core.Model, ref: gemma_core.Model) -> None:
    """generate(cache=c) twice from one prefix: the same tokens each time, the reference's, and
    `c` unchanged (the decode steps run on a copy of it); handed over, the same again."""
    prompts, kw = [[40], [50]], {"max_new_tokens": 3, "eos_token_ids": []}
    cache = model.forward(_prefix(), max_length=MAX_LENGTH).cache
    before = model.export_cache(cache)
    first = model.generate(prompts, cache=cache, **kw)
    second = model.generate(prompts, cache=cache, **kw)
    _same_state(model.export_cache(cache), before)
    want = ref.generate(prompts, cache=ref.forward(_prefix(), max_length=MAX_LENGTH).cache, **kw)
    assert first.token_ids == second.token_ids == want.token_ids
    handed = model.generate(prompts, cache=model.copy_cache(cache), donate_cache=True, **kw)
    assert handed.token_ids == first.token_ids
