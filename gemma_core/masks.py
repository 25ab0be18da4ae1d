"""The attention mask rule, shared by the NumPy reference and the `gemma mask` view."""

from __future__ import annotations

import numpy as np


def attention_mask(key_slots: np.ndarray, query_slots: np.ndarray, valid: np.ndarray,
                   window: int | None) -> np.ndarray:
    """Boolean `[B, 1, T, S]`: causal, within the window (W keys including itself), not padding."""
    q = query_slots[:, None]  # [T,1]
    k = key_slots[None, :]  # [1,S]
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible &= k > q - window
    real = valid[:, np.clip(key_slots, 0, None)] & (key_slots >= 0)  # [B,S]
    return visible[None, None] & real[:, None, None, :]
