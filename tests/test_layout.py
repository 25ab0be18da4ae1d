"""The weight layout: concrete shapes per preset, validation of weight sets, the layout table."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gemma_core.errors import WeightError
from gemma_core.layout import EMBED, LAYOUT, LM_HEAD, expected_shapes, format_layout, validate_weights
from gemma_core.presets import PRESETS
from gemma_core.weights import random_weights

ATTN = "model.layers.{}.self_attn.{}.weight"
TINY = ("tiny-gemma", "tiny-gemma2", "tiny-gemma3")


def test_gemma_2b_shapes() -> None:
    shapes = expected_shapes(PRESETS["gemma-2b"])
    assert shapes[ATTN.format(0, "q_proj")] == (2048, 2048)
    assert shapes[ATTN.format(0, "k_proj")] == (256, 2048)
    assert shapes[ATTN.format(0, "v_proj")] == (256, 2048)
    assert shapes[ATTN.format(17, "o_proj")] == (2048, 2048)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (16384, 2048)
    assert shapes["model.layers.0.mlp.up_proj.weight"] == (16384, 2048)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (2048, 16384)
    assert shapes[EMBED] == (256_000, 2048)
    assert shapes["model.norm.weight"] == (2048,)
    assert shapes["model.layers.0.input_layernorm.weight"] == (2048,)
    assert "model.layers.18.input_layernorm.weight" not in shapes


def test_gemma_3_270m_shapes() -> None:
    shapes = expected_shapes(PRESETS["gemma-3-270m"])
    assert shapes[ATTN.format(0, "q_proj")] == (1024, 640)
    assert shapes[ATTN.format(0, "k_proj")] == (256, 640)
    assert shapes[ATTN.format(0, "o_proj")] == (640, 1024)
    assert shapes[ATTN.format(0, "q_norm")] == (256,)
    assert shapes[ATTN.format(17, "k_norm")] == (256,)
    assert shapes[EMBED] == (262_144, 640)


def test_tiny_non_square_attention_shapes() -> None:
    # N*H != D: catches q/o shapes built from D instead of N*H
    shapes = expected_shapes(PRESETS["tiny-gemma2"])
    assert shapes[ATTN.format(0, "q_proj")] == (96, 64)
    assert shapes[ATTN.format(0, "k_proj")] == (48, 64)
    assert shapes[ATTN.format(0, "o_proj")] == (64, 96)


def test_gemma1_has_no_sandwich_norms_or_qk_norm() -> None:
    names = set(expected_shapes(PRESETS["gemma-2b"]))
    assert "model.layers.0.post_attention_layernorm.weight" in names
    assert not any("pre_feedforward_layernorm" in n for n in names)
    assert not any("post_feedforward_layernorm" in n for n in names)
    assert not any("q_norm" in n or "k_norm" in n for n in names)


def test_gemma2_has_sandwich_norms_but_no_qk_norm() -> None:
    names = set(expected_shapes(PRESETS["gemma-2-2b"]))
    assert "model.layers.25.pre_feedforward_layernorm.weight" in names
    assert "model.layers.25.post_feedforward_layernorm.weight" in names
    assert not any("q_norm" in n or "k_norm" in n for n in names)


@pytest.mark.parametrize(("name", "per_layer"), [("tiny-gemma", 9), ("tiny-gemma2", 11), ("tiny-gemma3", 13)])
def test_tensor_counts(name: str, per_layer: int) -> None:
    config = PRESETS[name]
    # embedding + final norm, plus per-layer tensors
    assert len(expected_shapes(config)) == 2 + per_layer * config.num_layers


@pytest.mark.parametrize("name", ["gemma-2b", "gemma-2-9b", "gemma-3-270m", *TINY])
def test_tied_models_have_no_lm_head(name: str) -> None:
    config = PRESETS[name]
    assert config.tie_word_embeddings
    assert LM_HEAD not in expected_shapes(config)


@pytest.mark.parametrize("name", TINY)
def test_untied_model_has_lm_head(name: str) -> None:
    config = PRESETS[name].replace(tie_word_embeddings=False)
    shapes = expected_shapes(config)
    assert shapes[LM_HEAD] == (config.vocab_size, config.hidden_size)
    assert len(shapes) == len(expected_shapes(PRESETS[name])) + 1


# ---- validate_weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_random_weights_validate(name: str) -> None:
    config = PRESETS[name]
    weights = random_weights(config)
    assert {k: v.shape for k, v in weights.items()} == expected_shapes(config)
    assert {v.dtype for v in weights.values()} == {np.dtype(np.float32)}
    validate_weights(config, weights)


def test_random_weights_untied_validate() -> None:
    config = PRESETS["tiny-gemma3"].replace(tie_word_embeddings=False)
    weights = random_weights(config)
    assert weights[LM_HEAD].shape == (512, 48)
    validate_weights(config, weights)
    del weights[LM_HEAD]
    with pytest.raises(WeightError, match=r"missing 1: lm_head\.weight"):
        validate_weights(config, weights)


def test_validate_reports_all_problems_at_once() -> None:
    config = PRESETS["tiny-gemma2"]
    weights = random_weights(config)
    missing = "model.layers.1.mlp.up_proj.weight"
    misshaped = ATTN.format(2, "k_proj")
    unexpected = "model.layers.0.self_attn.q_norm.weight"  # Gemma 2 has none
    del weights[missing]
    weights[misshaped] = np.zeros((47, 64), np.float32)
    weights[unexpected] = np.zeros((24,), np.float32)
    with pytest.raises(WeightError) as excinfo:
        validate_weights(config, weights)
    message = str(excinfo.value)
    assert f"missing 1: {missing}" in message
    assert f"unexpected 1: {unexpected}" in message
    assert f"mis-shaped 1: {misshaped}: expected [48, 64], got [47, 64]" in message


def test_validate_lists_every_missing_name() -> None:
    config = PRESETS["tiny-gemma"]
    weights = random_weights(config)
    gone = sorted(n for n in weights if n.startswith("model.layers.1."))
    for name in gone:
        del weights[name]
    with pytest.raises(WeightError, match=f"missing {len(gone)}: ") as excinfo:
        validate_weights(config, weights)
    for name in gone:
        assert name in str(excinfo.value)
    assert "unexpected" not in str(excinfo.value)


def test_validate_accepts_any_object_with_shape() -> None:
    config = PRESETS["tiny-gemma"]
    shapes = expected_shapes(config)
    views = {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}
    validate_weights(config, views)


def test_tied_model_may_carry_lm_head_of_embedding_shape() -> None:
    config = PRESETS["tiny-gemma3"]
    weights = random_weights(config)
    weights[LM_HEAD] = weights[EMBED].copy()
    validate_weights(config, weights)


def test_tied_model_rejects_lm_head_of_another_shape() -> None:
    config = PRESETS["tiny-gemma3"]
    weights = random_weights(config)
    weights[LM_HEAD] = np.zeros((511, 48), np.float32)
    with pytest.raises(WeightError) as excinfo:
        validate_weights(config, weights)
    assert "lm_head.weight: expected [512, 48], got [511, 48]" in str(excinfo.value)
    assert "missing" not in str(excinfo.value)


# ---- format_layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("name", ["gemma-2b", "gemma-2-2b", "gemma-3-270m"])
def test_format_layout_mentions_every_template_once(name: str, untied: bool) -> None:
    config = PRESETS[name].replace(tie_word_embeddings=not untied)
    text = format_layout(config)
    present = [row for row in LAYOUT if not (row.name == LM_HEAD and not untied)
               and row.when not in ("classification", "token-classification")  # causal LM here
               and not (row.when == "has_qk_norm" and not config.has_qk_norm)
               and not (row.when == "has_sandwich_norms" and not config.has_sandwich_norms)
               and not (row.when == "not has_sandwich_norms" and config.has_sandwich_norms)]
    assert len(text.splitlines()) == len(present)
    for row in present:
        assert text.count(row.name) == 1, row.name
        assert re.search(rf"(?m)^{re.escape(row.name)}\s+{row.role}\s", text), row.name
    for row in set(LAYOUT) - set(present):  # a name of two rows (Gemma 1's norm) shows one role
        assert not re.search(rf"(?m)^{re.escape(row.name)}\s+{row.role}\s", text), row.name


def test_format_layout_shows_concrete_sizes() -> None:
    text = format_layout(PRESETS["gemma-3-270m"])
    q_line = next(line for line in text.splitlines() if "q_proj" in line)
    assert "[N*H=1024, D=640]" in q_line
    embed_line = next(line for line in text.splitlines() if line.startswith(EMBED))
    assert "[V=262144, D=640]" in embed_line


def test_task_heads_in_the_layout() -> None:
    from gemma_core.layout import SCORE, SCORE_BIAS, expected_shapes

    config = PRESETS["tiny-gemma"]
    seq = expected_shapes(config, "sequence-classification", num_labels=3)
    tok = expected_shapes(config, "token-classification", num_labels=3)
    base = expected_shapes(config, "base")
    assert seq[SCORE] == (3, 64) and SCORE_BIAS not in seq
    assert tok[SCORE] == (3, 64) and tok[SCORE_BIAS] == (3,)
    untied = config.replace(tie_word_embeddings=False)
    assert SCORE not in base and LM_HEAD not in expected_shapes(untied, "base")
    assert "score.bias" in format_layout(config, "token-classification", 3)
