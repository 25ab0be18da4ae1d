"""The JAX backend's own properties: a jitted step that does not retrace, the cache donated,
eager equal to jit (conformance and parity: test_backends.py)."""

from __future__ import annotations

import numpy as np
import pytest

import gemma_core

jax = pytest.importorskip("jax")


def test_jitted_decode_does_not_retrace_and_donates_the_cache() -> None:
    model = gemma_core.load("tiny-gemma3", backend="jax")
    out = model.forward(np.array([[2, 5, 6, 7]]), max_length=16, last_only=True)
    cache = out.cache
    traces = model._step.jitted._cache_size()  # type: ignore[attr-defined]
    for token in range(8, 18):
        old = cache.layers[0][0]
        cache = model.forward(np.array([[token]]), cache=cache, last_only=True, donate_cache=True).cache
        assert old.is_deleted()  # donated: XLA reused the buffer for the update
    assert model._step.jitted._cache_size() == traces + 1  # type: ignore[attr-defined]  # one decode trace


def test_eager_equals_jit() -> None:
    jitted = gemma_core.load("tiny-gemma3", backend="jax", tie_word_embeddings=False)
    eager = gemma_core.load("tiny-gemma3", backend="jax", compile=False, tie_word_embeddings=False)
    ids = np.array([[2, 5, 6, 7, 8]])
    np.testing.assert_allclose(jitted.to_numpy(jitted.forward(ids).logits),
                               eager.to_numpy(eager.forward(ids).logits), atol=1e-5)


def test_generation_buckets_prompt_lengths() -> None:
    """Prompts of 5 and 9 tokens share one compiled prefill and one decode step, and give the
    reference's tokens (left padding to the bucket changes no logits)."""
    model = gemma_core.load("tiny-gemma3", backend="jax", tie_word_embeddings=False)
    ref = gemma_core.load("tiny-gemma3", tie_word_embeddings=False)
    kw = {"max_new_tokens": 6, "eos_token_ids": []}
    first = model.generate([list(range(2, 7))], **kw)
    traces = model._step.jitted._cache_size()  # type: ignore[attr-defined]
    second = model.generate([list(range(2, 11))], **kw)
    assert model._step.jitted._cache_size() == traces  # type: ignore[attr-defined]
    assert first.token_ids == ref.generate([list(range(2, 7))], **kw).token_ids
    assert second.token_ids == ref.generate([list(range(2, 11))], **kw).token_ids


def test_whole_loop_decoding_equals_the_host_loop() -> None:
    from backends.jax.loop import generate_loop

    model = gemma_core.load("tiny-gemma3", backend="jax", tie_word_embeddings=False)
    prompts = [[2, 10, 20, 30, 40], [2, 11]]
    host = model.generate(prompts, max_new_tokens=12, eos_token_ids=[]).token_ids
    loop = generate_loop(model, prompts, 12)
    assert loop.tolist() == host
    a = generate_loop(model, prompts, 12, temperature=1.0, top_k=20, seed=3)
    b = generate_loop(model, prompts, 12, temperature=1.0, top_k=20, seed=3)
    c = generate_loop(model, prompts, 12, temperature=1.0, top_k=20, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_tensor_parallel_sharding_on_virtual_devices() -> None:
    """Two virtual CPU devices, heads and MLP width split over them: the same logits, prefill
    and decode."""
    import os
    import subprocess
    import sys

    code = (
        "import jax, numpy as np, gemma_core\n"
        "from jax.sharding import Mesh\n"
        "from backends.jax.sharding import shard_model\n"
        "assert len(jax.devices()) == 2, jax.devices()\n"
        "ids = np.array([[2, 5, 6, 7, 8, 9, 10, 11, 12, 13]])\n"
        "one = gemma_core.load('tiny-gemma3', backend='jax')\n"
        "ref = one.to_numpy(one.forward(ids).logits)\n"
        "tp = shard_model(gemma_core.load('tiny-gemma3', backend='jax'), Mesh(jax.devices(), ('tp',)))\n"
        "spec = tp.weights['model.layers.0.mlp.up_proj.weight'].sharding.spec\n"
        "assert tuple(spec) == ('tp', None), spec\n"
        "out = tp.forward(ids[:, :6], max_length=10)\n"
        "got = [tp.to_numpy(out.logits)]\n"
        "cache = out.cache\n"
        "for t in range(6, 10):\n"
        "    o = tp.forward(ids[:, t:t + 1], cache=cache)\n"
        "    cache = o.cache\n"
        "    got.append(tp.to_numpy(o.logits))\n"
        "print(float(np.abs(np.concatenate(got, 1) - ref).max()))\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5
