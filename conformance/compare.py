"""Comparison measures: each returns (passed, text naming the measured error and its bound)."""

from __future__ import annotations

import numpy as np

from conformance.tolerances import Tolerance


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def compare_logits(ref: np.ndarray, cand: np.ndarray, real: np.ndarray,
                   tol: Tolerance) -> tuple[bool, str]:
    """Logits `[B, P, V]` at the real (non-pad) positions `real [B, P]`."""
    if ref.shape != cand.shape:
        return False, f"shape {cand.shape} != reference {ref.shape}"
    r, c = ref[real].astype(np.float64), cand[real].astype(np.float64)
    if not np.isfinite(c).all():
        return False, "non-finite logits"
    if tol.logits_scale is not None:
        err = float(np.abs(r - c).max() / max(r.std(), 1e-30))
        return err <= tol.logits_scale, f"max|diff|/std {err:.2e} (bound {tol.logits_scale:.0e})"
    assert tol.top1_agreement is not None and tol.mean_kl is not None
    top1, kl = logit_distance(r, c)
    ok = top1 >= tol.top1_agreement and kl <= tol.mean_kl
    return ok, (f"top-1 agreement {top1:.3f} (bound >= {tol.top1_agreement:.3g}), "
                f"mean KL {kl:.2e} (bound {tol.mean_kl:.0e})")


def logit_distance(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || cand)) of logits `[N, V]`."""
    top1 = float((ref.argmax(-1) == cand.argmax(-1)).mean())
    p, q = _softmax(ref.astype(np.float64)), _softmax(cand.astype(np.float64))
    return top1, float((p * (np.log(p + 1e-30) - np.log(q + 1e-30))).sum(-1).mean())


def relative_l2(ref: np.ndarray, cand: np.ndarray) -> float:
    """||cand - ref|| / ||ref||."""
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    return float(np.linalg.norm(r - c)) / max(float(np.linalg.norm(r)), 1e-30)


def compare_tensor(ref: np.ndarray, cand: np.ndarray, tol: Tolerance) -> tuple[bool, str]:
    """A cache tensor: elementwise for float32/64, relative L2 error for narrower dtypes."""
    if ref.shape != cand.shape:
        return False, f"shape {cand.shape} != reference {ref.shape}"
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    if not np.isfinite(c).all():
        return False, "non-finite values"
    if r.size == 0:
        return True, "empty"
    if tol.cache_scale is not None:
        err = float(np.abs(r - c).max() / max(r.std(), 1e-30))
        return err <= tol.cache_scale, f"max|diff|/std {err:.2e} (bound {tol.cache_scale:.0e})"
    assert tol.cache_rel_l2 is not None
    err = relative_l2(r, c)
    return err <= tol.cache_rel_l2, f"relative L2 {err:.2e} (bound {tol.cache_rel_l2:.0e})"


def compare_op(ref: np.ndarray, cand: np.ndarray, tol: Tolerance) -> tuple[bool, str]:
    """One op output: |diff| <= op_rtol * |ref| + op_atol_scale * std(ref), elementwise."""
    if ref.shape != cand.shape:
        return False, f"shape {cand.shape} != reference {ref.shape}"
    if not np.isfinite(cand).all():
        return False, "non-finite values"
    bound = tol.op_rtol * np.abs(ref) + tol.op_atol_scale * max(float(ref.std()), 1e-30)
    excess = np.abs(ref - cand) - bound
    worst = float((np.abs(ref - cand) / np.maximum(bound, 1e-300)).max()) if ref.size else 0.0
    return bool((excess <= 0).all()), f"worst |diff|/bound {worst:.2f} (bound 1)"
