"""Helpers to build Hugging Face transformers models (the independent reference) on our random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gemma_core.config import GemmaConfig
from gemma_core.weights import random_weights


def hf_model(config: GemmaConfig, seed: int = 0, dtype: str = "float32"):  # type: ignore[no-untyped-def]
    """A transformers CausalLM (eager attention) holding `random_weights(config, seed)`."""
    import torch
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    weights = random_weights(config, seed)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    model.tie_weights()
    return model.to(getattr(torch, dtype)).eval()


def save_hf(config: GemmaConfig, folder: Path, seed: int = 0) -> Path:
    """Save a transformers model with our random weights through `save_pretrained`."""
    hf_model(config, seed).save_pretrained(folder)
    return folder


def hf_forward(model, ids: np.ndarray, mask: np.ndarray):  # type: ignore[no-untyped-def]
    """(logits [B,T,V] float64, per-layer (keys, values) numpy) with positions from the mask."""
    import torch

    positions = np.where(mask.astype(bool), np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions), use_cache=True)
    layers = [(layer.keys.float().numpy(), layer.values.float().numpy()) for layer in out.cache.layers]
    return out.logits.float().numpy().astype(np.float64), layers
