"""One tolerance table, keyed by the candidate's dtype. Every widened entry says why.

float32 and float64 are compared elementwise against the float64 NumPy oracle; bfloat16 and
float16 against the NumPy reference emulating the same dtype, by distribution-level measures
for logits (argmax agreement and KL divergence) and relative L2 error for caches.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Bounds for one dtype. `*_scale` bounds are max|diff| / std(reference)."""

    reference_dtype: str
    logits_scale: float | None = None  # elementwise: max|diff| <= logits_scale * std(ref)
    top1_agreement: float | None = None  # fraction of positions whose argmax agrees, at least
    mean_kl: float | None = None  # mean KL(ref || candidate) over positions, at most
    cache_scale: float | None = None  # elementwise on cache tensors, like logits_scale
    cache_rel_l2: float | None = None  # ||diff|| / ||ref|| per cache tensor, at most
    op_rtol: float = 0.0  # per-op: |diff| <= op_rtol * |ref| + op_atol_scale * std(ref)
    op_atol_scale: float = 0.0


TOLERANCES: dict[str, Tolerance] = {
    # A float64 realisation must agree with the oracle to rounding of a different summation order.
    "float64": Tolerance("float64", logits_scale=1e-9, cache_scale=1e-9, op_rtol=1e-9,
                         op_atol_scale=1e-12),
    # The DESIGN.md expectation: max|diff| <= 1e-4 of the logit scale.
    "float32": Tolerance("float64", logits_scale=1e-4, cache_scale=1e-4, op_rtol=1e-5,
                         op_atol_scale=1e-6),
    # bf16 keeps 8 mantissa bits: one op may differ by a few ulps (2**-8 each) from a different
    # accumulation order, and the differences compound over layers, so logits are compared as
    # distributions (measured numpy-bf16 vs fp64 oracle on the tiny presets: top-1 1.0, mean KL
    # <= 4e-4), and caches by relative L2 error.
    # Per-op bounds are 8 ulps: fused kernels (torch SDPA, XLA fusions) keep some intermediates
    # in float32 where the eager reference rounds each op's output to bf16.
    "bfloat16": Tolerance("bfloat16", top1_agreement=0.95, mean_kl=1e-2, cache_rel_l2=2e-2,
                          op_rtol=2.0**-5, op_atol_scale=2.0**-7),
    # fp16 has 11 mantissa bits: 8x tighter than bf16 (Gemma 1 only; Gemma 2/3 are refused).
    "float16": Tolerance("float16", top1_agreement=0.98, mean_kl=2e-3, cache_rel_l2=4e-3,
                         op_rtol=2.0**-8, op_atol_scale=2.0**-10),
}


# bf16/fp16 on a deep model with real weights: the emulated reference itself sits some distance
# from the exact (float64) answer, and a conformant backend that rounds elsewhere (fused kernels,
# float32 intermediates) sits at a similar distance in another direction. Measured on the real
# Gemma 3 270M, bf16, 17 prefill positions: numpy-bf16 vs float64 KL 1.0e-2, top-1 0.88;
# torch/jax/tensorflow-bf16 vs numpy-bf16 KL 0.8-1.1e-2, top-1 0.82-0.94, and single decode steps
# (two positions) up to 2.6e-2. A narrow-dtype bound is therefore the table's value or
# ORACLE_SLACK times the reference's own largest error against the float64 oracle so far in the
# run (top-1: its disagreement), whichever is looser. On the tiny catalogue models the
# reference's own error is small (KL <= 4e-4), so the table's values govern there.
ORACLE_SLACK = 3.0


def widen_logits(tol: Tolerance, ref_top1: float, ref_kl: float) -> Tolerance:
    """`tol` with its logit bounds loosened to the reference's own error (see ORACLE_SLACK)."""
    assert tol.top1_agreement is not None and tol.mean_kl is not None
    top1 = 1.0 - ORACLE_SLACK * (1.0 - ref_top1)
    return dataclasses.replace(tol, top1_agreement=min(tol.top1_agreement, top1),
                               mean_kl=max(tol.mean_kl, ORACLE_SLACK * ref_kl))


def widen_cache(tol: Tolerance, ref_rel_l2: float) -> Tolerance:
    """`tol` with its cache bound loosened to the reference's own error (see ORACLE_SLACK)."""
    assert tol.cache_rel_l2 is not None
    return dataclasses.replace(tol, cache_rel_l2=max(tol.cache_rel_l2, ORACLE_SLACK * ref_rel_l2))
