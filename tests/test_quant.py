"""Weight-only quantisation: the stored format (packing, scales, errors), quantised models on the
reference, saved and loaded checkpoints, bad input, and the CLI. (Every backend against the
reference on quantised weights: the conformance cases op-quantized, gemma2-int8, ...)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gemma_core
from gemma_core.checkpoint import load_checkpoint, save_checkpoint
from gemma_core.cli import main
from gemma_core.errors import ConfigError, WeightError
from gemma_core.quant import (
    NF4,
    QuantConfig,
    dequantize,
    pack_nibbles,
    parse_scheme,
    quantize,
    quantize_weights,
    unpack_nibbles,
)
from gemma_core.weights import random_weights


def test_nibbles_are_packed_low_then_high() -> None:
    codes = np.array([[1, 2, 15, 0], [7, 8, 9, 10]], np.uint8)
    packed = pack_nibbles(codes)
    np.testing.assert_array_equal(packed, [[0x21, 0x0F], [0x87, 0xA9]])
    np.testing.assert_array_equal(unpack_nibbles(packed), codes)


def test_int8_is_symmetric_per_output_channel() -> None:
    w = np.array([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 1.0, -0.5, 0.1]], np.float32)
    q, s = quantize(w, "int8")
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (3,)
    np.testing.assert_array_equal(q[0], [64, -127, 32, 0])  # 0.5 / (1/127) = 63.5 rounds to even
    np.testing.assert_array_equal(q[1], 0)  # an all-zero row stays zero (no division by zero)
    np.testing.assert_allclose(s, [1 / 127, 0, 2 / 127], rtol=1e-7)
    assert np.abs(dequantize(q, s, "int8") - w).max() <= s.max() / 2 + 1e-7


@pytest.mark.parametrize("group", [32, 128])
def test_int4_groups_are_asymmetric_and_no_worse_than_the_full_range(group: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_t(4, (24, 256)).astype(np.float32)  # heavy tails: clipping pays
    w[:4] = np.abs(w[:4]) + 0.5  # and rows of one-signed groups
    values, scale = quantize(w, "int4", group)
    assert values.dtype == np.uint8 and values.shape == (24, 128)
    assert scale.shape == (24, 256 // group, 2)  # (step, offset) per group
    back = dequantize(values, scale, "int4", group).reshape(24, -1, group)
    g = w.reshape(24, -1, group)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    step = (hi - lo) / 15  # the unclipped grid, one of the candidates
    full = np.clip(np.rint((g - lo) / step), 0, 15) * step + lo
    ours, plain = np.square(back - g).sum(-1), np.square(full - g).sum(-1)
    assert (ours <= plain * (1 + 1e-5)).all()
    assert ours.sum() < plain.sum()  # and clipping the tails helps overall
    assert (unpack_nibbles(values) <= 15).all() and (scale[..., 0] > 0).all()


def test_nf4_groups_round_trip_within_half_a_step() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 256)).astype(np.float32)
    values, scale = quantize(w, "nf4", 64)
    assert values.dtype == np.uint8 and values.shape == (24, 128) and scale.shape == (24, 4)
    back = dequantize(values, scale, "nf4", 64)
    err = np.abs(back - w).reshape(24, -1, 64)
    assert (err <= scale[..., None] * np.diff(NF4).max() / 2 + 1e-6).all()
    g = w.reshape(24, -1, 64)  # each group's largest magnitude is represented exactly
    peak = np.abs(g).argmax(-1)[..., None]
    np.testing.assert_allclose(np.take_along_axis(back.reshape(24, -1, 64), peak, -1),
                               np.take_along_axis(g, peak, -1), rtol=1e-6)


def test_bad_schemes_and_group_sizes_are_named() -> None:
    with pytest.raises(ConfigError, match="scheme: unsupported value 'int3'"):
        QuantConfig("int3")
    with pytest.raises(ConfigError, match="group_size: 48 is not supported"):
        QuantConfig("int4", 48)
    with pytest.raises(ConfigError, match="int8 uses one scale per output channel"):
        QuantConfig("int8", 32)
    with pytest.raises(ConfigError, match="embedding: unsupported value 'fp8'"):
        QuantConfig("int4", embedding="fp8")
    with pytest.raises(ConfigError, match="unsupported value '2'"):
        parse_scheme("2")
    # tiny-gemma3 has hidden size 48: groups of 32 do not divide the projections' inputs
    with pytest.raises(WeightError, match="input size 48 is not divisible by group_size 32"):
        gemma_core.load("tiny-gemma3", quantize="int4")


def test_quantised_model_follows_the_float_model() -> None:
    ids = np.array([[2, 17, 40, 99, 5, 6, 7, 8]])
    ref = np.asarray(gemma_core.load("tiny-gemma2", seed=5).forward(ids).logits)
    for scheme, bound in (("int8", 0.15), ("int4", 1.5)):  # of the logits' std; random weights
        model = gemma_core.load("tiny-gemma2", seed=5, quantize=scheme)
        assert model.config.quantization == QuantConfig(scheme)
        assert model.weights["model.layers.0.mlp.up_proj.weight"].dtype == (
            np.int8 if scheme == "int8" else np.uint8)
        assert model.weights["model.embed_tokens.weight"].dtype == np.int8  # int8 by default
        ops = {(op.kind, op.attrs.get("scheme")) for op in model.graph if op.kind.startswith("q")}
        assert ops == {("qembed", "int8"), ("qlinear", "int8"), ("qlinear", scheme)}
        assert "linear" not in {op.kind for op in model.graph}
        out = np.asarray(model.forward(ids).logits)
        assert np.abs(out - ref).max() <= bound * ref.std()


def test_float_embedding_keeps_embed_and_tied_head_in_float() -> None:
    model = gemma_core.load("tiny-gemma", quantize=QuantConfig("int8", embedding="float"))
    kinds = [(op.kind, op.params[0]) for op in model.graph if op.params and "embed" in op.params[0]]
    assert kinds == [("embed", "model.embed_tokens.weight"), ("linear", "model.embed_tokens.weight")]
    assert model.weights["model.embed_tokens.weight"].dtype == np.float32


def test_quantised_checkpoint_saves_and_loads(tmp_path: Path) -> None:
    config = gemma_core.get_preset("tiny-gemma2").replace(quantization=QuantConfig("int4", 32))
    weights = random_weights(config, 2)
    folder = save_checkpoint(tmp_path / "q", config, weights, dtype="bfloat16")
    hf = json.loads((folder / "config.json").read_text())
    assert hf["quantization_config"] == {"quant_method": "gemma-core", "scheme": "int4", "bits": 4,
                                         "group_size": 32, "embedding": "int8"}
    loaded_config, loaded = load_checkpoint(folder)
    assert loaded_config.quantization == config.quantization
    name = "model.layers.1.self_attn.o_proj.weight"
    np.testing.assert_array_equal(loaded[name], weights[name])  # values kept, not cast
    np.testing.assert_array_equal(loaded[name + "_scale"], weights[name + "_scale"])
    assert loaded["model.norm.weight"].dtype.name == "bfloat16"  # floating weights cast
    ids = np.array([[2, 9, 8, 7]])
    a = gemma_core.load(str(folder)).forward(ids).logits
    b = gemma_core.Model(config, {k: (v if v.dtype.kind in "iu" or k.endswith("_scale") else
                                      v.astype("bfloat16").astype(np.float32))
                                  for k, v in weights.items()}).forward(ids).logits
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_missing_scale_and_wrong_dtype_are_named(tmp_path: Path) -> None:
    config = gemma_core.get_preset("tiny-gemma").replace(quantization=QuantConfig("int8"))
    weights = random_weights(config, 0)
    broken = dict(weights)
    del broken["model.layers.0.mlp.down_proj.weight_scale"]
    with pytest.raises(WeightError, match=r"missing 1: model\.layers\.0\.mlp\.down_proj\.weight_scale"):
        gemma_core.Model(config, broken)
    wrong = {**weights, "model.layers.1.mlp.up_proj.weight":
             weights["model.layers.1.mlp.up_proj.weight"].astype(np.float32)}
    with pytest.raises(WeightError, match=r"expected int8 quantised values \(int8\), got float32"):
        gemma_core.Model(config, wrong)
    with pytest.raises(ConfigError, match="already quantised"):
        gemma_core.load(str(save_checkpoint(tmp_path / "q", config, weights)), quantize="int8")


def test_other_quantization_methods_are_refused() -> None:
    hf = gemma_core.get_preset("tiny-gemma").to_hf()
    hf["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ConfigError, match="quant_method 'bitsandbytes' is not supported"):
        gemma_core.GemmaConfig.from_hf(hf)


def test_quantize_weights_quantises_a_tied_tensor_once() -> None:
    w = np.ones((32, 64), np.float32)
    out = quantize_weights({"model.embed_tokens.weight": w, "lm_head.weight": w}, QuantConfig("int8"))
    assert out["model.embed_tokens.weight"] is out["lm_head.weight"]


def test_cli_quantize_then_generate(tmp_path: Path, spm_file: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = gemma_core.get_preset("tiny-gemma")
    src = save_checkpoint(tmp_path / "f", config, random_weights(config, 1))
    (src / "tokenizer.model").write_bytes(spm_file.read_bytes())
    assert main(["quantize", str(src), str(tmp_path / "q4"), "--bits", "4", "--group-size", "32"]) == 0
    assert "int4, groups of 32, embedding int8" in capsys.readouterr().err
    assert (tmp_path / "q4" / "tokenizer.model").is_file()
    assert main(["quantize", str(src), str(tmp_path / "q4"), "--bits", "8"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", str(src), str(tmp_path / "bad"), "--bits", "4", "--group-size", "48"]) == 2
    assert "group_size: 48 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    assert main(["info", "--model", str(tmp_path / "q4")]) == 0
    assert "quantization      int4, groups of 32, embedding int8" in capsys.readouterr().out
    args = ["generate", "--model", str(tmp_path / "q4"), "--max-new-tokens", "4", "--greedy", "hello"]
    assert main(args) == 0
    quantised = capsys.readouterr().out
    assert main(["generate", "--model", str(src), "--quantize", "int4", "--group-size", "32",
                 "--max-new-tokens", "4", "--greedy", "hello"]) == 0
    assert capsys.readouterr().out == quantised  # quantising on load = loading the quantised folder


def test_quantising_and_converting_keep_the_source_float_dtype(tmp_path: Path) -> None:
    from gemma_core.formats.convert import convert, quantize

    config = gemma_core.get_preset("tiny-gemma2")
    src = save_checkpoint(tmp_path / "bf16", config, random_weights(config, 3), dtype="bfloat16")
    quantize(src, tmp_path / "q", QuantConfig("int8", embedding="float"))
    _, weights = load_checkpoint(tmp_path / "q")
    assert weights["model.embed_tokens.weight"].dtype.name == "bfloat16"  # not widened
    assert weights["model.norm.weight"].dtype.name == "bfloat16"
    assert weights["model.layers.0.mlp.up_proj.weight_scale"].dtype == np.float32
    convert(tmp_path / "q", tmp_path / "half", "hf", "float16")  # floats cast, quantised kept
    _, half = load_checkpoint(tmp_path / "half")
    assert half["model.norm.weight"].dtype == np.float16
    assert half["model.layers.0.mlp.up_proj.weight"].dtype == np.int8
    assert half["model.layers.0.mlp.up_proj.weight_scale"].dtype == np.float32


def test_a_backend_with_the_old_prepare_weights_signature_still_loads_float_models() -> None:
    from backends.numpy import NumpyBackend

    class Old(NumpyBackend):
        def prepare_weights(self, weights, dtype, device):  # type: ignore[no-untyped-def,override]
            return super().prepare_weights(weights, dtype, device)

    model = gemma_core.load("tiny-gemma", backend=Old())
    assert model.forward(np.array([[2, 3]])).logits.shape == (1, 2, 512)


def test_a_quantised_checkpoint_converts_to_other_formats_dequantised(tmp_path: Path) -> None:
    from gemma_core.formats.convert import convert, read
    from gemma_core.quant import dequantize_weights

    config = gemma_core.get_preset("tiny-gemma").replace(quantization=QuantConfig("int4"))
    weights = random_weights(config, 6)
    src = save_checkpoint(tmp_path / "q", config, weights)
    convert(src, tmp_path / "m.gguf", "gguf")
    back = read(tmp_path / "m.gguf")
    assert back.config.quantization is None
    want = dequantize_weights(weights, config.quantization)
    assert sorted(back.weights) == sorted(want)
    name = "model.layers.1.self_attn.k_proj.weight"
    np.testing.assert_array_equal(back.weights[name], want[name])


def test_module_overrides_store_some_projections_otherwise(tmp_path: Path) -> None:
    quant = parse_scheme("int4", modules="v_proj=int8, down_proj=float")
    assert quant.modules == (("down_proj", "float"), ("v_proj", "int8"))
    assert quant.describe() == "int4, groups of 32, embedding int8, down_proj float, v_proj int8"
    assert QuantConfig.from_hf(quant.to_hf()) == quant
    model = gemma_core.load("tiny-gemma2", seed=3, quantize=quant)
    stored = {op.params[0].split(".")[-2]: (op.kind, op.attrs.get("scheme"))
              for op in model.graph if op.params and op.params[0].startswith("model.layers.0.")
              and op.kind in ("linear", "qlinear")}
    assert stored == {"q_proj": ("qlinear", "int4"), "k_proj": ("qlinear", "int4"),
                      "v_proj": ("qlinear", "int8"), "o_proj": ("qlinear", "int4"),
                      "gate_proj": ("qlinear", "int4"), "up_proj": ("qlinear", "int4"),
                      "down_proj": ("linear", None)}
    assert model.weights["model.layers.0.mlp.down_proj.weight"].dtype == np.float32
    assert model.weights["model.layers.0.self_attn.v_proj.weight"].dtype == np.int8
    folder = save_checkpoint(tmp_path / "q", model.config, model.weights)
    hf = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert hf["modules"] == {"down_proj": "float", "v_proj": "int8"}
    ids = np.array([[2, 9, 8, 7, 6]])
    np.testing.assert_array_equal(gemma_core.load(str(folder)).forward(ids).logits,
                                  model.forward(ids).logits)
    mixed = parse_scheme("int4-mixed", modules="o_proj=float")  # a recipe, plus an override
    assert mixed.modules == (("down_proj", "int8"), ("o_proj", "float"), ("v_proj", "int8"))
    # an int8 model with a 4-bit override takes a group size
    assert parse_scheme("int8", modules={"down_proj": "int4"}).group_size == 32


def test_bad_module_overrides_are_named() -> None:
    with pytest.raises(ConfigError, match="unknown projection 'w_proj'"):
        parse_scheme("int4", modules="w_proj=int8")
    with pytest.raises(ConfigError, match="v_proj: unsupported scheme 'int2'"):
        parse_scheme("int4", modules="v_proj=int2")
    with pytest.raises(ConfigError, match="expected module=scheme, got 'v_proj'"):
        parse_scheme("int4", modules="v_proj")
    with pytest.raises(ConfigError, match="modules: expected an object"):
        QuantConfig.from_hf({"quant_method": "gemma-core", "scheme": "int4", "modules": ["v_proj"]})
    with pytest.raises(ConfigError, match="fused projections in different schemes"):
        parse_scheme("int4", modules="v_proj=int8").scheme_for(
            "model.layers.0.self_attn.{q,k,v}_proj.weight")


def test_cli_module_overrides(tmp_path: Path, spm_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = gemma_core.get_preset("tiny-gemma")
    src = save_checkpoint(tmp_path / "f", config, random_weights(config, 1))
    (src / "tokenizer.model").write_bytes(spm_file.read_bytes())
    assert main(["quantize", str(src), str(tmp_path / "m"), "--bits", "4", "--scheme", "int4-mixed",
                 "--modules", "o_proj=float"]) == 0
    capsys.readouterr()
    assert main(["info", "--model", str(tmp_path / "m")]) == 0
    assert ("quantization      int4, groups of 32, embedding int8, down_proj int8, o_proj float, "
            "v_proj int8") in capsys.readouterr().out
    args = ["generate", "--max-new-tokens", "3", "--greedy", "hello"]
    assert main([*args, "--model", str(tmp_path / "m")]) == 0
    saved = capsys.readouterr().out
    assert main([*args, "--model", str(src), "--quantize", "int4-mixed",
                 "--quantize-modules", "o_proj=float"]) == 0
    assert capsys.readouterr().out == saved
    assert main([*args, "--model", str(src), "--quantize-modules", "v_proj=int8"]) == 2
    assert "apply with --quantize" in capsys.readouterr().err
    assert main([*args, "--model", str(src), "--quantize", "int4", "--quantize-modules", "x=int8"]) == 2
    assert "unknown projection 'x'" in capsys.readouterr().err
