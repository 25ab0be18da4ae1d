"""keras-hub's LoRA to and from PEFT's (gemma_core.formats.keras_lora): our adapter set on a
keras-hub backbone (`enable_lora`) gives keras-hub the logits gemma_core gives with the adapter,
and the backbone's LoRA read back is the same adapter (float32: max|diff| <= 1e-4 * std)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # before keras is first imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path

import numpy as np
import pytest

import gemma_core
from gemma_core.checkpoint import save_checkpoint
from gemma_core.errors import ConfigError
from gemma_core.formats.convert import convert
from gemma_core.formats.keras_lora import from_backbone, keras_rank, keras_to_peft, peft_to_keras, to_backbone
from gemma_core.lora import LoraConfig, lora_shapes, write_peft_files
from gemma_core.presets import get_preset
from gemma_core.quant import MODULE_ROLES
from gemma_core.weights import random_weights

IDS = np.random.default_rng(5).integers(4, 512, size=(2, 21))  # past the sliding window (8)
SCALE = 1e-4

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def _adapter(config: gemma_core.GemmaConfig, lora: LoraConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random A and B (PEFT's fresh B is zero, which would show nothing)."""
    rng = np.random.default_rng(seed)
    shapes = lora_shapes(config, lora)
    return {n: (rng.standard_normal(s) * 0.2).astype(np.float32) for n, s in shapes.items()}


def _delta(lora: LoraConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The update `scale * B @ A` of every adapted projection, float64."""
    a = {n.removesuffix(".lora_A.weight"): w.astype(np.float64) for n, w in weights.items() if "lora_A" in n}
    return {n: lora.scale * (weights[n + ".lora_B.weight"].astype(np.float64) @ w) for n, w in a.items()}


def test_peft_to_keras_and_back_keeps_every_update() -> None:
    config = get_preset("tiny-gemma3")
    lora = LoraConfig(r=3, alpha=5.0, target_modules=tuple(MODULE_ROLES), layers=(0, 2))
    weights = _adapter(config, lora)
    rank, tensors = peft_to_keras(config, lora, weights)
    assert rank == keras_rank(config, lora) == min(config.head_dim, config.num_heads * lora.r)
    assert len(tensors) == config.num_layers * len(MODULE_ROLES)  # keras-hub: every block
    assert not np.any(tensors["decoder_block_1/attention/query"][0])  # a block left out: zeros
    back, again = keras_to_peft(config, tensors)
    want, got = _delta(lora, weights), _delta(back, again)
    assert set(want) <= set(got)
    for name, d in got.items():
        ref = want.get(name, np.zeros_like(d))
        assert np.abs(d - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0), name
    with pytest.raises(ConfigError, match="cannot hold"):
        peft_to_keras(config, lora, weights, rank=rank - 1)


@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma3"])
def test_keras_hub_with_our_adapter_gives_our_logits(tmp_path: Path, preset: str) -> None:
    keras_hub = pytest.importorskip("keras_hub")
    config = get_preset(preset)
    src = save_checkpoint(tmp_path / "src", config, random_weights(config, seed=7))
    convert(src, tmp_path / "keras", "keras-hub")
    lora = LoraConfig(r=2, alpha=4.0, target_modules=tuple(MODULE_ROLES))
    weights = _adapter(config, lora, seed=1)
    (tmp_path / "adapter").mkdir()
    write_peft_files(tmp_path / "adapter", lora, weights)
    base = gemma_core.load(src).forward(IDS).logits
    ours = gemma_core.load(src, adapter=tmp_path / "adapter").forward(IDS).logits
    assert np.abs(ours - base).max() > 100 * SCALE * ours.std()  # the adapter matters

    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "keras"))
    to_backbone(backbone, config, lora, weights)
    inputs = {"token_ids": IDS.astype("int32"), "padding_mask": np.ones_like(IDS, dtype="int32")}
    theirs = np.asarray(backbone.token_embedding(backbone(inputs), reverse=True))
    assert np.abs(theirs - ours).max() <= SCALE * ours.std()

    back, again = from_backbone(backbone, config)  # keras-hub's LoRA read back as PEFT's
    (tmp_path / "back").mkdir()
    write_peft_files(tmp_path / "back", back, again)
    read = gemma_core.load(src, adapter=tmp_path / "back").forward(IDS).logits
    assert np.abs(read - ours).max() <= SCALE * ours.std()
