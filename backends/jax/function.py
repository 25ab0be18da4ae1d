"""The JAX face of a model: a pure `apply(params, input_ids, attention_mask=None, labels=None)` and
its `params`, a dict of jnp arrays under the canonical (Hugging Face) names, unfused.

`apply` is a thin adapter: it runs the model's op list without a cache (`gemma_core.graph.build_graph`
with `cache=False`: each layer attends over the step's own keys, the training step) bound to the
jax op table (`backends.jax.ops.make_op_table`) with the params it is given as the weights, from
the step inputs of `gemma_core.step.step_inputs` (positions and one attention mask per layer kind,
computed with jax.numpy, so they trace). Nothing about the architecture is written here; ops are
dispatched by kind, whatever kinds the list holds.
So `jax.jit(apply)` compiles the whole forward pass and `jax.grad` differentiates it, for training
with plain JAX (or optax, or Flax NNX through `backends.jax.nnx`).

Returned dict:
- `logits`: [B, T, V] in the compute dtype (that of `params["model.norm.weight"]`; cast the
  float params, e.g. to bfloat16, to compute in another dtype);
- `loss`: transformers' causal-LM loss when `labels` [B, T] is given, else None (a leafless pytree,
  so `jax.jit(apply)` works with and without labels): the cross-entropy of `logits[:, :-1]` against
  `labels[:, 1:]` in float32, positions labelled -100 ignored, the mean over the counted tokens
  (0, not transformers' NaN, when none is counted, so a fully masked batch gives zero gradients).
  Labels other than -100 must lie in [0, V): they are not checked (they may be traced).

RoPE positions count real tokens (`attention_mask`, 1 real, 0 padding), as transformers' generate
computes them for left padding; the positions of padding see no real key (their attention is
uniform, as transformers' eager attention) and their logits are not meaningful, so label them
-100. The pad token's embedding row gets no gradient (transformers' `padding_idx`), so gradients
equal transformers' on left-padded batches, the first real token's label (read at a pad) included.

A quantised model (gemma_core.quant) is the base of QLoRA: its quantised weights are params as the
jax backend holds them (integer values and float32 scales, which `qlinear`/`qembed` read), frozen,
so `as_function` of a quantised model needs an adapter (`lora=`, or the model's own) to train.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from backends.jax import backend
from backends.jax.ops import DTYPES, make_op_table
from gemma_core.config import GemmaConfig
from gemma_core.errors import ConfigError, InputError, WeightError
from gemma_core.graph import bind, build_graph, run_bound
from gemma_core.layout import FINAL_NORM
from gemma_core.lora import LoraConfig, apply_lora, check_lora_weights, init_lora_weights, model_adapter
from gemma_core.masks import layer_kinds
from gemma_core.model import Model, check_dtype
from gemma_core.quant import SCALE_SUFFIX
from gemma_core.step import step_inputs
from gemma_core.weights import canonical_weights

IGNORE_INDEX = -100  # transformers' ignored label
ApplyFn = Callable[..., dict[str, Any]]



def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """transformers' shifted next-token cross-entropy, in float32: `logits[:, :-1]` against
    `labels[:, 1:]`, -100 ignored, the mean over the counted tokens (0 when none is)."""
    scores = logits[:, :-1].astype(jnp.float32)
    targets = jnp.asarray(labels)[:, 1:]
    counted = targets != IGNORE_INDEX
    logp = jax.nn.log_softmax(scores, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(counted, targets, 0)[..., None], axis=-1)[..., 0]
    total = -jnp.sum(jnp.where(counted, picked, 0.0))
    return total / jnp.maximum(jnp.sum(counted), 1).astype(jnp.float32)


def _frozen_pad_embed(pad_id: int, dtype: str) -> Callable[..., jax.Array]:
    """The jax `embed` op with the pad token's row frozen (no gradient), as transformers' Gemma
    embeddings (`nn.Embedding(padding_idx=pad_token_id)`); the values are the op's own."""
    embed = make_op_table(dtype)["embed"]

    def frozen(ids: jax.Array, table: jax.Array, *, scale: float) -> jax.Array:
        rows = embed(ids, table, scale=scale)
        return jnp.where((ids == pad_id)[..., None], jax.lax.stop_gradient(rows), rows)

    return frozen


def _dtype_name(dtype: Any) -> str:
    for name, dt in DTYPES.items():
        if jnp.dtype(dt) == jnp.dtype(dtype):
            return name
    raise ConfigError(f"dtype: params in {dtype} (supported: {', '.join(DTYPES)})")


def make_apply(config: GemmaConfig, allow_float16: bool = False, lora: LoraConfig | None = None) -> ApplyFn:
    """The pure `apply(params, input_ids, attention_mask=None, labels=None, dropout_rng=None)`
    of `config`'s causal-LM op list (see the module docstring), with the LoRA adapter `lora`
    (`gemma_core.lora.apply_lora`; its weights are params too) if given. `dropout_rng` (a
    `jax.random` key) turns on the adapter's input dropout, as PEFT in training."""
    graph = build_graph(config, "causal-lm", cache=False)
    if lora is not None:
        graph = apply_lora(graph, config, lora)
    adapters = sum(op.kind == "lora" for op in graph)
    kinds = layer_kinds(config)  # one attention mask per layer kind, made by step_inputs
    tables: dict[str, Mapping[str, Callable[..., Any]]] = {}  # one op table per compute dtype

    def apply(params: Mapping[str, Any], input_ids: Any, attention_mask: Any = None,
              labels: Any = None, dropout_rng: Any = None) -> dict[str, Any]:
        missing = [name for name in graph.params if name not in params]
        if missing:
            raise WeightError(f"apply: params lack {len(missing)} tensors: {', '.join(missing[:8])}")
        ids = jnp.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise InputError(f"input_ids: expected a non-empty [batch, length] array, got {ids.shape}")
        b, t = ids.shape
        if t > config.max_position_embeddings:
            raise InputError(f"input_ids: {t} tokens exceed max_position_embeddings "
                             f"{config.max_position_embeddings}")
        mask = (jnp.ones((b, t), bool) if attention_mask is None
                else jnp.asarray(attention_mask).astype(bool))
        if mask.shape != (b, t):
            raise InputError(f"attention_mask: shape {mask.shape} differs from input_ids {(b, t)}")
        dtype = _dtype_name(params[FINAL_NORM].dtype)  # a norm: float in every model
        check_dtype(config, dtype, allow_float16)
        if dtype not in tables:
            tables[dtype] = {**make_op_table(dtype), "embed": _frozen_pad_embed(config.pad_token_id, dtype)}
        env, _ = step_inputs(ids, mask, None, windows=kinds, xp=jnp)  # no cache: the step's own keys
        unknown = [name for name in graph.inputs if name not in env]
        if unknown:  # the op list reads a step input this adapter does not know how to make
            raise ConfigError(f"apply: no value for graph inputs {unknown}")
        table = tables[dtype]
        if dropout_rng is not None and lora is not None and lora.dropout > 0:
            table = {**table, "lora": _lora_with_dropout(table["lora"], lora.dropout,
                                                        iter(jax.random.split(dropout_rng, adapters)))}
        run_bound(bind(graph, table, params), env)
        logits = env["logits"]
        return {"logits": logits, "loss": None if labels is None else causal_lm_loss(logits, labels)}

    return apply


def as_function(model: Model, dtype: str | None = None, allow_float16: bool = False, *,
                lora: LoraConfig | None = None, lora_weights: Mapping[str, np.ndarray] | None = None,
                seed: int = 0) -> tuple[ApplyFn, dict[str, jax.Array]]:
    """`(apply, params)` of a causal-LM `model` of any backend: its config's op list on the jax op
    table, and its weights as jnp arrays in `dtype` (default the model's) under the canonical
    names. `apply` is pure, jit-able and differentiable in `params` (module docstring). With
    `lora`, the adapter's weights (`lora_weights`, or fresh ones of `seed` as PEFT initialises
    them) join `params` under their names (`gemma_core.lora.lora_shapes`): differentiate in those
    alone to train the adapter."""
    if model.task != "causal-lm":
        raise ConfigError(f"as_function: task {model.task!r} is not supported (causal-lm only)")
    dtype = dtype or model.dtype
    if dtype not in backend.dtypes:
        raise ConfigError(f"dtype: {dtype!r} is not available to JAX here "
                          f"(available: {', '.join(backend.dtypes)})")
    check_dtype(model.config, dtype, allow_float16)
    if lora is None:  # the adapter the model runs, if any, trains on
        lora, held = model_adapter(model)
        lora_weights = held if lora is not None and lora_weights is None else lora_weights
    quant = model.config.quantization
    if quant is not None and lora is None:  # nothing float to train over frozen quantised weights
        raise ConfigError("as_function: quantised models are not supported without an adapter (QLoRA: "
                          "the quantised weights are frozen; pass lora=), or load the model unquantised")
    apply = make_apply(model.config, allow_float16, lora)
    weights = canonical_weights(model)
    params: dict[str, Any] = {}
    for name, w in weights.items():
        scheme = quant.scheme_for(name) if quant is not None else None
        if quant is not None and scheme is not None and name + SCALE_SUFFIX in weights:  # as jax holds it
            params[name], params[name + SCALE_SUFFIX] = backend.prepare_quantized(
                w, weights[name + SCALE_SUFFIX], scheme, quant.group_for(scheme), dtype, None, name)
        elif name not in params:
            params[name] = jnp.asarray(w, DTYPES[dtype])
    if lora is not None:
        adapter = init_lora_weights(model.config, lora, seed) if lora_weights is None else dict(lora_weights)
        check_lora_weights(model.config, lora, adapter)
        params.update({name: jnp.asarray(w, DTYPES[dtype]) for name, w in adapter.items()})
    return apply, params


def _lora_with_dropout(lora: Callable[..., jax.Array], p: float,
                       keys: Iterator[jax.Array]) -> Callable[..., jax.Array]:
    """The `lora` op with PEFT's dropout of its input, one key per adapter of the step."""

    def op(x: jax.Array, a: jax.Array, b: jax.Array, *, scale: float) -> jax.Array:
        keep = jax.random.bernoulli(next(keys), 1.0 - p, x.shape)
        return lora(jnp.where(keep, x / (1.0 - p), 0).astype(x.dtype), a, b, scale=scale)

    return op
