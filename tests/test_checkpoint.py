"""Hugging Face model folders: round trips, safetensors interop, transformers, bad input, atomic writes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import gemma_core.checkpoint as checkpoint
from gemma_core.checkpoint import INDEX, SINGLE, canonical_names, load_checkpoint, save_checkpoint
from gemma_core.config import GemmaConfig
from gemma_core.errors import CheckpointError, ConfigError, WeightError
from gemma_core.layout import EMBED, LM_HEAD, expected_shapes
from gemma_core.presets import PRESETS
from gemma_core.safetensors_io import read_safetensors, write_safetensors
from gemma_core.weights import random_weights

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def tiny3() -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    config = PRESETS["tiny-gemma3"]
    return config, random_weights(config, seed=1)


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Same names; each tensor the same shape, dtype and bits."""
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        actual = got[name]
        assert actual.shape == expected.shape, name
        assert actual.dtype == expected.dtype, name
        assert np.asarray(actual).tobytes() == np.asarray(expected).tobytes(), name


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def raw_file(header: bytes, data_bytes: int) -> bytes:
    """A safetensors file made by hand: length, header, zero data."""
    return len(header).to_bytes(8, "little") + header + b"\0" * data_bytes


def saved(tmp_path: Path, config: GemmaConfig, weights: dict[str, np.ndarray], **kw) -> Path:
    return save_checkpoint(tmp_path / "model", config, weights, **kw)


# ---- round trips --------------------------------------------------------------------------------


def test_round_trip_float32_single_file(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights)
    assert folder == tmp_path / "model"
    assert sorted(os.listdir(folder)) == ["config.json", SINGLE]
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary folder left over
    loaded_config, loaded = load_checkpoint(folder)
    assert loaded_config == config
    assert_same_tensors(loaded, weights)


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma2"])
def test_round_trip_other_generations(tmp_path: Path, name: str) -> None:
    config = PRESETS[name]
    weights = random_weights(config, seed=2)
    loaded_config, loaded = load_checkpoint(saved(tmp_path, config, weights))
    assert loaded_config == config
    assert_same_tensors(loaded, weights)


def test_round_trip_bfloat16(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights, dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    header_len = int.from_bytes((folder / SINGLE).read_bytes()[:8], "little")
    header = json.loads((folder / SINGLE).read_bytes()[8:8 + header_len])
    assert header[EMBED]["dtype"] == "BF16"
    assert (folder / SINGLE).stat().st_size < sum(w.nbytes for w in weights.values()) * 0.6
    _, loaded = load_checkpoint(folder)
    want = {k: w.astype(ml_dtypes.bfloat16) for k, w in weights.items()}
    assert {v.dtype for v in loaded.values()} == {BF16}
    assert_same_tensors(loaded, want)
    # rounding happened: the float32 originals are not all representable in bfloat16
    assert not np.array_equal(np.asarray(loaded[EMBED]).astype(np.float32), weights[EMBED])


def test_round_trip_float16(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    _, loaded = load_checkpoint(saved(tmp_path, config, weights, dtype="float16"))
    assert_same_tensors(loaded, {k: w.astype(np.float16) for k, w in weights.items()})


def test_round_trip_sharded(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    total = sum(w.nbytes for w in weights.values())
    folder = saved(tmp_path, config, weights, max_shard_bytes=total // 4)
    shards = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (folder / SINGLE).exists()
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)

    index = json.loads((folder / INDEX).read_text())
    assert index["metadata"]["total_size"] == total
    assert sorted(index["weight_map"]) == sorted(weights)
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        in_file = read_safetensors(folder / shard)
        assert sorted(in_file) == sorted(k for k, v in index["weight_map"].items() if v == shard)
        # every shard but a lone oversized tensor respects the limit
        assert len(in_file) == 1 or sum(a.nbytes for a in in_file.values()) <= total // 4

    loaded_config, loaded = load_checkpoint(folder)
    assert loaded_config == config
    assert_same_tensors(loaded, weights)


def test_load_from_safetensors_file_path(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights)
    loaded_config, loaded = load_checkpoint(folder / SINGLE)
    assert loaded_config == config
    assert_same_tensors(loaded, weights)


def test_tied_lm_head_is_not_written_and_dropped_on_load(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, {**weights, LM_HEAD: weights[EMBED].copy()})
    assert LM_HEAD not in read_safetensors(folder / SINGLE)
    # an exporter that writes the tied head anyway
    write_safetensors(folder / SINGLE, {**weights, LM_HEAD: weights[EMBED]})
    _, loaded = load_checkpoint(folder)
    assert_same_tensors(loaded, weights)


def test_untied_round_trip_keeps_lm_head(tmp_path: Path) -> None:
    config = PRESETS["tiny-gemma2"].replace(tie_word_embeddings=False)
    weights = random_weights(config, seed=3)
    assert LM_HEAD in weights
    loaded_config, loaded = load_checkpoint(saved(tmp_path, config, weights))
    assert loaded_config.tie_word_embeddings is False
    assert_same_tensors(loaded, weights)


def test_loaded_arrays_are_read_only(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    _, loaded = load_checkpoint(saved(tmp_path, config, weights))
    with pytest.raises(ValueError):
        loaded[EMBED][0, 0] = 1.0


# ---- interop with the safetensors package ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_read_file_written_by_safetensors(tmp_path: Path, dtype: type) -> None:
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 5)).astype(dtype),
        "b": rng.standard_normal((7,)).astype(dtype),
        "c.scalar": np.array(2.5, dtype=dtype),
        "d.empty": np.zeros((0, 4), dtype=dtype),
    }
    st.save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    assert_same_tensors(read_safetensors(tmp_path / "x.safetensors"), tensors)


def test_safetensors_reads_our_file(tmp_path: Path, tiny3) -> None:
    st = pytest.importorskip("safetensors.numpy")
    _, weights = tiny3
    write_safetensors(tmp_path / "x.safetensors", weights, {"format": "pt"})
    assert_same_tensors(st.load_file(str(tmp_path / "x.safetensors")), weights)


def test_our_header_is_padded_to_eight_bytes(tmp_path: Path) -> None:
    for name_length in range(1, 9):  # header lengths of every residue mod 8
        path = tmp_path / f"{name_length}.safetensors"
        write_safetensors(path, {"n" * name_length: np.arange(3, dtype=np.float32)})
        data = path.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        assert header_len % 8 == 0
        assert json.loads(data[8:8 + header_len])["n" * name_length]["data_offsets"] == [0, 12]
        assert len(data) == 8 + header_len + 12


def test_safetensors_reads_our_bfloat16_file(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch = pytest.importorskip("torch")
    a = np.array([[1.0, -2.5, 3.140625], [0.0, 1e-3, 65504.0]], dtype=np.float32)
    write_safetensors(tmp_path / "x.safetensors", {"a": a.astype(ml_dtypes.bfloat16)})
    t = safetensors_torch.load_file(str(tmp_path / "x.safetensors"))["a"]
    assert tuple(t.shape) == (2, 3)
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), a.astype(ml_dtypes.bfloat16).astype(np.float32))


# ---- transformers loads our folder ------------------------------------------------------------


@pytest.mark.transformers
def test_transformers_loads_our_folder(tmp_path: Path, tiny3) -> None:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config, weights = tiny3
    folder = saved(tmp_path, config, weights)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    state = model.state_dict()
    assert set(state) == set(weights) | {LM_HEAD}  # the tied head shows in the state dict
    for name, want in weights.items():
        got = state[name]
        assert tuple(got.shape) == want.shape, name
        assert got.dtype == torch.float32, name
        np.testing.assert_array_equal(got.numpy(), want, err_msg=name)
    np.testing.assert_array_equal(state[LM_HEAD].numpy(), weights[EMBED])
    assert model.config.layer_types == [k.value for k in config.layer_types]


# ---- multimodal checkpoints -------------------------------------------------------------------


def test_canonical_names() -> None:
    a, b, c = np.zeros(1), np.ones(1), np.full(1, 2.0)
    got = canonical_names({
        "model.language_model.layers.0.mlp.up_proj.weight": a,
        "language_model.model.norm.weight": b,
        "language_model.lm_head.weight": c,
        "model.vision_tower.vision_model.x": a,
        "vision_tower.y": a,
        "model.multi_modal_projector.z": a,
        "multi_modal_projector.w": a,
        "model.embed_tokens.weight": b,
    })
    assert got == {"model.layers.0.mlp.up_proj.weight": a, "model.norm.weight": b, LM_HEAD: c,
                   EMBED: b}


def test_multimodal_folder_loads_as_text_model(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = tmp_path / "mm"
    folder.mkdir()
    text = {k: v for k, v in config.to_hf().items() if k not in ("model_type", "eos_token_id")}
    hf = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
          "eos_token_id": list(config.eos_token_ids), "text_config": text,
          "vision_config": {"model_type": "siglip_vision_model"}}
    (folder / "config.json").write_text(json.dumps(hf))
    tensors = {"model.language_model." + k.removeprefix("model."): v for k, v in weights.items()}
    assert all(k.startswith("model.language_model.") for k in tensors)
    tensors["model.vision_tower.x"] = np.zeros((3, 3), np.float32)
    tensors["model.multi_modal_projector.y"] = np.zeros((5,), np.float32)
    write_safetensors(folder / SINGLE, tensors)

    loaded_config, loaded = load_checkpoint(folder)
    assert loaded_config == config
    assert_same_tensors(loaded, weights)
    assert_same_tensors(canonical_names(read_safetensors(folder / SINGLE)), weights)


# ---- bad input ----------------------------------------------------------------------------------


def test_truncated_file(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights)
    data = (folder / SINGLE).read_bytes()
    (folder / SINGLE).write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors(folder / SINGLE)


def test_file_shorter_than_header_length(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors(tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"this is not a safetensors file, just some words" * 3, "not a safetensors file"),
     ((16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 32, "malformed"),
     ((4).to_bytes(8, "little") + b"[1] " + b"\0" * 32, "malformed"),
     (raw_file(b'{"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}', 4), "unsupported"),
     (raw_file(b'{"a": {"dtype": "F32", "shape": [1]}}', 4), "malformed")],
)
def test_garbage_file(tmp_path: Path, tiny3, content: bytes, needle: str) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights)
    (folder / SINGLE).write_bytes(content)
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(folder)


def test_size_mismatch_in_header(tmp_path: Path) -> None:
    header = b'{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}'
    (tmp_path / "x.safetensors").write_bytes(raw_file(header, 16))
    with pytest.raises(CheckpointError, match="'a' holds 12 bytes"):
        read_safetensors(tmp_path / "x.safetensors")


def test_folder_missing_a_tensor(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights)
    gone = "model.layers.3.self_attn.k_norm.weight"
    write_safetensors(folder / SINGLE, {k: v for k, v in weights.items() if k != gone})
    with pytest.raises(WeightError, match=re.escape(f"missing 1: {gone}")):
        load_checkpoint(folder)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_folder_without_config(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_checkpoint(folder)


def test_folder_without_weights(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights)
    (folder / SINGLE).unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"no {SINGLE} or {INDEX}")):
        load_checkpoint(folder)


def test_config_not_json(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights)
    (folder / "config.json").write_text("{'model_type': gemma3_text,")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_checkpoint(folder)


def test_index_names_missing_shard(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    total = sum(w.nbytes for w in weights.values())
    folder = saved(tmp_path, config, weights, max_shard_bytes=total // 3)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 3
    (folder / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"shard {shards[1]}")):
        load_checkpoint(folder)


def test_index_lists_tensor_absent_from_its_shard(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights, max_shard_bytes=sum(w.nbytes for w in weights.values()) // 3)
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = next(iter(index["weight_map"].values()))
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape("model.layers.0.mlp.extra.weight")):
        load_checkpoint(folder)


def test_malformed_index(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights, max_shard_bytes=50_000)
    (folder / INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="malformed index"):
        load_checkpoint(folder)


# ---- save errors and atomic writes ------------------------------------------------------------


def test_save_into_existing_folder_refused_and_untouched(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights)
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)
    other = random_weights(config, seed=9)
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(folder, config, other)
    assert snapshot(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_overwrite_replaces_folder(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights, max_shard_bytes=50_000)
    assert (folder / INDEX).exists()
    other = random_weights(config, seed=9)
    save_checkpoint(folder, config, other, overwrite=True)
    assert sorted(os.listdir(folder)) == ["config.json", SINGLE]  # stale shards are gone
    assert_same_tensors(load_checkpoint(folder)[1], other)
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_save_validates_before_writing(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    bad = dict(weights)
    del bad[EMBED]
    with pytest.raises(WeightError, match=re.escape(EMBED)):
        save_checkpoint(tmp_path / "model", config, bad)
    with pytest.raises(ConfigError, match="'int8'"):
        save_checkpoint(tmp_path / "model", config, weights, dtype="int8")
    assert os.listdir(tmp_path) == []


def test_failed_sharded_write_leaves_nothing(tmp_path: Path, tiny3, monkeypatch) -> None:
    config, weights = tiny3
    real_write = checkpoint.write_safetensors
    calls = []

    def write_once_then_fail(path, tensors, metadata=None):
        calls.append(Path(path).name)
        if len(calls) > 1:
            raise OSError("disk full")
        real_write(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "write_safetensors", write_once_then_fail)
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(CheckpointError, match=r"cannot write \(disk full\)"):
        save_checkpoint(parent / "model", config, weights, max_shard_bytes=50_000)
    assert len(calls) == 2
    assert calls[0].startswith("model-00001-of-")
    assert os.listdir(parent) == []  # neither the folder nor a hidden temporary one


def test_failed_overwrite_keeps_old_folder(tmp_path: Path, tiny3, monkeypatch) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights)
    before = snapshot(folder)

    def fail(path, tensors, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_safetensors", fail)
    with pytest.raises(CheckpointError, match=r"cannot write \(disk full\)"):
        save_checkpoint(folder, config, random_weights(config, seed=5), overwrite=True)
    assert snapshot(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_save_casts_only_to_supported_dtypes_and_keeps_names(tmp_path: Path, tiny3) -> None:
    config, weights = tiny3
    folder = saved(tmp_path, config, weights, dtype="float32")
    assert sorted(read_safetensors(folder / SINGLE)) == sorted(expected_shapes(config))
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"


def test_negative_shape_in_header_is_a_checkpoint_error(tmp_path: Path) -> None:
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "neg.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="'w' has a malformed"):
        read_safetensors(path)
