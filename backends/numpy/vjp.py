"""The reference backward pass: one vector-Jacobian product (VJP) per op kind of the NumPy op table,
and a reverse-mode runner over a bound op list (`value_and_grad`), the float64 oracle that every
backend's training gradients are compared with (`conformance.grad`).

The VJP contract, beside the forward one (`gemma_core.graph`, the op vocabulary): for an op
`y = kind(*args; attrs)` (args: its inputs, then its weights, as the op function receives them)
and the cotangent `g = dL/dy` (a tuple for ops with several outputs, None where no gradient
reaches an output), `vjp_<kind>(p, g, *args, **attrs)` returns one entry per arg, `dL/d arg`, or
None where an arg takes no gradient (integer ids, positions, boolean masks, the RoPE table,
quantised weights). Each VJP differentiates exactly what the forward computes: the same
formulas, the values the forward used (recomputed from its inputs, the softmax probabilities
included). For float64, the oracle, no rounding is in the way; for narrower dtypes the forward is
the emulated reference and the backward runs in its accumulation dtype (float32) from the
recorded activations, unrounded.

Rules where a convention decides:
- The pad row is frozen: the embedding lookup passes no gradient to row `pad_token_id` of the
  table, as transformers' `nn.Embedding(padding_idx=pad_token_id)` (the lookup only; a tied
  `lm_head` still gives that row its gradient).
- A pad position's attention row is fully masked (every key biased by the dtype's finite
  minimum): the forward's softmax is uniform over the keys and its VJP is the softmax Jacobian
  at those uniform probabilities, as autograd of transformers' eager attention computes it (a
  finite difference would see zero, as the bias absorbs the scores).
- The loss is transformers' causal-LM loss (`causal_lm_loss`); when no label is counted it is 0
  with zero gradients (as `backends.jax.as_function`), not transformers' NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from backends.numpy.ops import Policy, dequantized_weight, make_op_table, make_rounder
from gemma_core.config import GemmaConfig
from gemma_core.graph import Graph, build_graph
from gemma_core.masks import layer_kinds
from gemma_core.opset import OP_KINDS, groups_needed
from gemma_core.step import step_inputs

IGNORE_INDEX = -100  # transformers' ignored label
Grad = np.ndarray | None


def _unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`g` summed over the axes that broadcasting added or stretched to reach it from `shape`."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def _rows(m: np.ndarray) -> np.ndarray:
    """`m` as a matrix of its last axis: [..., E] -> [N, E]."""
    return m.reshape(-1, m.shape[-1])


def vjp_embed(p: Policy, g: np.ndarray, ids: np.ndarray, table: np.ndarray, *, scale: float,
              frozen_row: int | None = None) -> tuple[Grad, Grad]:
    """y[b,t] = table[ids[b,t]] * s, s = sqrt(D) rounded to the compute dtype.
    d table[v] = s * sum over (b,t) with ids[b,t] = v of g[b,t]; row `frozen_row` (the pad
    token's, `value_and_grad` passes it) gets nothing from the lookup. ids: none."""
    s = p.rnd(p.acc.type(scale))
    dtable = np.zeros(table.shape, p.acc)
    np.add.at(dtable, ids, g * s)
    if frozen_row is not None:
        dtable[frozen_row] = 0.0  # nn.Embedding(padding_idx): the pad row is frozen
    return None, dtable


def vjp_rms_norm(p: Policy, g: np.ndarray, x: np.ndarray, w: np.ndarray, *, eps: float
                 ) -> tuple[Grad, Grad]:
    """y = x * r * (1 + w), r = (mean(x^2) + eps)^-1/2 over the last axis (E entries).
    With u = g * (1 + w): dx = r * u - x * r^3 * sum(u * x) / E; dw = sum over the leading axes
    of g * x * r."""
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + p.acc.type(eps))
    u = g * (1.0 + w)
    dx = r * u - x * r**3 * np.sum(u * x, axis=-1, keepdims=True) / x.shape[-1]
    dw = _rows(g * x * r).sum(axis=0)
    return dx, dw


def vjp_linear(p: Policy, g: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple[Grad, Grad]:
    """y = x @ w^T (w [O, I]). dx = g @ w; dw = g^T @ x over all leading positions."""
    dw = _rows(g).T @ _rows(x)  # [O, I]
    return g @ w, dw


def vjp_qlinear(p: Policy, g: np.ndarray, x: np.ndarray, values: np.ndarray, scale: np.ndarray, *,
                scheme: str, group_size: int | None) -> tuple[Grad, Grad, Grad]:
    """`linear` on the dequantised weight W: dx = g @ W. The stored (values, scale) take no
    gradient (quantised weights are not trained)."""
    return g @ dequantized_weight(p, values, scale, scheme, group_size), None, None


def vjp_qembed(p: Policy, g: np.ndarray, ids: np.ndarray, values: np.ndarray, scale: np.ndarray,
               **attrs: Any) -> tuple[Grad, Grad, Grad]:
    """A quantised table takes no gradient, and ids none: nothing flows."""
    return None, None, None


def vjp_split_heads(p: Policy, g: np.ndarray, x: np.ndarray, *, heads: int, head_dim: int
                    ) -> tuple[Grad]:
    """A reshape and transpose [B,T,N*H] -> [B,N,T,H]: dx is g moved back, [B,T,N*H]."""
    b, n, t, h = g.shape
    return (g.transpose(0, 2, 1, 3).reshape(b, t, n * h),)


def vjp_merge_heads(p: Policy, g: np.ndarray, x: np.ndarray) -> tuple[Grad]:
    """The inverse move of split_heads: dx = g [B,T,N*H] as [B,N,T,H]."""
    b, n, t, h = x.shape
    return (g.reshape(b, t, n, h).transpose(0, 2, 1, 3),)


def vjp_rope_table(p: Policy, g: Any, positions: np.ndarray, **attrs: Any) -> tuple[Grad]:
    """Integer positions: no gradient."""
    return (None,)


def vjp_rope(p: Policy, g: np.ndarray, x: np.ndarray, cos: np.ndarray, sin: np.ndarray
             ) -> tuple[Grad, Grad, Grad]:
    """y = x * cos + R(x) * sin with R(x) = [-x2, x1] (the halves of the last axis). R's
    transpose is R^T(z) = [z2, -z1], so dx = g * cos + R^T(g * sin). cos/sin (from positions):
    no gradient."""
    half = x.shape[-1] // 2
    z = g * sin
    return g * cos + np.concatenate([z[..., half:], -z[..., :half]], axis=-1), None, None


def vjp_attention_bias(p: Policy, g: Any, mask: np.ndarray) -> tuple[Grad]:
    """A boolean mask: no gradient."""
    return (None,)


def _attention_forward(p: Policy, q: np.ndarray, keys: np.ndarray, values: np.ndarray,
                       bias: np.ndarray, scale: float, softcap: float | None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The forward of `backends.numpy.ops.attention` keeping its intermediates: (keys and values
    repeated per query head [B,N,S,H], tanh(s / cap) (or None) and the probabilities [B,N,T,S])."""
    rnd, acc = p.rnd, p.acc
    groups = q.shape[1] // keys.shape[1]
    kr, vr = np.repeat(keys, groups, axis=1), np.repeat(values, groups, axis=1)
    scores = rnd(rnd(q @ kr.transpose(0, 1, 3, 2)) * acc.type(scale))  # [B,N,T,S]
    tanh = None
    if softcap is not None:
        tanh = rnd(np.tanh(rnd(scores / acc.type(softcap))))
        scores = rnd(tanh * acc.type(softcap))
    z = rnd(scores + bias).astype(np.promote_types(acc, np.float32))
    z = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs = rnd(probs / probs.sum(axis=-1, keepdims=True))
    return kr, vr, tanh, probs


def vjp_attention(p: Policy, g: np.ndarray, q: np.ndarray, keys: np.ndarray, values: np.ndarray,
                  bias: np.ndarray, *, scale: float, softcap: float | None
                  ) -> tuple[Grad, Grad, Grad, Grad]:
    """o = P @ V', P = softmax(c + bias), c = cap * tanh(s / cap) (or c = s without a softcap),
    s = scale * q @ K'^T, where K', V' repeat each kv head for the N/K query heads that read it.
    dV' = P^T @ g; dP = g @ V'^T; dc = P * (dP - sum_j P dP) (the softmax Jacobian at the
    forward's P: at a fully masked pad row P is uniform); ds = dc * (1 - tanh^2) with a softcap;
    dq = scale * ds @ K'; dK' = scale * ds^T @ q; dkeys, dvalues sum dK', dV' over each kv head's
    query heads. bias: no gradient."""
    kr, vr, tanh, probs = _attention_forward(p, q, keys, values, bias, scale, softcap)
    dvr = probs.transpose(0, 1, 3, 2) @ g  # [B,N,S,H]
    dprobs = g @ vr.transpose(0, 1, 3, 2)  # [B,N,T,S]
    ds = probs * (dprobs - np.sum(probs * dprobs, axis=-1, keepdims=True))
    if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
    ds = ds * p.acc.type(scale)
    dq = ds @ kr
    dkr = ds.transpose(0, 1, 3, 2) @ q  # [B,N,S,H]
    b, kv, s, h = keys.shape
    groups = q.shape[1] // kv
    fold = (b, kv, groups, s, h)  # np.repeat put query head h on kv head h // groups
    return dq, dkr.reshape(fold).sum(axis=2), dvr.reshape(fold).sum(axis=2), None


def vjp_split(p: Policy, g: tuple[Grad, ...], x: np.ndarray, *, sizes: tuple[int, ...]) -> tuple[Grad]:
    """Slices of the last axis: dx is the cotangents concatenated back (zeros for a slice that
    no gradient reached)."""
    parts = [np.zeros((*x.shape[:-1], n), p.acc) if gi is None else gi
             for gi, n in zip(g, sizes, strict=True)]
    return (np.concatenate(parts, axis=-1),)


def vjp_gelu_tanh(p: Policy, g: np.ndarray, x: np.ndarray) -> tuple[Grad]:
    """y = x/2 * (1 + tanh(u)), u = c * (x + a x^3), c = sqrt(2/pi), a = 0.044715.
    dx = g * (1/2 (1 + tanh u) + x/2 (1 - tanh^2 u) c (1 + 3 a x^2))."""
    c, a = p.acc.type(np.sqrt(2.0 / np.pi)), p.acc.type(0.044715)
    t = np.tanh(c * (x + a * x**3))
    return (g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * a * x * x)),)


def vjp_mul(p: Policy, g: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[Grad, Grad]:
    """y = a * b (broadcasting): da = g * b, db = g * a, each summed back to its shape."""
    return _unbroadcast(g * b, np.shape(a)), _unbroadcast(g * a, np.shape(b))


def vjp_add(p: Policy, g: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[Grad, Grad]:
    """y = a + b (broadcasting, e.g. a bias weight): da = g, db = g, each summed to its shape."""
    return _unbroadcast(g, np.shape(a)), _unbroadcast(g, np.shape(b))


def vjp_softcap(p: Policy, g: np.ndarray, x: np.ndarray, *, cap: float) -> tuple[Grad]:
    """y = cap * tanh(x / cap): dx = g * (1 - tanh^2(x / cap))."""
    t = np.tanh(x / p.acc.type(cap))
    return (g * (1.0 - t * t),)


def vjp_gather_positions(p: Policy, g: np.ndarray, x: np.ndarray, index: np.ndarray
                         ) -> tuple[Grad, Grad]:
    """y = x[:, index]: dx is zero but at the gathered positions, where g is added (an index
    listed twice adds twice). index: none."""
    dx = np.zeros(x.shape, p.acc)
    np.add.at(dx, (slice(None), index), g)
    return dx, None


def vjp_lora(p: Policy, g: np.ndarray, x: np.ndarray, a: np.ndarray, b: np.ndarray, *, scale: float
             ) -> tuple[Grad, Grad, Grad]:
    """y = scale * (x @ a^T) @ b^T (a [R, I], b [O, R]), with z = x @ a^T:
    dx = scale * (g @ b) @ a; db = scale * g^T @ z; da = scale * (g @ b)^T @ x (over all leading
    positions). Used where the graph holds a `lora` op."""
    gb = g @ b * p.acc.type(scale)  # [..., R]
    z = x @ a.T
    return gb @ a, _rows(gb).T @ _rows(x), p.acc.type(scale) * _rows(g).T @ _rows(z)


VJPS: dict[str, Callable[..., tuple[Grad, ...]]] = {
    name[len("vjp_"):]: fn for name, fn in globals().items() if name.startswith("vjp_")}
# kinds of the vocabulary with no VJP here: the cache write (the cache-free training graph has
# none) and the classification head's pooling
NO_VJP = tuple(k for k in OP_KINDS if k not in VJPS)


def causal_lm_loss(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """transformers' shifted next-token cross-entropy and its gradient: `logits[:, :-1]` against
    `labels[:, 1:]`, -100 ignored, the mean over the n counted tokens, in float64 (float32 for
    float32 logits). d logits[b,t] = (softmax(logits[b,t]) - onehot(labels[b,t+1])) / n at counted
    positions, zero elsewhere (and at the last position). No counted token: loss 0, gradient 0."""
    acc = np.promote_types(logits.dtype, np.float32)
    z = logits[:, :-1].astype(acc)  # [B,T-1,V]
    targets = np.asarray(labels)[:, 1:]
    counted = targets != IGNORE_INDEX
    n = int(counted.sum())
    dlogits = np.zeros(logits.shape, acc)
    if n == 0:
        return 0.0, dlogits
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(logp, np.where(counted, targets, 0)[..., None], axis=-1)[..., 0]
    loss = -float(np.where(counted, picked, 0.0).sum()) / n
    d = np.exp(logp)
    np.put_along_axis(d, np.where(counted, targets, 0)[..., None],
                      np.take_along_axis(d, np.where(counted, targets, 0)[..., None], axis=-1) - 1.0,
                      axis=-1)
    dlogits[:, :-1] = np.where(counted[..., None], d, 0.0) / n
    return loss, dlogits


def _accumulate(store: dict[str, np.ndarray], name: str, grad: np.ndarray) -> None:
    store[name] = grad if name not in store else store[name] + grad


def backward(graph: Graph, policy: Policy, recorded: list[tuple[Any, ...]],
             cotangents: Mapping[str, np.ndarray], vjps: Mapping[str, Callable[..., tuple[Grad, ...]]],
             ) -> dict[str, np.ndarray]:
    """Walk `graph`'s ops backwards from the `cotangents` of its outputs; `recorded[i]` holds the
    args op i ran on (its inputs then its weights). Returns {weight name: gradient} for every
    weight a gradient reached. Cotangents are kept by name, each op taking (popping) those of the
    values it wrote before adding those of the values it read: a name an op rewrites (`q -> q`)
    then holds the earlier value's cotangent, so the walk follows values, not names."""
    cot: dict[str, np.ndarray] = dict(cotangents)
    grads: dict[str, np.ndarray] = {}
    for index in range(len(graph.ops) - 1, -1, -1):
        op = graph.ops[index]
        outs = tuple(cot.pop(name, None) for name in op.outputs)
        if all(o is None for o in outs):
            continue
        if op.kind not in vjps:
            raise NotImplementedError(f"vjp: op {index} ({op.kind}) has no VJP "
                                      f"(kinds without one: {', '.join(NO_VJP)})")
        g = outs[0] if len(outs) == 1 else outs
        arg_grads = vjps[op.kind](policy, g, *recorded[index], **op.attrs)
        names = (*op.inputs, *op.params)
        for k, (name, grad) in enumerate(zip(names, arg_grads, strict=True)):
            if grad is None:
                continue
            _accumulate(cot if k < len(op.inputs) else grads, name, np.asarray(grad, policy.acc))
    return grads


def value_and_grad(config: GemmaConfig, weights: Mapping[str, np.ndarray], ids: np.ndarray,
                   mask: np.ndarray | None, labels: np.ndarray, dtype: str = "float64", *,
                   freeze_pad_row: bool = True, lora: Any = None) -> tuple[float, dict[str, np.ndarray]]:
    """(loss, {weight name: d loss / d weight}) of `config`'s cache-free causal-LM step
    (`build_graph(config, cache=False)`) on `ids [B,T]` with `mask` (1/True real, 0 left
    padding; None: all real) and `labels [B,T]` (transformers' causal-LM loss, `causal_lm_loss`).
    The forward runs on the NumPy op table of `dtype` (weights rounded to it), recording each
    op's args by op index; the backward walks the ops in reverse (`backward`) with the VJPs of
    this module, the embedding lookup's pad row frozen (`freeze_pad_row=False` lets it take the
    lookup's gradient, as a plain gather does). With `lora` (a `gemma_core.lora.LoraConfig`) the
    graph carries its adapters (`apply_lora`) and `weights` must hold their A/B matrices too.
    Every float weight the graph reads gets a gradient (zeros where none reached it); quantised
    weights get none."""
    graph = build_graph(config, "causal-lm", cache=False)
    if lora is not None:
        from gemma_core.lora import apply_lora  # only where adapters are asked for

        graph = apply_lora(graph, config, lora)
    policy = Policy(dtype)
    table = make_op_table(dtype, groups_needed(op.kind for op in graph))  # only the kinds it reads
    rnd = make_rounder(dtype)
    # quantised (values, scale) pairs are held as stored, as the numpy backend holds them
    quantised = {n for op in graph.ops if op.kind in ("qlinear", "qembed") for n in op.params}
    held = {name: w if name in quantised else rnd(np.asarray(w, np.float64))
            for name, w in weights.items() if name in graph.params}
    ids = np.asarray(ids)
    mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    env, _ = step_inputs(ids, mask, None, windows=layer_kinds(config))
    recorded: list[tuple[Any, ...]] = []
    for op in graph.ops:
        args = (*(env[name] for name in op.inputs), *(held[name] for name in op.params))
        recorded.append(args)  # by op index: names like q are rewritten in place
        result = table[op.kind](*args, **op.attrs)
        if len(op.outputs) == 1:
            env[op.outputs[0]] = result
        else:
            env.update(zip(op.outputs, result, strict=True))
    loss, dlogits = causal_lm_loss(env["logits"], labels)
    frozen = config.pad_token_id if freeze_pad_row else None
    vjps = dict(VJPS, embed=functools.partial(vjp_embed, frozen_row=frozen))
    grads = backward(graph, policy, recorded, {"logits": dlogits.astype(policy.acc)}, vjps)
    float_params = [n for n in graph.params if n not in quantised]
    return loss, {n: grads.get(n, np.zeros(np.shape(held[n]), policy.acc)) for n in float_params}


__all__ = ["NO_VJP", "VJPS", "backward", "causal_lm_loss", "value_and_grad"]
