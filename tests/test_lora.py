"""LoRA and QLoRA (gemma_core.lora): the graph rewrite on every backend against the numpy reference
and merged weights, PEFT's file format both ways (PEFT loads ours and gives our logits; we load
PEFT's and give its logits), merge/unmerge, and the strict reader's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gemma_core
from gemma_core.errors import CheckpointError, ConfigError, WeightError
from gemma_core.graph import build_graph
from gemma_core.lora import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoraConfig,
    apply_lora,
    init_lora_weights,
    load_peft,
    lora_names,
    merge,
    save_peft,
    unmerge,
)
from gemma_core.model import Model
from gemma_core.presets import get_preset
from gemma_core.quant import QuantConfig, dequantize_weights
from gemma_core.safetensors_io import read_safetensors, write_safetensors
from gemma_core.weights import quantize_model, random_weights

IDS = np.array([[2, 17, 301, 45, 9, 88, 230], [0, 0, 2, 63, 111, 7, 19]])
MASK = (IDS != 0).astype(np.int64)
LORA = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))


BACKENDS = ["torch", "jax", "tensorflow", "array_api"]


def _backend(name: str) -> str:
    pytest.importorskip({"array_api": "array_api_strict"}.get(name, name))
    return name


def _trained(config, lora: LoraConfig, seed: int = 1) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """PEFT's initialisation with B drawn nonzero, as after training (B = 0 adds nothing)."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) * 0.2 if ".lora_B." in k else v
            for k, v in init_lora_weights(config, lora, seed).items()}


def _logits(model: Model) -> np.ndarray:
    return np.asarray(model.to_numpy(model.forward(IDS, MASK).logits), np.float64)


def test_adapter_equals_the_merged_reference() -> None:
    config = get_preset("tiny-gemma2")
    weights, lora_w = random_weights(config, 0), _trained(config, LORA)
    ours = _logits(Model(config, weights, lora=LORA, lora_weights=lora_w))
    merged = _logits(Model(config, merge(weights, lora_w, LORA)))
    base = _logits(Model(config, weights))
    scale = np.abs(merged).max()
    assert np.abs(ours - merged).max() <= 1e-5 * scale
    assert np.abs(ours - base).max() > 0.05 * scale  # the adapter does change the logits


def test_rewrite_targets_by_role_and_keeps_fusion() -> None:
    config = get_preset("tiny-gemma3")
    lora = LoraConfig(r=2, alpha=4, target_modules=("k_proj", "up_proj"), layers=(1,))
    graph = apply_lora(build_graph(config), config, lora)
    loras = [op for op in graph if op.kind == "lora"]
    assert [(op.layer, op.params[0]) for op in loras] == [
        (1, "model.layers.1.self_attn.k_proj.lora_A.weight"), (1, "model.layers.1.mlp.up_proj.lora_A.weight")]
    assert all(op.attrs == {"scale": 2.0} for op in loras)
    torch = _backend("torch")  # the torch backend fuses projections
    model = gemma_core.load("tiny-gemma3", backend=torch)
    fused = Model(config, random_weights(config, 0), backend=torch, lora=lora,
                  lora_weights=_trained(config, lora))
    assert sum(op.kind == "split" for op in fused.graph) == sum(op.kind == "split" for op in model.graph)
    with pytest.raises(ConfigError, match="past the model's"):
        apply_lora(build_graph(config), config, LoraConfig(layers=(9,)))


def test_rslora_scale_and_config_checks() -> None:
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scale == 2.0
    assert LoraConfig(r=16, alpha=8).scale == 0.5
    with pytest.raises(ConfigError, match="target_modules"):
        LoraConfig(target_modules=("lm_head",))
    with pytest.raises(ConfigError, match="lora r"):
        LoraConfig(r=0)


def _peft_logits(peft_model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    from hf_reference import hf_forward

    return hf_forward(peft_model, ids, mask)[0]


@pytest.mark.transformers
def test_peft_loads_our_adapter_and_gives_our_logits(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from hf_reference import hf_model

    config = get_preset("tiny-gemma3")
    lora = LoraConfig(r=4, alpha=16, target_modules=("q_proj", "k_proj", "gate_proj", "down_proj"),
                      use_rslora=True, layers=(0, 2, 5))  # PEFT's layers_to_transform
    lora_w = _trained(config, lora)
    save_peft(tmp_path / "adapter", lora, lora_w, base_model_name="tiny-gemma3", config=config)
    ours = _logits(Model(config, random_weights(config, 0), lora=lora, lora_weights=lora_w))
    theirs = _peft_logits(peft.PeftModel.from_pretrained(hf_model(config), tmp_path / "adapter"), IDS, MASK)
    real = MASK.astype(bool)  # padded positions are not compared
    assert np.abs(ours - theirs)[real].max() <= 1e-4 * np.abs(theirs).max()
    # and it is the file PEFT would write: we read it back to the same adapter
    assert load_peft(tmp_path / "adapter", config)[0] == lora


@pytest.mark.transformers
@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2"])
def test_we_load_an_adapter_peft_saved_and_give_its_logits(tmp_path: Path, preset: str) -> None:
    peft = pytest.importorskip("peft")
    import torch
    from hf_reference import hf_model

    config = get_preset(preset)
    hf = peft.get_peft_model(hf_model(config), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"],
        task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "peft")
    theirs = _peft_logits(hf.eval(), IDS, MASK)
    model = gemma_core.load(preset, seed=0, adapter=tmp_path / "peft")
    assert model.lora == LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "up_proj"),
                                    dropout=0.1)
    real = MASK.astype(bool)
    assert np.abs(_logits(model) - theirs)[real].max() <= 1e-4 * np.abs(theirs).max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_op_matches_numpy(backend: str) -> None:
    from conformance import run_conformance

    results = run_conformance([_backend(backend)], ("float32",), ["op-lora"])
    assert [(r.case, r.status) for r in results if r.case == "op-lora"] == [("op-lora", "pass")], results


@pytest.fixture(scope="module")
def qlora() -> tuple:  # type: ignore[type-arg]
    """An int4 tiny Gemma 2 (gate/up/down included), its adapter and the numpy reference logits."""
    config, weights = quantize_model(get_preset("tiny-gemma2"), random_weights(get_preset("tiny-gemma2"), 0),
                                     QuantConfig("int4", 32))
    lora = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"))
    lora_w = _trained(config, lora)
    return config, weights, lora, lora_w, _logits(Model(config, weights, lora=lora, lora_weights=lora_w))


def test_qlora_reference_is_lora_over_the_dequantised_weights(qlora: tuple) -> None:  # type: ignore[type-arg]
    config, weights, lora, lora_w, reference = qlora
    floats = dequantize_weights(weights, config.quantization)
    merged = _logits(Model(config.replace(quantization=None), merge(floats, lora_w, lora)))
    assert np.abs(reference - merged).max() <= 1e-5 * np.abs(merged).max()
    with pytest.raises(WeightError, match="is quantised; a LoRA adapter cannot be merged"):
        merge(weights, lora_w, lora)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qlora_runs_on_every_backend(qlora: tuple, backend: str) -> None:  # type: ignore[type-arg]
    config, weights, lora, lora_w, reference = qlora
    model = Model(config, weights, backend=_backend(backend), lora=lora, lora_weights=lora_w)
    assert np.abs(_logits(model) - reference).max() <= 1e-4 * np.abs(reference).max()


def test_merge_unmerge_round_trip() -> None:
    config = get_preset("tiny-gemma")
    weights, lora_w = random_weights(config, 0), _trained(config, LORA)
    merged = merge(weights, lora_w, LORA)
    name = "model.layers.1.self_attn.o_proj.weight"
    a, b = (lora_w[n] for n in lora_names(name))
    np.testing.assert_allclose(merged[name] - weights[name], LORA.scale * b @ a, atol=1e-6)
    back = unmerge(merged, lora_w, LORA)
    assert set(back) == set(weights)
    for key, w in weights.items():
        np.testing.assert_allclose(back[key], w, atol=1e-6, err_msg=key)
    assert np.array_equal(merged["model.layers.0.self_attn.k_proj.weight"],
                          weights["model.layers.0.self_attn.k_proj.weight"])  # untargeted


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    config = get_preset("tiny-gemma")
    return save_peft(tmp_path / "adapter", LORA, _trained(config, LORA))


def _edit_config(folder: Path, **changes: object) -> None:
    entry = json.loads((folder / CONFIG_FILE).read_text())
    entry.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(entry))


@pytest.mark.parametrize(("changes", "message"), [
    ({"use_dora": True}, "use_dora=true is not supported"),
    ({"bias": "lora_only"}, 'bias="lora_only" is not supported'),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=true is not supported"),
    ({"lora_alfa": 16}, "unknown key 'lora_alfa'"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"target_modules": ".*proj"}, "regular expressions are not read"),
    ({"init_lora_weights": "pissa"}, 'init_lora_weights="pissa" is not supported'),
    ({"r": 0}, "lora r"),
])
def test_config_refusals_name_the_key(saved: Path, changes: dict, message: str) -> None:  # type: ignore[type-arg]
    _edit_config(saved, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_peft(saved)


def test_newer_peft_keys_at_their_defaults_are_accepted(saved: Path) -> None:
    _edit_config(saved, some_future_option=None, peft_version="9.9.9")
    assert load_peft(saved)[0] == LORA


def _edit_tensors(folder: Path, change) -> None:  # type: ignore[no-untyped-def]
    tensors = dict(read_safetensors(folder / WEIGHTS_FILE))
    change(tensors)
    write_safetensors(folder / WEIGHTS_FILE, tensors)


def test_tensor_refusals(saved: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    config = get_preset("tiny-gemma")
    _edit_tensors(saved, lambda t: t.update({key: np.zeros((4, 65), np.float32)}))
    load_peft(saved)  # the rank is right: only the model's shapes can tell
    with pytest.raises(WeightError, match=r"q_proj.lora_A.weight: expected \[4, 64\], got \[4, 65\]"):
        load_peft(saved, config)
    with pytest.raises(WeightError, match=r"expected \[4, 64\]"):
        gemma_core.load("tiny-gemma", adapter=saved)
    _edit_tensors(saved, lambda t: t.update({key: np.zeros((3, 64), np.float32)}))
    with pytest.raises(CheckpointError, match="is not of rank r=4"):
        load_peft(saved)
    _edit_tensors(saved, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"its pair \S*q_proj\.lora_A\.weight is missing"):
        load_peft(saved)
    _edit_tensors(saved, lambda t: t.update({key: np.zeros((4, 64), np.float32),
                                             key.replace("q_proj", "k_proj"): np.zeros((4, 64), np.float32)}))
    with pytest.raises(CheckpointError, match="k_proj of layer 0 is not a target"):
        load_peft(saved)


def test_save_refuses_an_existing_folder_and_leaves_nothing_half_written(saved: Path) -> None:
    config = get_preset("tiny-gemma")
    with pytest.raises(CheckpointError, match="already exists"):
        save_peft(saved, LORA, _trained(config, LORA))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        save_peft(saved.parent / "other", LORA, {"model.norm.weight": np.zeros(64, np.float32)})
    assert sorted(p.name for p in saved.parent.iterdir()) == ["adapter"]


def test_cli_generate_with_adapter(tmp_path: Path, spm_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from gemma_core.checkpoint import save_checkpoint
    from gemma_core.cli import main

    config = get_preset("tiny-gemma3")
    folder = save_checkpoint(tmp_path / "model", config, random_weights(config, 3))
    shutil.copy(spm_file, folder / "tokenizer.model")
    lora = LoraConfig(r=4, alpha=64, target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))
    save_peft(tmp_path / "adapter", lora, _trained(config, lora, seed=5))
    args = ["generate", "--model", str(folder), "--max-new-tokens", "8", "Hello world"]
    assert main([*args, "--adapter", str(tmp_path / "adapter")]) == 0
    with_adapter = capsys.readouterr().out
    expected = gemma_core.load(folder, adapter=tmp_path / "adapter").generate("Hello world", max_new_tokens=8)
    assert with_adapter == expected.texts[0] + "\n"
    assert main(args) == 0
    assert capsys.readouterr().out != with_adapter  # the adapter changed what was generated
