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


def hf_loss_and_grads(config: GemmaConfig, seed: int, ids: np.ndarray, mask: np.ndarray,
                      labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """transformers' loss and every parameter's gradient (float32 autograd) on
    `random_weights(config, seed)`, positions counting real tokens as ours do."""
    import torch

    model = hf_model(config, seed)
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)
    ids_t, labels_t = (torch.from_numpy(np.asarray(a, np.int64)) for a in (ids, labels))
    out = model(ids_t, attention_mask=torch.from_numpy(np.asarray(mask)),
                position_ids=torch.from_numpy(positions), labels=labels_t)
    out.loss.backward()
    grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), grads


def left_padded_batch(config: GemmaConfig, batch: int = 2, length: int = 12, pad: int = 3, *,
                      count_first: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, labels) `[batch, length]` int32: row 1 left-padded by `pad` tokens (with
    length 12, longer than tiny-gemma2/3's window of 8); labels the ids, -100 at the pads and at
    two more positions. The first real token of the padded row (predicted at a pad) counts
    unless `count_first` is False."""
    rng = np.random.default_rng(7)
    ids = rng.integers(1, config.vocab_size, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, :pad] = 0
    ids[1, :pad] = config.pad_token_id
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    labels[0, 5] = labels[1, 8] = -100
    if not count_first:
        labels[1, pad] = -100
    return ids, mask, labels


def face_configs() -> dict[str, GemmaConfig]:
    """The configs the trainable faces are checked on: one per generation, tiny-gemma2 untied so
    that an lm_head of its own is trained too."""
    from gemma_core.presets import get_preset

    return {"tiny-gemma": get_preset("tiny-gemma"),
            "tiny-gemma2-untied": get_preset("tiny-gemma2").replace(tie_word_embeddings=False),
            "tiny-gemma3": get_preset("tiny-gemma3")}
