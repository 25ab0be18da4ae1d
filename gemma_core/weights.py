"""Weight sets of a config's layout: random ones for tests and benchmarks (seeded, reproducible),
the tensors a task reads (`task_weights`) and quantisation of a whole set (`quantize_model`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gemma_core.config import GemmaConfig
from gemma_core.errors import ConfigError, WeightError
from gemma_core.graph import build_graph, fuse_projections
from gemma_core.layout import LM_HEAD, SCORE, SCORE_BIAS, expected_shapes, iter_params, validate_weights
from gemma_core.quant import SCALE_SUFFIX, as_quant_config


def random_weights(config: GemmaConfig, seed: int = 0, dtype: str = "float32", task: str = "causal-lm",
                   num_labels: int = 0) -> dict[str, np.ndarray]:
    """Normal weights scaled so activations stay O(1): linear rows ~ 1/sqrt(fan_in),
    embedding rows ~ 2/sqrt(D) (unit-scale hidden states, logits of std about 2),
    norm weights ~ N(0, 0.1) so that `1 + w` differs from one. A quantised config gets the same
    draws quantised."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape, _ in iter_params(config, task, num_labels):
        if len(shape) == 1:
            std = 0.1
        elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            std = 2.0 / np.sqrt(config.hidden_size)
        else:
            std = 1.0 / np.sqrt(shape[1])
        out[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    if dtype != "float32":
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

        out = {k: v.astype(dtype) for k, v in out.items()}
    if config.quantization is not None:  # the same draws, quantised (values and scales)
        from gemma_core.quant import quantize_weights

        out = quantize_weights(out, config.quantization)
    return out


def task_weights(config: GemmaConfig, weights: Mapping[str, np.ndarray],
         task: str = "causal-lm") -> dict[str, np.ndarray]:
    """The tensors `task` reads: a redundant `lm_head.weight` of a tied model is dropped (the
    embedding is held once), and so are the heads of other tasks (a causal LM's head when
    loading it as a base model or classifier, a classifier's score when loading it as base)."""
    out = dict(weights)
    if config.tie_word_embeddings or task != "causal-lm":
        out.pop(LM_HEAD, None)
        out.pop(LM_HEAD + SCALE_SUFFIX, None)
    if task in ("causal-lm", "base"):
        out.pop(SCORE, None)
        out.pop(SCORE_BIAS, None)
    return out


def quantize_model(config: GemmaConfig, weights: Mapping[str, np.ndarray], quantize: Any,
                   task: str = "causal-lm",
                   progress: Any = None) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    """(config, weights) quantised with `quantize` (a scheme name or a `QuantConfig`)."""
    from gemma_core.quant import quantize_weights

    if config.quantization is not None:
        raise ConfigError(f"quantize: the weights are already quantised ({config.quantization.scheme})")
    quant = as_quant_config(quantize)
    config = config.replace(quantization=quant)
    weights = task_weights(config, weights, task)
    validate_weights(config.replace(quantization=None), weights, task,
                     int(weights[SCORE].shape[0]) if SCORE in weights else 0)
    return config, quantize_weights(weights, quant, progress)


def canonical_weights(model: Any) -> dict[str, np.ndarray]:
    """The model's weights as numpy arrays under the names the layout stores (`expected_shapes`:
    a quantised weight's values and scale), unfused (a backend that runs q/k/v and gate/up as
    one product holds them stacked; they are split back here). Anything else the model holds
    (an adapter's weights, a tied model's extra `lm_head.weight`) is left out."""
    config, task = model.config, model.task
    shapes = {name: shape for name, shape, _ in iter_params(config, task)}
    wanted = expected_shapes(config, task)
    held = {name: model.to_numpy(w) for name, w in model.weights.items()}
    if not set(shapes) <= set(held):
        _, groups = fuse_projections(build_graph(config, task), shapes)
        for fused, sources in groups.items():
            if fused in held:
                cuts = np.cumsum([shapes[s][0] for s in sources])[:-1]
                held.update(zip(sources, np.split(held.pop(fused), cuts, axis=0), strict=True))
    missing = sorted(set(wanted) - set(held))
    misshaped = [f"{n}: {list(held[n].shape)} for {list(s)}" for n, s in wanted.items()
                 if n in held and tuple(held[n].shape) != s]
    if missing or misshaped:
        raise WeightError(f"weights: the {model.backend.name} model's weights are not in the "
                          f"canonical layout (missing: {missing}; mis-shaped: {misshaped})")
    return {name: held[name] for name in wanted}
