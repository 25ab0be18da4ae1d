"""The JAX face `backends.jax.as_function(model) -> (apply, params)` and its Flax NNX module, on
random weights of the tiny presets: logits equal the NumPy reference, the loss and every
parameter's gradient equal transformers' (autograd, float32) on the same weights and labels, jit
equals eager, SGD lowers the loss, bfloat16 runs. Each config is compiled once (module fixture:
one jitted value-and-grad that also returns the logits)."""

from __future__ import annotations

import functools
import itertools
from typing import Any

import numpy as np
import pytest
from hf_reference import face_configs, left_padded_batch

import gemma_core
from gemma_core.errors import ConfigError
from gemma_core.layout import iter_params
from gemma_core.quant import QuantConfig
from gemma_core.weights import random_weights

jax = pytest.importorskip("jax")
jnp = jax.numpy

from backends.jax import as_function  # noqa: E402  (after the skip: needs jax)

CONFIGS = face_configs()
B, T, PAD = 2, 12, 3  # row 1 is left-padded by PAD tokens: longer than tiny-gemma2/3's window 8


def _batch(config: gemma_core.GemmaConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return left_padded_batch(config, B, T, PAD)


class Face:
    """One config's model, (apply, params), batch and compiled value-and-grad."""

    def __init__(self, key: str) -> None:
        self.key, self.config = key, CONFIGS[key]
        self.weights = random_weights(self.config, 0)
        self.model = gemma_core.Model(self.config, self.weights, backend="numpy")
        self.apply, self.params = as_function(self.model)
        self.ids, self.mask, self.labels = _batch(self.config)

        def loss(params: Any, ids: Any, mask: Any, labels: Any) -> tuple[Any, Any]:
            out = self.apply(params, ids, mask, labels)
            return out["loss"], out["logits"]

        self.value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def run(self, params: Any = None, labels: Any = None) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
        """(loss, logits, grads) of the compiled function."""
        (loss, logits), grads = self.value_and_grad(self.params if params is None else params,
                                                    self.ids, self.mask,
                                                    self.labels if labels is None else labels)
        return float(loss), np.asarray(logits), {k: np.asarray(v) for k, v in grads.items()}


# one Face per config and module run (tests that change no variable share it)
get_face = functools.lru_cache(maxsize=None)(Face)


@pytest.fixture(scope="module", params=list(CONFIGS))
def face(request: pytest.FixtureRequest) -> Face:
    return get_face(request.param)


@pytest.fixture(scope="module")
def compiled(face: Face) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
    return face.run()


def test_params_are_canonical_unfused_float32(face: Face) -> None:
    expected = {name: shape for name, shape, _ in iter_params(face.config)}
    assert {k: tuple(v.shape) for k, v in face.params.items()} == expected
    for name, value in face.params.items():
        assert value.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(value), face.weights[name])


def test_params_of_a_fused_torch_model_are_split_back() -> None:
    """The torch backend runs q/k/v and gate/up as one stacked product; the face unfuses them."""
    pytest.importorskip("torch")
    config = CONFIGS["tiny-gemma3"]
    weights = random_weights(config, 0)
    model = gemma_core.Model(config, weights, backend="torch")
    assert model.backend.fuse_projections
    _, params = as_function(model)
    assert set(params) == {name for name, _, _ in iter_params(config)}
    for name, value in params.items():
        np.testing.assert_array_equal(np.asarray(value), weights[name])


def test_logits_equal_the_numpy_reference(face: Face,
                                          compiled: tuple[float, np.ndarray, dict[str, np.ndarray]]) -> None:
    ref = face.model.forward(face.ids, face.mask).logits
    real = face.mask == 1  # padding positions see no key: their logits mean nothing
    got = compiled[1]
    assert got.shape == ref.shape == (B, T, face.config.vocab_size)
    scale = np.abs(ref[real]).max()
    np.testing.assert_allclose(got[real], ref[real], rtol=0, atol=1e-5 * scale)


def test_jit_equals_eager() -> None:
    """Op by op (slow to run on the CPU: one config) as compiled."""
    face = get_face("tiny-gemma")
    loss, logits, _ = face.run()
    eager = face.apply(face.params, jnp.asarray(face.ids), jnp.asarray(face.mask), jnp.asarray(face.labels))
    np.testing.assert_allclose(logits, np.asarray(eager["logits"]), rtol=0, atol=1e-5)
    assert loss == pytest.approx(float(eager["loss"]), rel=1e-6)


def test_without_labels_the_loss_is_none_under_jit_too() -> None:
    face = get_face("tiny-gemma")
    _, logits, _ = face.run()
    out = jax.jit(face.apply)(face.params, face.ids, face.mask)
    assert out["loss"] is None
    np.testing.assert_allclose(np.asarray(out["logits"]), logits, rtol=0, atol=1e-5)
    unmasked = jax.jit(face.apply)(face.params, face.ids[:1])  # no mask: every token real
    np.testing.assert_allclose(np.asarray(unmasked["logits"]), logits[:1], rtol=0, atol=1e-5)


def test_loss_equals_transformers(compiled: tuple[float, np.ndarray, dict[str, np.ndarray]],
                                  hf: tuple[float, dict[str, np.ndarray]]) -> None:
    assert compiled[0] == pytest.approx(hf[0], rel=1e-5)


def test_gradients_equal_transformers_autograd(compiled: tuple[float, np.ndarray, dict[str, np.ndarray]],
                                               hf: tuple[float, dict[str, np.ndarray]]) -> None:
    grads, want = compiled[2], hf[1]
    assert set(grads) == set(want)  # every parameter gets a gradient (a tied head: the embedding)
    for name, g in grads.items():
        scale = np.abs(want[name]).max()
        assert scale > 0, name
        # measured: within 3e-6 of each tensor's largest gradient on all three configs
        np.testing.assert_allclose(g, want[name], rtol=0, atol=2e-5 * scale, err_msg=name)


def test_no_counted_label_gives_zero_loss_and_gradients(face: Face) -> None:
    loss, _, grads = face.run(labels=np.full((B, T), -100, np.int32))
    assert loss == 0.0
    assert all(not g.any() for g in grads.values())


def test_sgd_lowers_the_loss(face: Face) -> None:
    params, losses = face.params, []
    for _ in range(5):
        (loss, _), grads = face.value_and_grad(params, face.ids, face.mask, face.labels)
        losses.append(float(loss))
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_bfloat16_params_run() -> None:
    """Cast params compute in bfloat16 (the op table follows the embedding's dtype), under jit."""
    face = get_face("tiny-gemma3")
    loss, logits, _ = face.run()
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), face.params)
    out = jax.jit(face.apply)(params, face.ids, face.mask, face.labels)
    assert out["logits"].dtype == jnp.bfloat16 and out["loss"].dtype == jnp.float32
    out_logits = np.asarray(out["logits"].astype(jnp.float32))
    real = face.mask == 1
    agree = (out_logits.argmax(-1) == logits.argmax(-1))[real].mean()
    assert agree >= 0.75, agree
    assert float(out["loss"]) == pytest.approx(loss, rel=0.05)
    _, bf16 = as_function(face.model, "bfloat16")
    assert all(v.dtype == jnp.bfloat16 for v in bf16.values())


def test_quantised_models_are_refused() -> None:
    config = CONFIGS["tiny-gemma"].replace(quantization=QuantConfig("int8"))
    model = gemma_core.Model(config, random_weights(config, 0), backend="numpy")
    with pytest.raises(ConfigError, match="quantised models are not supported"):
        as_function(model)


def test_other_tasks_are_refused() -> None:
    config = CONFIGS["tiny-gemma"]
    model = gemma_core.Model(config, random_weights(config, 0), backend="numpy", task="base")
    with pytest.raises(ConfigError, match="causal-lm only"):
        as_function(model)


def test_nnx_module_runs_the_same_function() -> None:
    """The NNX module's logits and loss are apply's; nnx.grad gives jax.grad's gradients; an
    nnx.jit SGD step lowers the loss."""
    nnx = pytest.importorskip("flax.nnx")
    from backends.jax.nnx import GemmaForCausalLM

    face = get_face("tiny-gemma")
    module = GemmaForCausalLM(face.model)
    assert set(nnx.state(module, nnx.Param)["params"]) == set(face.params)
    out = module(face.ids, face.mask, face.labels)
    eager = face.apply(face.params, face.ids, face.mask, face.labels)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(eager["logits"]))
    assert float(out.loss) == float(eager["loss"])
    assert module(face.ids).loss is None

    @nnx.jit
    def step(m: GemmaForCausalLM) -> Any:
        loss, grads = nnx.value_and_grad(lambda m: m(face.ids, face.mask, face.labels).loss)(m)
        for name, p in m.params.items():
            p[...] = p[...] - 0.5 * grads["params"][name][...]
        return loss, grads

    loss0, grads = step(module)
    _, _, want = face.run()
    for name, g in want.items():
        np.testing.assert_allclose(np.asarray(grads["params"][name][...]), g, rtol=0,
                                   atol=1e-6 * np.abs(g).max(), err_msg=name)
    loss1, _ = step(module)
    assert float(loss1) < float(loss0)
