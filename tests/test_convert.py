"""`gemma convert`: HF -> every format -> HF bit-exact for Gemma 1/2/3, the per-format layouts
against the published shapes, GGUF writing, detection, atomic writes and bad input.
The peers (keras-hub, transformers) loading our outputs are in test_convert_peers.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from gemma_core.checkpoint import load_checkpoint, save_checkpoint
from gemma_core.cli import main
from gemma_core.config import GemmaConfig
from gemma_core.errors import CheckpointError, ConfigError, WeightError
from gemma_core.formats import flax, gemma_pytorch, keras_hub
from gemma_core.formats.convert import convert as _convert
from gemma_core.formats.convert import detect, read
from gemma_core.formats.mapping import format_shapes
from gemma_core.presets import PRESETS, PUBLISHED_PARAMS, get_preset
from gemma_core.safetensors_io import read_safetensors, write_safetensors
from gemma_core.weights import random_weights

BF16 = np.dtype(ml_dtypes.bfloat16)
# What writing each format needs beyond numpy (the tox envs install one framework at a time).
NEEDS = {"keras-hub": "h5py", "gemma-pytorch": "torch", "gguf": "gguf"}


def needs(fmt: str, dst: str | Path = "") -> None:
    """Skip unless the library that writes (and reads) `fmt` is installed."""
    if fmt in NEEDS:
        pytest.importorskip(NEEDS[fmt])
    if fmt == "flax" and not str(dst).endswith(".safetensors"):
        pytest.importorskip("orbax.checkpoint")


def convert(src: str | Path, dst: str | Path, to: str, *args, **kwargs):  # type: ignore[no-untyped-def]
    needs(to, dst)
    return _convert(src, dst, to, *args, **kwargs)
# keras-hub can express query_pre_attn_scalar only as head_dim or D/N: the Gemma 2 case uses head_dim
CONFIGS = {
    "gemma1": get_preset("tiny-gemma"),
    "gemma2": get_preset("tiny-gemma2").replace(query_pre_attn_scalar=24),
    "gemma3": get_preset("tiny-gemma3"),
}
# (format, destination name, keeps tokenizer.model bytes)
TARGETS = [
    ("hf", "out-hf", True),
    ("keras-hub", "out-keras", True),
    ("flax", "tree.safetensors", False),
    ("gemma-pytorch", "out-pt", True),
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, spm_file: Path) -> dict[str, Path]:
    """One Hugging Face folder (float32, with tokenizer.model) per generation."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    for name, config in CONFIGS.items():
        folder = save_checkpoint(root / name, config, random_weights(config, seed=3))
        (folder / "tokenizer.model").write_bytes(spm_file.read_bytes())
        out[name] = folder
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Same names; each tensor the same shape, dtype and bits."""
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        assert got[name].shape == expected.shape, name
        assert got[name].dtype == expected.dtype, name
        assert np.asarray(got[name]).tobytes() == np.asarray(expected).tobytes(), name


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# ---- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "dst", "keeps_tokenizer"), TARGETS, ids=[t[0] for t in TARGETS])
@pytest.mark.parametrize("gen", list(CONFIGS))
def test_round_trip_is_bit_exact(tmp_path: Path, sources: dict[str, Path], gen: str, fmt: str, dst: str,
                                 keeps_tokenizer: bool) -> None:
    src = sources[gen]
    convert(src, tmp_path / dst, fmt)
    assert detect(tmp_path / dst) == fmt
    convert(tmp_path / dst, tmp_path / "back", "hf")
    config, weights = load_checkpoint(tmp_path / "back")
    want_config, want = load_checkpoint(src)
    assert config == want_config
    assert_same(weights, want)
    if keeps_tokenizer:
        assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert leftovers(tmp_path) == []


def test_orbax_round_trip(tmp_path: Path, sources: dict[str, Path]) -> None:
    pytest.importorskip("orbax.checkpoint")
    src = sources["gemma3"]
    convert(src, tmp_path / "orbax", "flax")
    assert (tmp_path / "orbax" / "_METADATA").is_file()
    assert detect(tmp_path / "orbax") == "flax"
    ckpt = read(tmp_path / "orbax")
    want_config, want = load_checkpoint(src)
    assert ckpt.config == want_config
    assert_same(ckpt.weights, want)
    assert ckpt.tokenizer_model == (src / "tokenizer.model").read_bytes()


def test_orbax_restores_as_google_deepmind_gemma_does(tmp_path: Path, sources: dict[str, Path]) -> None:
    """`gemma.gm.ckpts.load_params`: StandardCheckpointer metadata -> ShapeDtypeStruct tree ->
    restore; a FLAT tree has only `transformer/...` keys, MLP kernels under `{w}`."""
    ocp = pytest.importorskip("orbax.checkpoint")
    import jax

    convert(sources["gemma1"], tmp_path / "orbax", "flax")
    ckpt = ocp.StandardCheckpointer()
    meta = ckpt.metadata(tmp_path / "orbax").item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), meta)
    tree = ckpt.restore(tmp_path / "orbax", target)
    assert all(k.startswith("transformer/") for k in tree)
    assert set(tree["transformer/layer_1/mlp/gating_einsum"]) == {"w"}
    _, want = load_checkpoint(sources["gemma1"])
    q = np.asarray(tree["transformer/layer_1/attn/q_einsum"]["w"])  # [N, D, H]
    np.testing.assert_array_equal(q[2, :, 5], want["model.layers.1.self_attn.q_proj.weight"][2 * 24 + 5])


@pytest.mark.parametrize("fmt", ["keras-hub", "flax", "gemma-pytorch", "gguf"])
def test_bfloat16_round_trip_is_bit_exact(tmp_path: Path, sources: dict[str, Path], fmt: str) -> None:
    pytest.importorskip("gguf")
    dst = {"flax": "t.safetensors", "gguf": "m.gguf"}.get(fmt, "out")
    convert(sources["gemma2"], tmp_path / "bf16", "hf", "bfloat16")
    convert(tmp_path / "bf16", tmp_path / dst, fmt)
    convert(tmp_path / dst, tmp_path / "back", "hf")
    _, weights = load_checkpoint(tmp_path / "back")
    _, want = load_checkpoint(tmp_path / "bf16")
    assert all(v.dtype == BF16 for v in want.values())
    assert_same(weights, want)  # GGUF norms pass through float32 1 + w and back: exact for bf16


def test_dtype_option_casts(tmp_path: Path, sources: dict[str, Path]) -> None:
    convert(sources["gemma1"], tmp_path / "half", "gemma-pytorch", "float16")
    ckpt = read(tmp_path / "half")
    _, want = load_checkpoint(sources["gemma1"])
    assert_same(ckpt.weights, {k: v.astype(np.float16) for k, v in want.items()})


def test_sharded_source_and_untied_head(tmp_path: Path) -> None:
    config = get_preset("tiny-gemma3").replace(tie_word_embeddings=False)
    weights = random_weights(config, seed=4)
    save_checkpoint(tmp_path / "sharded", config, weights, max_shard_bytes=40_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    convert(tmp_path / "sharded", tmp_path / "single", "hf")
    _, got = load_checkpoint(tmp_path / "single")
    assert_same(got, weights)
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        convert(tmp_path / "sharded", tmp_path / "k", "keras-hub")
    assert leftovers(tmp_path) == [] and not (tmp_path / "k").exists()


def test_stock_tiny_gemma2_query_scalar_is_refused_by_keras_hub(tmp_path: Path) -> None:
    config = get_preset("tiny-gemma2")  # query_pre_attn_scalar 20: neither head_dim 24 nor D/N 16
    src = save_checkpoint(tmp_path / "src", config, random_weights(config, 0))
    with pytest.raises(ConfigError, match="query_pre_attn_scalar: keras-hub"):
        convert(src, tmp_path / "k", "keras-hub")
    assert sorted(os.listdir(tmp_path)) == ["src"]
    convert(src, tmp_path / "t.safetensors", "flax")  # other formats carry the config
    assert read(tmp_path / "t.safetensors").config == config


# ---- layouts against the published shapes --------------------------------------------------------


def test_flax_layout_of_published_models() -> None:
    l0 = "transformer/layer_0/"
    g2b = format_shapes(flax.table(), PRESETS["gemma-2b"])
    assert g2b["transformer/embedder/input_embedding"] == (256_128, 2048)  # padded vocabulary
    assert g2b[l0 + "attn/q_einsum/w"] == (8, 2048, 256)
    assert g2b[l0 + "attn/kv_einsum/w"] == (2, 1, 2048, 256)
    assert g2b[l0 + "attn/attn_vec_einsum/w"] == (8, 256, 2048)
    assert g2b[l0 + "mlp/gating_einsum/w"] == (2, 2048, 16_384)
    assert g2b[l0 + "mlp/linear/w"] == (16_384, 2048)
    g7b = format_shapes(flax.table(), PRESETS["gemma-7b"])
    assert g7b[l0 + "attn/qkv_einsum/w"] == (3, 16, 3072, 256)  # K == N
    assert l0 + "attn/q_einsum/w" not in g7b
    assert format_shapes(flax.table(), PRESETS["gemma-2-2b"])[l0 + "mlp/gating_einsum/w"] == (2, 2304, 9216)
    assert format_shapes(flax.table(), PRESETS["gemma-2-9b"])[l0 + "mlp/gating_einsum/w"] == (2, 14_336, 3584)
    g3 = format_shapes(flax.table(), PRESETS["gemma-3-1b"])
    assert g3[l0 + "mlp/gating_einsum/w"] == (2, 6912, 1152)
    assert g3[l0 + "attn/_query_norm/scale"] == (256,)
    assert g3["transformer/embedder/input_embedding"] == (262_144, 1152)


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_keras_layout_counts_the_published_parameters(name: str) -> None:
    config = PRESETS[name]
    shapes = format_shapes(keras_hub.table(config.architecture), config)
    assert sum(int(np.prod(s)) for s in shapes.values()) == PUBLISHED_PARAMS[name]


def test_keras_layout_paths_of_gemma_2b() -> None:
    shapes = format_shapes(keras_hub.table(PRESETS["gemma-2b"].architecture), PRESETS["gemma-2b"])
    assert shapes["layers/reversible_embedding/vars/0"] == (256_000, 2048)
    assert shapes["layers/gemma_decoder_block/attention/query_dense/vars/0"] == (8, 2048, 256)
    assert shapes["layers/gemma_decoder_block_17/attention/key_dense/vars/0"] == (1, 2048, 256)
    assert shapes["layers/gemma_decoder_block_1/attention/output_dense/vars/0"] == (8, 256, 2048)
    assert shapes["layers/gemma_decoder_block/pre_ffw_norm/vars/0"] == (2048,)
    assert shapes["layers/gemma_decoder_block/gating_ffw/vars/0"] == (2048, 16_384)
    assert shapes["layers/rms_normalization/vars/0"] == (2048,)


def test_gemma_pytorch_fuses_q_k_v_in_order(tmp_path: Path, sources: dict[str, Path]) -> None:
    torch = pytest.importorskip("torch")
    convert(sources["gemma2"], tmp_path / "pt", "gemma-pytorch")
    state = torch.load(tmp_path / "pt" / "model.ckpt", weights_only=True)["model_state_dict"]
    _, want = load_checkpoint(sources["gemma2"])
    qkv = state["model.layers.1.self_attn.qkv_proj.weight"].numpy()
    parts = [want[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]
    np.testing.assert_array_equal(qkv, np.concatenate(parts))


def test_gemma_pytorch_bare_file_needs_a_config(tmp_path: Path, sources: dict[str, Path]) -> None:
    convert(sources["gemma1"], tmp_path / "m.ckpt", "gemma-pytorch")
    with pytest.raises(ConfigError, match=r"no config\.json beside it"):
        read(tmp_path / "m.ckpt")


# ---- GGUF writing ------------------------------------------------------------------------------


def test_gguf_f32_loads_in_gemma_core_and_q8_0_is_close(tmp_path: Path, sources: dict[str, Path]) -> None:
    pytest.importorskip("gguf")
    import gemma_core

    src = sources["gemma3"]
    convert(src, tmp_path / "m.gguf", "gguf")
    convert(src, tmp_path / "q.gguf", "gguf", "q8_0")
    ids = np.array([[2, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 5]])
    ref = gemma_core.load(src, backend="numpy")
    want = ref.to_numpy(ref.forward(ids).logits)
    # gemma_core.load does not know our extra key: pass the scalar as for llama.cpp files
    model = gemma_core.load(tmp_path / "m.gguf", backend="numpy", query_pre_attn_scalar=16)
    assert model.tokenizer is not None
    got = model.to_numpy(model.forward(ids).logits)
    assert np.abs(got - want).max() <= 1e-4 * want.std()
    _, q8 = load_checkpoint_gguf(tmp_path / "q.gguf")
    _, f32 = load_checkpoint(src)
    for name, value in f32.items():
        assert np.abs(q8[name] - value).max() <= 1e-2 * np.abs(value).max(), name


def load_checkpoint_gguf(path: Path) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    ckpt = read(path)
    return ckpt.config, ckpt.weights


# ---- detection, atomic writes, CLI -------------------------------------------------------------


def test_existing_destination_needs_overwrite(tmp_path: Path, sources: dict[str, Path]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        convert(sources["gemma1"], tmp_path / "out", "keras-hub")
    assert (tmp_path / "out" / "keep").is_file()
    convert(sources["gemma1"], tmp_path / "out", "keras-hub", overwrite=True)
    assert not (tmp_path / "out" / "keep").exists() and detect(tmp_path / "out") == "keras-hub"
    assert leftovers(tmp_path) == []


def test_cli_convert(tmp_path: Path, sources: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    needs("keras-hub")
    assert main(["convert", str(sources["gemma3"]), str(tmp_path / "k"), "--to", "keras-hub"]) == 0
    assert "(hf) ->" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "k"), str(tmp_path / "k2"), "--to", "keras-hub"]) == 0
    assert main(["convert", str(tmp_path / "k"), str(tmp_path / "k2"), "--to", "hf"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "x"), "--to", "hf"]) == 2
    assert "no such file" in capsys.readouterr().err
    args = ["convert", str(sources["gemma3"]), str(tmp_path / "y"), "--to", "hf", "--dtype", "q8_0"]
    assert main(args) == 2
    assert "q8_0" in capsys.readouterr().err


def test_conversion_imports_no_framework() -> None:
    code = ("import sys, gemma_core.cli, gemma_core.formats.convert, gemma_core.formats.gguf_write\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'jax', 'tensorflow', 'keras', 'keras_hub', 'orbax', 'transformers', 'h5py')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- bad input: a clear error, nothing written -------------------------------------------------


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _expect_failure(tmp_path: Path, src: Path, error: type[Exception], match: str, to: str = "hf") -> None:
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(error, match=match):
        convert(src, tmp_path / "dst", to)
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary left behind


@pytest.fixture
def exported(tmp_path: Path, sources: dict[str, Path]):  # type: ignore[no-untyped-def]
    def make(fmt: str, name: str, gen: str = "gemma3") -> Path:
        convert(sources[gen], tmp_path / name, fmt)
        return tmp_path / name

    return make


def test_truncated_keras_weights(tmp_path: Path, exported) -> None:  # type: ignore[no-untyped-def]
    src = exported("keras-hub", "k")
    _truncate(src / keras_hub.WEIGHTS)
    _expect_failure(tmp_path, src, CheckpointError, "model.weights.h5: not a readable HDF5 file")


def test_truncated_gemma_pytorch(tmp_path: Path, exported) -> None:  # type: ignore[no-untyped-def]
    src = exported("gemma-pytorch", "p")
    _truncate(src / gemma_pytorch.CKPT)
    _expect_failure(tmp_path, src, CheckpointError, "model.ckpt: refused or unreadable")


def test_truncated_flax_tree(tmp_path: Path, exported) -> None:  # type: ignore[no-untyped-def]
    src = exported("flax", "t.safetensors")
    _truncate(src, 0.9)
    _expect_failure(tmp_path, src, CheckpointError, "t.safetensors: truncated")


def test_corrupted_gguf(tmp_path: Path, exported) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("gguf")
    src = exported("gguf", "m.gguf")
    _truncate(src, 0.7)
    _expect_failure(tmp_path, src, CheckpointError, "m.gguf: truncated")
    src.write_bytes(b"GGUF" + b"\xff" * 100)
    _expect_failure(tmp_path, src, CheckpointError, "m.gguf: GGUF version")


def test_corrupted_hf_safetensors(tmp_path: Path, sources: dict[str, Path]) -> None:
    src = save_checkpoint(tmp_path / "bad", CONFIGS["gemma1"], random_weights(CONFIGS["gemma1"], 0))
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    _expect_failure(tmp_path, src, CheckpointError, "malformed safetensors header", to="keras-hub")


def test_missing_tensor_is_named(tmp_path: Path, exported) -> None:  # type: ignore[no-untyped-def]
    import h5py

    src = exported("keras-hub", "k")
    with h5py.File(src / keras_hub.WEIGHTS, "a") as f:
        del f["layers/gemma3_decoder_block_2/attention/key_norm/vars/0"]
    _expect_failure(tmp_path, src, WeightError,
                    r"missing 1: layers/gemma3_decoder_block_2/attention/key_norm/vars/0")

    tree = exported("flax", "t.safetensors")
    tensors = dict(read_safetensors(tree))
    del tensors["transformer/layer_1/mlp/linear/w"]
    from gemma_core.safetensors_io import read_header

    meta = read_header(tree)[0]["__metadata__"]
    tree.unlink()
    write_safetensors(tree, tensors, meta)
    _expect_failure(tmp_path, tree, WeightError, r"t.safetensors: flax tensors .* missing 1: "
                                                 r"transformer/layer_1/mlp/linear/w")


def test_mis_shaped_tensor_is_named(tmp_path: Path, exported) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    src = exported("gemma-pytorch", "p", "gemma1")
    path = src / gemma_pytorch.CKPT
    obj = torch.load(path, weights_only=True)
    obj["model_state_dict"]["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    torch.save(obj, path)
    _expect_failure(tmp_path, src, WeightError, r"mis-shaped 1: model.layers.0.mlp.up_proj.weight: "
                                                r"expected \[128, 64\], got \[3, 3\]")


class _NotATensor:
    pass


def test_pickles_holding_other_objects_are_refused(tmp_path: Path, exported) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    src = exported("gemma-pytorch", "p", "gemma1")
    path = src / gemma_pytorch.CKPT
    good = torch.load(path, weights_only=True)
    torch.save({"model_state_dict": good["model_state_dict"], "payload": _NotATensor()}, path)
    _expect_failure(tmp_path, src, CheckpointError, "model.ckpt: refused or unreadable as a weights-only")
    torch.save({"model_state_dict": good["model_state_dict"], "note": "hello"}, path)
    _expect_failure(tmp_path, src, CheckpointError, "entries besides model_state_dict")
    torch.save({"model_state_dict": {**good["model_state_dict"], "step": 3}}, path)
    _expect_failure(tmp_path, src, CheckpointError, "entry 'step' is a int, not a tensor")


def test_wrong_architecture(tmp_path: Path, exported, sources: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    src = exported("keras-hub", "k")
    config = json.loads((src / "config.json").read_text())
    config["registered_name"] = "keras_hub>LlamaBackbone"
    (src / "config.json").write_text(json.dumps(config))
    _expect_failure(tmp_path, src, ConfigError, "not a keras-hub Gemma backbone")

    hf = save_checkpoint(tmp_path / "llama", CONFIGS["gemma1"], random_weights(CONFIGS["gemma1"], 0))
    config = json.loads((hf / "config.json").read_text())
    config["model_type"] = "llama"
    (hf / "config.json").write_text(json.dumps(config))
    _expect_failure(tmp_path, hf, ConfigError, "model_type: unsupported value 'llama'", to="keras-hub")

    # Gemma 1 weights under a Gemma 2 config: the key set gives it away
    pt = exported("gemma-pytorch", "p", "gemma1")
    hf_config = json.loads((pt / "config.json").read_text())
    (pt / "config.json").write_text(json.dumps({**CONFIGS["gemma2"].to_hf(), "vocab_size":
                                                hf_config["vocab_size"]}))
    _expect_failure(tmp_path, pt, WeightError, "missing")


def test_unknown_inputs(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    _expect_failure(tmp_path, tmp_path / "notes.txt", CheckpointError, "cannot tell the checkpoint format")
    (tmp_path / "empty").mkdir()
    _expect_failure(tmp_path, tmp_path / "empty", CheckpointError, "not a checkpoint folder")


def test_gemma_pytorch_int8_is_dequantised(tmp_path: Path, exported) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    src = exported("gemma-pytorch", "p", "gemma1")
    path = src / gemma_pytorch.CKPT
    state = torch.load(path, weights_only=True)["model_state_dict"]
    name = "model.layers.0.mlp.down_proj.weight"
    q = torch.randint(-127, 128, state[name].shape, dtype=torch.int8)
    scale = torch.rand(state[name].shape[0]) / 100
    torch.save({"model_state_dict": {**state, name: q, name + "_scaler": scale,
                                     "freqs_cis": torch.zeros(4, 2, dtype=torch.complex64)}}, path)
    weights = read(src).weights
    np.testing.assert_array_equal(weights[name], q.numpy().astype(np.float32) * scale.numpy()[:, None])
