"""Random weights of a config's layout, for tests and benchmarks (seeded, reproducible)."""

from __future__ import annotations

import numpy as np

from gemma_core.config import GemmaConfig
from gemma_core.layout import iter_params


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
