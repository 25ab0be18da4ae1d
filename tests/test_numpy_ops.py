"""Each numerics rule of DESIGN.md checked on the NumPy reference ops against closed forms.

Where a rule is a choice between two plausible computations, the test also shows that the
wrong one gives a different answer, so the test can fail.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from backends.numpy.ops import make_op_table, rope_angles
from gemma_core.masks import attention_mask

BF16 = ml_dtypes.bfloat16
F32 = make_op_table("float32")
B16 = make_op_table("bfloat16")


def bf(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def rope(table, x: np.ndarray, pos: np.ndarray, theta: float, scaling: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    cos, sin = table["rope_table"](pos, head_dim=x.shape[-1], theta=theta, scaling=scaling)
    return table["rope"](x, cos, sin)


# ---- rule 1: embedding scale rounded to the compute dtype -----------------------------------

@pytest.mark.parametrize(("hidden", "bf16_scale"), [(640, 25.25), (2048, 45.25), (3072, 55.5),
                                                    (1152, 34.0), (5376, 73.5)])
def test_embed_scale_rounds_to_bf16(hidden: int, bf16_scale: float) -> None:
    table = np.ones((3, 4), np.float32)
    out = B16["embed"](np.array([[1]]), table, scale=math.sqrt(hidden))
    assert out.shape == (1, 1, 4)
    assert np.all(out == bf16_scale)
    exact = F32["embed"](np.array([[1]]), table, scale=math.sqrt(hidden))
    assert np.all(exact == np.float32(math.sqrt(hidden)))


def test_embed_uses_unscaled_table_rows() -> None:
    table = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = F32["embed"](np.array([[2, 0]]), table, scale=2.0)
    np.testing.assert_array_equal(out[0], np.stack([table[2], table[0]]) * 2)


# ---- rule 2: RMSNorm in float32, (1 + w), one cast at the end --------------------------------

def test_rms_norm_formula_float32(rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 3, 16)).astype(np.float32) * 50
    w = rng.standard_normal(16).astype(np.float32)
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * (1 + w)
    np.testing.assert_allclose(F32["rms_norm"](x, w, eps=1e-6), expected, rtol=2e-6)


def test_rms_norm_bf16_casts_once_not_llama_order(rng: np.random.Generator) -> None:
    x = bf(rng.standard_normal((4, 64)) * 30)
    w = bf(rng.standard_normal(64) * 4)
    normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(1e-6))
    gemma = bf(normed * (1 + w))  # one rounding at the end
    llama = bf(bf(normed) * bf(1 + w))  # cast, then multiply in bf16
    out = B16["rms_norm"](x, w, eps=1e-6)
    np.testing.assert_array_equal(out, gemma)
    assert (out != llama).any()


def test_rms_norm_eps_matters_for_tiny_inputs() -> None:
    x = np.full((1, 4), 1e-4, np.float32)
    w = np.zeros(4, np.float32)
    np.testing.assert_allclose(F32["rms_norm"](x, w, eps=1e-6), x / np.sqrt(1e-8 + 1e-6), rtol=1e-6)


# ---- rule 3: RoPE rotate-half, float32 angles, cos/sin cast to the compute dtype --------------

def test_rope_is_rotate_half_not_interleaved(rng: np.random.Generator) -> None:
    h = 8
    x = rng.standard_normal((1, 1, 3, h)).astype(np.float32)
    pos = np.array([[0, 5, 11]])
    out = rope(F32, x, pos, 10_000.0, 1.0)
    inv = 1.0 / 10_000.0 ** (np.arange(0, h, 2) / h)
    ang = pos[0, :, None] * inv  # [T, H/2]
    first, second = x[0, 0, :, : h // 2], x[0, 0, :, h // 2:]
    rot = (first + 1j * second) * np.exp(1j * ang)  # pairs (i, i + H/2)
    np.testing.assert_allclose(out[0, 0], np.concatenate([rot.real, rot.imag], -1), atol=1e-5)
    even, odd = x[0, 0, :, 0::2], x[0, 0, :, 1::2]
    inter = (even + 1j * odd) * np.exp(1j * ang)  # interleaved pairs (2i, 2i + 1)
    wrong = np.stack([inter.real, inter.imag], -1).reshape(3, h)
    assert np.abs(out[0, 0] - wrong).max() > 0.1


def test_rope_position_zero_is_identity(rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 3, 1, 16)).astype(np.float32)
    np.testing.assert_array_equal(rope(F32, x, np.zeros((2, 1), int), 1e6, 8.0), x)


def test_rope_angles_are_float32_and_linear_scaling_divides_positions() -> None:
    pos = np.array([[28_000, 32_767]])
    ang = rope_angles(pos, 256, 1e6, 1.0)
    assert ang.dtype == np.float32
    exact = pos[..., None] / 1e6 ** (np.arange(0, 256, 2) / 256)
    # float32 angles stay close to the float64 ones (a bf16 angle would be off by tens of radians)
    assert np.abs(ang[..., :128] - exact).max() < 0.01
    bf16_angles = bf(bf(pos[..., None]) * bf(1.0 / 1e6 ** (np.arange(0, 256, 2) / 256)))
    assert np.abs(bf16_angles - exact).max() > 1.0
    scaled = rope_angles(pos * 8, 256, 1e6, 8.0)
    np.testing.assert_allclose(scaled, ang, rtol=1e-6)


def test_rope_bf16_rounds_cos_sin(rng: np.random.Generator) -> None:
    x = bf(rng.standard_normal((1, 1, 2, 8)))
    pos = np.array([[3, 1000]])
    ang = rope_angles(pos, 8, 1e4, 1.0)[:, None]
    cos, sin = bf(np.cos(ang)), bf(np.sin(ang))
    rot = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    np.testing.assert_array_equal(rope(B16, x, pos, 1e4, 1.0), bf(bf(x * cos) + bf(rot * sin)))


# ---- rule 4: attention scale, GQA mapping, softcap before the mask, finfo.min, fp32 softmax ---

def _attend(table, q, k, v, valid=None, window=None, softcap=None, scale=1.0):  # type: ignore[no-untyped-def]
    t, s = q.shape[2], k.shape[2]
    valid = np.ones((q.shape[0], s), bool) if valid is None else valid
    mask = attention_mask(np.arange(s), np.arange(s - t, s), valid, window)
    return table["attention"](q, k, v, table["attention_bias"](mask), scale=scale, softcap=softcap)


def test_gqa_query_head_reads_kv_head_h_div_group(rng: np.random.Generator) -> None:
    q = rng.standard_normal((1, 6, 1, 4)).astype(np.float32)
    k = rng.standard_normal((1, 3, 5, 4)).astype(np.float32)
    v = np.arange(3, dtype=np.float32)[None, :, None, None] * np.ones((1, 3, 5, 4), np.float32)
    out = _attend(F32, q, k, v)  # each kv head's values are its index
    np.testing.assert_allclose(out[0, :, 0, 0], [0, 0, 1, 1, 2, 2], atol=1e-6)


def test_attention_matches_explicit_formula(rng: np.random.Generator) -> None:
    q = rng.standard_normal((1, 2, 3, 4))
    k, v = rng.standard_normal((1, 1, 3, 4)), rng.standard_normal((1, 1, 3, 4))
    s = (q @ k.transpose(0, 1, 3, 2)) * 0.7
    s = np.tanh(s / 0.9) * 0.9
    s = np.where(np.tril(np.ones((3, 3), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ v
    out = _attend(make_op_table("float64"), q, k, v, softcap=0.9, scale=0.7)
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_softcap_applies_before_the_mask(rng: np.random.Generator) -> None:
    """With the cap before the mask, masked keys get exactly zero weight; a cap applied after the
    additive mask would turn finfo.min into -cap and leak probability to masked keys."""
    q = rng.standard_normal((1, 1, 1, 4)).astype(np.float32) * 5
    k = rng.standard_normal((1, 1, 4, 4)).astype(np.float32) * 5
    v = np.eye(4, dtype=np.float32)[None, None]
    valid = np.array([[False, True, True, True]])
    out = _attend(F32, q, k, v, valid=valid, softcap=0.5)
    assert out[0, 0, 0, 0] == 0.0
    assert abs(out[0, 0, 0].sum() - 1) < 1e-6


def test_mask_fill_is_the_dtypes_finite_minimum() -> None:
    q = np.zeros((1, 1, 1, 2), np.float32)
    k = np.zeros((1, 1, 2, 2), np.float32)
    v = np.array([[[[1.0, 0.0], [0.0, 1.0]]]], np.float32)
    out = _attend(B16, q, k, v, valid=np.array([[False, False]]))
    assert np.isfinite(out).all()  # a fully masked (pad) row stays finite: uniform weights
    np.testing.assert_allclose(out[0, 0, 0], [0.5, 0.5])


# ---- rule 5: sliding window of W keys including the query itself -----------------------------

def test_window_mask_literal() -> None:
    mask = attention_mask(np.arange(5), np.arange(5), np.ones((1, 5), bool), window=3)[0, 0]
    expected = np.array([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], bool)
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("window", [4, 5, 6])
def test_window_just_below_at_and_above_length(window: int) -> None:
    mask = attention_mask(np.arange(5), np.arange(5), np.ones((1, 5), bool), window=window)[0, 0]
    expect = np.tril(np.ones((5, 5), bool))
    if window == 4:
        expect[4, 0] = False  # just below the length: the oldest key drops out of the last row
    np.testing.assert_array_equal(mask, expect)


def test_mask_padding_and_empty_slots() -> None:
    valid = np.array([[False, False, True, True]])
    mask = attention_mask(np.array([-1, 0, 1, 2, 3]), np.array([3]), valid, window=None)
    np.testing.assert_array_equal(mask[0, 0, 0], [False, False, False, True, True])


# ---- rules 6 and 8: tanh GELU, softcap ------------------------------------------------------

def test_gelu_is_tanh_approximation_not_erf() -> None:
    x = np.linspace(-5, 5, 101).astype(np.float32)
    tanh = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    erf = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    out = F32["gelu_tanh"](x)
    np.testing.assert_allclose(out, tanh, atol=1e-6)
    assert np.abs(out - erf).max() > 1e-4


def test_softcap_formula_and_bound() -> None:
    x = np.array([-1e4, -30.0, 0.0, 1.0, 1e4], np.float32)
    out = F32["softcap"](x, cap=30.0)
    np.testing.assert_allclose(out, np.tanh(x / 30) * 30, rtol=1e-6)
    assert np.abs(out).max() <= 30


def test_linear_is_x_times_w_transposed(rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 3)).astype(np.float32)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(F32["linear"](x, w), x @ w.T, rtol=1e-6)
