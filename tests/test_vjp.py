"""The reference backward pass (`backends.numpy.vjp`): each op's VJP against central finite
differences in float64, the whole model's gradient against finite differences on single weight
entries, and against transformers' autograd on left-padded batches of Gemma 1, 2 and 3."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from backends.numpy import ops
from backends.numpy.vjp import NO_VJP, VJPS, causal_lm_loss, value_and_grad, vjp_embed
from gemma_core.cache import batch_ids
from gemma_core.graph import build_graph
from gemma_core.layout import EMBED
from gemma_core.presets import get_preset
from gemma_core.quant import QuantConfig, quantize
from gemma_core.weights import random_weights

P = ops.Policy("float64")
# Gemma 2 with both softcaps binding (the attention one at 0.5 bends scores of std ~1)
CONFIGS = {
    "tiny-gemma": get_preset("tiny-gemma"),
    "tiny-gemma2": get_preset("tiny-gemma2").replace(attn_logit_softcap=0.5, final_logit_softcap=4.0),
    "tiny-gemma3": get_preset("tiny-gemma3"),
}


def _numeric_vjp(f: Callable[..., Any], args: list[Any], g: Any, wrt: tuple[int, ...],
                 h: float = 1e-6) -> dict[int, np.ndarray]:
    """d <g, f(args)> / d args[i] for i in `wrt`, by central differences, entry by entry."""
    def inner(out: Any) -> float:
        outs = out if isinstance(out, tuple) else (out,)
        cots = g if isinstance(g, tuple) else (g,)
        return sum(float(np.sum(o * c)) for o, c in zip(outs, cots, strict=True))

    grads = {}
    for i in wrt:
        x = np.asarray(args[i], np.float64)
        d = np.zeros_like(x)
        for j in np.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[j] += h
            minus[j] -= h
            hi = inner(f(*args[:i], plus, *args[i + 1:]))
            lo = inner(f(*args[:i], minus, *args[i + 1:]))
            d[j] = (hi - lo) / (2 * h)
        grads[i] = d
    return grads


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _attention_args(rng: np.random.Generator, softcap: float | None, pad_query: bool = False
                    ) -> tuple[list[Any], dict[str, Any]]:
    """GQA (4 query heads on 2 kv heads), 5 queries over 5 keys: causal, a window of 3, the
    first key padding in row 1; with `pad_query`, row 1's first query sees no key at all (a
    pad position), as left padding makes it."""
    q = rng.standard_normal((2, 4, 5, 6))
    k, v = rng.standard_normal((2, 2, 5, 6)), rng.standard_normal((2, 2, 5, 6))
    i, j = np.arange(5)[:, None], np.arange(5)[None, :]
    mask = np.broadcast_to((j <= i) & (j > i - 3), (2, 1, 5, 5)).copy()
    mask[1, :, 1:, 0] = False
    if pad_query:
        mask[1, :, 0, 0] = False
    return [q, k, v, ops.attention_bias(P, mask)], {"scale": 0.4, "softcap": softcap}


def _op_cases() -> dict[str, tuple[Callable[..., Any], list[Any], dict[str, Any], tuple[int, ...]]]:
    """op kind -> (forward, args, attrs, differentiable arg indices), small float64 shapes."""
    rng = _rng(1)
    n = rng.standard_normal
    cos, sin = ops.rope_table(P, np.array([[0, 1, 2], [0, 0, 5]]), head_dim=4, theta=10.0, scaling=1.0)
    cases: dict[str, tuple[Callable[..., Any], list[Any], dict[str, Any], tuple[int, ...]]] = {
        "embed": (ops.embed, [np.array([[1, 3, 3], [0, 2, 4]]), n((5, 4))], {"scale": 2.0}, (1,)),
        "rms_norm": (ops.rms_norm, [n((2, 3, 5)), 0.1 * n(5)], {"eps": 1e-6}, (0, 1)),
        "linear": (ops.linear, [n((2, 3, 4)), n((5, 4))], {}, (0, 1)),
        "split_heads": (ops.split_heads, [n((2, 3, 6))], {"heads": 2, "head_dim": 3}, (0,)),
        "merge_heads": (ops.merge_heads, [n((2, 2, 3, 3))], {}, (0,)),
        "rope": (ops.rope, [n((2, 2, 3, 4)), cos, sin], {}, (0,)),
        "split": (ops.split, [n((2, 3, 7))], {"sizes": (2, 4, 1)}, (0,)),
        "gelu_tanh": (ops.gelu_tanh, [3 * n((3, 4))], {}, (0,)),
        "mul": (ops.mul, [n((2, 3, 4)), n((3, 1))], {}, (0, 1)),  # broadcasting
        "add": (ops.add, [n((2, 3, 4)), n(4)], {}, (0, 1)),  # a bias
        "softcap": (ops.softcap, [5 * n((2, 6))], {"cap": 2.0}, (0,)),
        "gather_positions": (ops.gather_positions, [n((2, 4, 3)), np.array([3, 1, 3])], {}, (0,)),
        "lora": (getattr(ops, "lora", None) or _lora_formula, [n((2, 3, 5)), n((2, 5)), n((4, 2))],
                 {"scale": 0.5}, (0, 1, 2)),
    }
    values, scale = quantize(n((5, 4)).astype(np.float32), "int8", None, "w")
    cases["qlinear"] = (ops.qlinear, [n((2, 3, 4)), values, scale], {"scheme": "int8", "group_size": None},
                        (0,))  # the stored weight: no gradient
    for name, softcap in (("attention", None), ("attention+softcap", 0.5)):
        args, attrs = _attention_args(rng, softcap)
        cases[name] = (ops.attention, args, attrs, (0, 1, 2))
    return cases


def _lora_formula(p: ops.Policy, x: np.ndarray, a: np.ndarray, b: np.ndarray, *, scale: float) -> np.ndarray:
    return (x @ a.T) @ b.T * scale  # the contract, where the numpy table has no lora yet


OP_CASES = _op_cases()


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_vjp_equals_finite_differences(case: str) -> None:
    forward, args, attrs, wrt = OP_CASES[case]
    kind = case.split("+")[0]
    out = forward(P, *args, **attrs)
    rng = _rng(2)
    g = (tuple(rng.standard_normal(o.shape) for o in out) if isinstance(out, tuple)
         else rng.standard_normal(out.shape))
    got = VJPS[kind](P, g, *args, **attrs)
    assert len(got) == len(args)
    want = _numeric_vjp(lambda *a: forward(P, *a, **attrs), args, g, wrt)
    for i, d in want.items():
        assert got[i] is not None and got[i].shape == np.shape(args[i]), (case, i)
        scale = max(float(np.abs(d).max()), 1.0)
        np.testing.assert_allclose(got[i], d, rtol=0, atol=1e-7 * scale, err_msg=f"{case} arg {i}")
    for i in set(range(len(args))) - set(wrt):  # ids, positions' tables, biases, indices
        assert got[i] is None, (case, i)


def test_fully_masked_row_is_the_softmax_jacobian_at_uniform_probabilities() -> None:
    """A pad query's row: every key at the finite minimum, so the forward's softmax is uniform and
    finite differences see nothing (the bias absorbs the scores); the VJP is what autograd of the
    eager formula (transformers') computes: the softmax Jacobian at the uniform probabilities."""
    torch = pytest.importorskip("torch")
    args, attrs = _attention_args(_rng(3), softcap=0.5, pad_query=True)
    q, k, v, bias = args
    g = _rng(4).standard_normal(q.shape)
    dq, dk, dv, _ = VJPS["attention"](P, g, *args, **attrs)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    kr, vr = tk.repeat_interleave(2, dim=1), tv.repeat_interleave(2, dim=1)
    s = torch.tanh(tq @ kr.transpose(-1, -2) * 0.4 / 0.5) * 0.5 + torch.tensor(bias)
    out = torch.softmax(s, dim=-1) @ vr
    out.backward(torch.tensor(g))
    for ours, theirs in ((dq, tq), (dk, tk), (dv, tv)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert np.abs(dq[1, :, 0]).max() > 1e-3  # the fully masked row does pass a gradient to q


def test_embedding_pad_row_is_frozen() -> None:
    """The lookup gives row `frozen_row` nothing (nn.Embedding(padding_idx)); the others as usual."""
    ids, table = np.array([[0, 0, 2], [1, 0, 2]]), _rng(5).standard_normal((4, 3))
    g = _rng(6).standard_normal((2, 3, 3))
    _, free = vjp_embed(P, g, ids, table, scale=2.0)
    _, frozen = vjp_embed(P, g, ids, table, scale=2.0, frozen_row=0)
    assert np.abs(free[0]).max() > 0 and not frozen[0].any()
    np.testing.assert_array_equal(frozen[1:], free[1:])


@pytest.mark.parametrize("quant", [None, QuantConfig("int8")])
def test_every_op_kind_of_the_training_graph_has_a_vjp(quant: QuantConfig | None) -> None:
    for config in CONFIGS.values():
        kinds = {op.kind for op in build_graph(config.replace(quantization=quant), cache=False)}
        assert kinds <= set(VJPS), kinds - set(VJPS)
    assert set(NO_VJP) <= {"kv_cache", "pool_last_token"}


def _batch(config: Any, lengths: tuple[int, ...] = (13, 9, 4), pad_logits: bool = True
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, labels), left-padded; labels -100 at pads (and at each padded row's first real
    token unless `pad_logits`: a pad position predicts it) and at one more position."""
    rng = _rng(7)
    ids, mask = batch_ids([list(rng.integers(3, config.vocab_size, n)) for n in lengths], config.pad_token_id)
    labels = np.where(mask == 1, ids, -100)
    if not pad_logits:
        padded = mask[:, 0] == 0
        labels[np.flatnonzero(padded), mask.argmax(1)[padded]] = -100
    labels[0, 4] = -100
    return ids, mask, labels


@pytest.mark.parametrize("preset", list(CONFIGS))
def test_model_gradient_equals_finite_differences(preset: str) -> None:
    """One entry of every weight tensor (its largest gradient), the loss perturbed both ways.
    No loss term reads a pad position's logit: a fully masked row's scores are absorbed by the
    bias, so finite differences see zero there, where the gradient (autograd's convention)
    does not (test_fully_masked_row_is_the_softmax_jacobian_at_uniform_probabilities)."""
    config = CONFIGS[preset]
    weights = {k: v.astype(np.float64) for k, v in random_weights(config, 1).items()}
    ids, mask, labels = _batch(config, pad_logits=False)
    _, grads = value_and_grad(config, weights, ids, mask, labels)
    assert set(grads) == set(build_graph(config, cache=False).params)
    h = 1e-5
    for name, g in grads.items():
        j = np.unravel_index(np.abs(g).argmax(), g.shape)
        plus, minus = dict(weights), dict(weights)
        plus[name], minus[name] = weights[name].copy(), weights[name].copy()
        plus[name][j] += h
        minus[name][j] -= h
        fd = (value_and_grad(config, plus, ids, mask, labels)[0]
              - value_and_grad(config, minus, ids, mask, labels)[0]) / (2 * h)
        # measured: within 5e-9 of the tensor's largest gradient on all three configs
        assert abs(fd - g[j]) <= 1e-6 * abs(g[j]), (name, j, fd, g[j])


def test_lora_adapter_gradients_equal_finite_differences() -> None:
    lora_mod = pytest.importorskip("gemma_core.lora")
    config = CONFIGS["tiny-gemma3"]
    lora = lora_mod.LoraConfig(r=2, alpha=4.0)
    shapes = lora_mod.lora_shapes(config, lora)
    rng = _rng(8)
    weights = {k: v.astype(np.float64) for k, v in random_weights(config, 1).items()}
    weights.update({k: 0.3 * rng.standard_normal(s) for k, s in shapes.items()})  # B != 0: A learns
    ids, mask, labels = _batch(config, pad_logits=False)
    _, grads = value_and_grad(config, weights, ids, mask, labels, lora=lora)
    assert set(shapes) <= set(grads)
    h = 1e-5
    for name in sorted(shapes)[:6]:
        g = grads[name]
        j = np.unravel_index(np.abs(g).argmax(), g.shape)
        plus, minus = dict(weights), dict(weights)
        plus[name], minus[name] = weights[name].copy(), weights[name].copy()
        plus[name][j] += h
        minus[name][j] -= h
        fd = (value_and_grad(config, plus, ids, mask, labels, lora=lora)[0]
              - value_and_grad(config, minus, ids, mask, labels, lora=lora)[0]) / (2 * h)
        assert abs(fd - g[j]) <= 1e-6 * abs(g[j]), (name, j, fd, g[j])


def test_no_counted_label_gives_zero_loss_and_gradient() -> None:
    config = CONFIGS["tiny-gemma"]
    ids, mask, _ = _batch(config)
    loss, grads = value_and_grad(config, random_weights(config, 0), ids, mask, np.full(ids.shape, -100))
    assert loss == 0.0 and not any(g.any() for g in grads.values())
    loss, d = causal_lm_loss(np.zeros((1, 3, 4)), np.array([[5, 1, -100]]))
    assert loss == pytest.approx(np.log(4)) and d[0, 0, 1] == pytest.approx(0.25 - 1) and not d[0, 1:].any()


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_grads(request: pytest.FixtureRequest) -> tuple[str, float, dict[str, np.ndarray]]:
    """transformers' loss and gradients (float32 autograd, eager attention) on a left-padded batch
    whose loss reads a pad position's logit (each padded row's first real token is labelled).
    float32, not float64: transformers' float64 masks overflow to -inf on a fully masked pad
    row (NaN logits), and its RMSNorm computes in float32 whatever the dtype."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_reference import hf_model

    preset = request.param
    config = CONFIGS[preset]
    ids, mask, labels = _batch(config)
    model = hf_model(config, 0, "float32")
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)  # as ours
    out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions))
    logits = out.logits[:, :-1].double().reshape(-1, config.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels[:, 1:].reshape(-1)).long(),
                                             ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.double().numpy() for n, p in model.named_parameters() if p.grad is not None}
    return preset, float(loss.detach()), grads


@pytest.mark.transformers
def test_gradients_equal_transformers_autograd(hf_grads: tuple[str, float, dict[str, np.ndarray]]) -> None:
    preset, hf_loss, want = hf_grads
    config = CONFIGS[preset]
    loss, grads = value_and_grad(config, random_weights(config, 0), *_batch(config))
    assert set(grads) == set(want)  # a tied head: the embedding's one gradient
    assert loss == pytest.approx(hf_loss, rel=1e-6)
    for name, g in grads.items():
        err = np.linalg.norm(g - want[name]) / np.linalg.norm(want[name])
        # measured: <= 1.8e-6 (float32 transformers against the float64 oracle)
        assert err <= 1e-5, (name, err)


@pytest.mark.transformers
def test_pad_row_follows_transformers_padding_idx(hf_grads: tuple[str, float, dict[str, np.ndarray]]) -> None:
    """The pad row's gradient comes from the tied lm_head only, as in transformers; letting the
    lookup feed it too (a plain gather) is far off."""
    preset, _, want = hf_grads
    config = CONFIGS[preset]
    pad, args = config.pad_token_id, (config, random_weights(config, 0), *_batch(config))
    frozen = value_and_grad(*args)[1][EMBED][pad]
    free = value_and_grad(*args, freeze_pad_row=False)[1][EMBED][pad]
    ref = want[EMBED][pad]
    assert np.linalg.norm(frozen - ref) <= 1e-5 * np.linalg.norm(ref)
    assert np.linalg.norm(free - ref) >= 0.5 * np.linalg.norm(ref)  # measured 1.2 to 190
