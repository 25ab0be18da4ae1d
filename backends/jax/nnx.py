"""A Flax NNX module over the JAX face (`backends.jax.function`): `GemmaForCausalLM(model)` holds
the model's weights as `nnx.Param`s in a dict keyed by canonical names (`module.params[name]`) and
its `__call__(input_ids, attention_mask=None, labels=None)` runs the same `apply` (the model's op
list on the jax op table), returning `.logits` and `.loss` like Flax/transformers causal LMs.

Train it the NNX way: `nnx.grad(lambda m: m(ids, mask, labels).loss)(module)`, an
`nnx.Optimizer(module, optax..., wrt=nnx.Param)`, `nnx.jit` around the step. Needs `flax`
(`pip install 'gemma-core[nnx]'`); `import backends.jax` does not import this module.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx

from backends.jax.function import as_function
from gemma_core.model import Model

# flax >= 0.11 wants containers of Variables marked as data; 0.10 treats them so already
_data = getattr(nnx, "data", lambda value: value)


class CausalLMOutput(NamedTuple):
    """`logits` [B, T, V] in the compute dtype; `loss` (float32 scalar) or None without labels.
    A NamedTuple, so it passes through `nnx.jit` and `jax.jit`."""

    logits: jax.Array
    loss: jax.Array | None = None


class GemmaForCausalLM(nnx.Module):
    """A Gemma causal LM as an NNX module: the weights of `model` (any backend, float, causal-lm)
    as `nnx.Param`s in `dtype` (default the model's), run by the backend-neutral op list."""

    def __init__(self, model: Model, *, dtype: str | None = None, allow_float16: bool = False) -> None:
        apply, params = as_function(model, dtype, allow_float16)
        self.config = model.config
        self._apply = apply  # a plain function: static, not state
        self.params = _data({name: nnx.Param(value) for name, value in params.items()})

    def __call__(self, input_ids: Any, attention_mask: Any = None, labels: Any = None) -> CausalLMOutput:
        params = {name: p[...] for name, p in self.params.items()}
        out = self._apply(params, input_ids, attention_mask, labels)
        return CausalLMOutput(out["logits"], out["loss"])
