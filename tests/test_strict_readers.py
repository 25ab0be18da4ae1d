"""Readers refuse what the reference readers refuse (safetensors' Rust crate, gguf-py, h5py), and
more where those are silent: every hostile file here is made in tmp_path, and each refusal is a
CheckpointError / WeightError / ConfigError naming the file and the tensor or field."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gemma_core
from gemma_core import checkpoint
from gemma_core.checkpoint import INDEX, SINGLE, load_checkpoint, read_tensors, save_checkpoint
from gemma_core.config import GemmaConfig
from gemma_core.errors import CheckpointError, ConfigError, WeightError
from gemma_core.layout import validate_weights
from gemma_core.presets import get_preset
from gemma_core.quant import QuantConfig, quantize_weights
from gemma_core.safetensors_io import read_header, read_safetensors, write_safetensors
from gemma_core.weights import random_weights

ROOT = Path(__file__).resolve().parents[1]
UP = "model.layers.0.mlp.up_proj.weight"
Tiny = tuple[GemmaConfig, dict[str, np.ndarray]]


@pytest.fixture(scope="module")
def tiny3() -> Tiny:
    config = get_preset("tiny-gemma3")
    return config, random_weights(config, seed=5)


def _folder(tmp_path: Path, config: GemmaConfig, weights: dict[str, np.ndarray], **kw: Any) -> Path:
    return save_checkpoint(tmp_path / "model", config, weights, **kw)


# ---- 1. safetensors: the data covered exactly, the header a JSON object of entries -----------------


def _st_file(path: Path, header: bytes | dict, data: int) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * data)
    return path


def _entry(begin: int, end: int, dtype: str = "F32", shape: Any = None) -> dict[str, Any]:
    return {"dtype": dtype, "shape": [(end - begin) // 4] if shape is None else shape,
            "data_offsets": [begin, end]}


def _reference_refuses(path: Path) -> bool:
    """Whether the Rust `safetensors` crate (through its Python package) refuses the file."""
    st = pytest.importorskip("safetensors")
    try:
        with st.safe_open(str(path), "np") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                f.get_tensor(key)
    except Exception:  # SafetensorError, and whatever else it raises
        return True
    return False


HOSTILE_SAFETENSORS: dict[str, tuple[bytes | dict[str, Any], int, str]] = {
    # name: (header, data bytes, what the error says)
    "overlapping": ({"a": _entry(0, 8), "b": _entry(4, 12)}, 12, r"'b' at bytes \[4, 12\) overlaps"),
    "same-bytes-twice": ({"a": _entry(0, 8), "b": _entry(0, 8)}, 8, r"'b' at bytes \[0, 8\) overlaps"),
    "gap-between": ({"a": _entry(0, 8), "b": _entry(12, 20)}, 20, r"'b' at bytes \[12, 20\) leaves a gap"),
    "gap-at-start": ({"a": _entry(4, 12)}, 12, r"'a' at bytes \[4, 12\) leaves a gap"),
    "reversed-offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8,
                         "'a' has a malformed"),
    "trailing-bytes": ({"a": _entry(0, 8)}, 12, "4 trailing bytes after the last tensor"),
    "dtype-length": ({"a": _entry(0, 8, "F16", [2])}, 8, r"'a' holds 8 bytes for shape \[2\] F16"),
    "bool-shape": ({"a": _entry(0, 4, shape=[True])}, 4, "'a' has a malformed"),
    "float-shape": ({"a": _entry(0, 8, shape=[2.0])}, 8, "'a' has a malformed"),
    "string-offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, 8,
                       "'a' has a malformed"),
    "three-offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, 8,
                      "'a' has a malformed"),
    "entry-not-object": (b'{"a": 3}', 0, "'a' has a malformed"),
    "header-a-list": (b"[1, 2]", 0, r"malformed safetensors header \(not an object\)"),
    "metadata-not-strings": ({"__metadata__": {"format": 1}}, 0, "__metadata__ must map names to strings"),
    "metadata-a-list": ({"__metadata__": ["pt"]}, 0, "__metadata__ must map names to strings"),
    "duplicate-name": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                       b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', 16,
                       "duplicate key 'a'"),
    "deep-nesting": (b"[" * 200_000, 0, "nested too deeply"),
}


@pytest.mark.parametrize("case", list(HOSTILE_SAFETENSORS))
def test_safetensors_refuses_what_the_reference_refuses(tmp_path: Path, case: str) -> None:
    header, data, message = HOSTILE_SAFETENSORS[case]
    path = _st_file(tmp_path / f"{case}.safetensors", header, data)
    assert _reference_refuses(path), f"the reference reader accepts {case}"
    for read in (read_header, read_safetensors):
        with pytest.raises(CheckpointError, match=rf"{re.escape(path.name)}: .*{message}"):
            read(path)


def test_safetensors_accepts_entries_listed_out_of_offset_order(tmp_path: Path) -> None:
    """The crate sorts entries by offset before checking coverage; so do we (and zero-size ones)."""
    header = {"b": _entry(8, 16), "z": _entry(0, 0), "a": _entry(0, 8), "__metadata__": {"format": "pt"}}
    path = _st_file(tmp_path / "ok.safetensors", header, 16)
    assert not _reference_refuses(path)
    assert sorted(read_safetensors(path)) == ["a", "b", "z"]


def test_hf_folder_with_duplicate_tensor_names_is_refused(tmp_path: Path, tiny3: Tiny) -> None:
    config, weights = tiny3
    folder = _folder(tmp_path, config, weights)
    header, offset = read_header(folder / SINGLE)
    data = (folder / SINGLE).read_bytes()[offset:]
    first, second = sorted(k for k in header if k != "__metadata__")[:2]
    text = json.dumps(header)
    # the second entry renamed to the first: json.loads would keep only the later one
    text = text.replace(json.dumps(second), json.dumps(first))
    blob = text.encode()
    (folder / SINGLE).write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    with pytest.raises(CheckpointError, match=re.escape(f"duplicate key {first!r}")):
        load_checkpoint(folder)


# ---- 2. sharded folders: every tensor in exactly the shard the index names, inside the folder ------


def _sharded(tmp_path: Path, tiny3: Tiny) -> tuple[Path, dict[str, Any], list[str]]:
    config, weights = tiny3
    folder = _folder(tmp_path, config, weights,
                     max_shard_bytes=sum(w.nbytes for w in weights.values()) // 3)
    index = json.loads((folder / INDEX).read_text())
    return folder, index, sorted(set(index["weight_map"].values()))


def test_tensor_stored_in_two_shards_is_refused(tmp_path: Path, tiny3: Tiny) -> None:
    folder, index, shards = _sharded(tmp_path, tiny3)
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    extra = read_safetensors(folder / shards[0])[name]
    other = {k: np.array(v) for k, v in read_safetensors(folder / shards[1]).items()}
    write_safetensors(folder / shards[1], {**other, name: np.zeros_like(extra)})
    with pytest.raises(CheckpointError, match=re.escape(f"tensor {name} is stored in 2 shards "
                                                        f"({shards[0]}, {shards[1]})")):
        load_checkpoint(folder)


def test_shard_holding_tensors_the_index_does_not_list_is_refused(tmp_path: Path, tiny3: Tiny) -> None:
    folder, _, shards = _sharded(tmp_path, tiny3)
    tensors = {k: np.array(v) for k, v in read_safetensors(folder / shards[2]).items()}
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    write_safetensors(folder / shards[2], tensors)
    with pytest.raises(CheckpointError, match=rf"{re.escape(shards[2])}: holds tensors .* does not list "
                                              r"for this shard: model\.layers\.0\.mlp\.extra\.weight"):
        read_tensors(folder)


def _point_shard_at(folder: Path, index: dict[str, Any], shard: str, target: str) -> None:
    index["weight_map"] = {k: (target if v == shard else v) for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_shard_outside_the_folder_is_refused(tmp_path: Path, tiny3: Tiny, how: str) -> None:
    folder, index, shards = _sharded(tmp_path, tiny3)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (folder / shards[0]).rename(outside / shards[0])  # a loadable shard, just not in the folder
    if how == "absolute":
        target = str(outside / shards[0])
    elif how == "dotdot":
        target = f"../elsewhere/{shards[0]}"
    else:
        target = "link.safetensors"
        (folder / target).symlink_to(Path("..") / "elsewhere" / shards[0])
    _point_shard_at(folder, index, shards[0], target)
    message = ("resolves to .* outside the folder" if how == "symlink"
               else "is not a file name inside the folder")
    with pytest.raises(CheckpointError, match=rf"{re.escape(INDEX)}: shard .*{message}"):
        load_checkpoint(folder)


def test_hub_cache_snapshot_links_to_its_blobs_load(tmp_path: Path, tiny3: Tiny) -> None:
    """The Hugging Face hub cache's layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    folder, _, _ = _sharded(tmp_path, tiny3)
    repo = tmp_path / "models--google--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(folder.iterdir())):
        f.rename(blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    _, weights = load_checkpoint(snapshot)
    assert sorted(weights) == sorted(k for k in tiny3[1] if k != "lm_head.weight")


# ---- 3. float weights stored as integers ---------------------------------------------------------


def test_float_weight_stored_as_integers_is_refused(tmp_path: Path, tiny3: Tiny) -> None:
    config, weights = tiny3
    folder = _folder(tmp_path, config, weights)
    bad = {**weights, UP: np.ones(weights[UP].shape, np.int32)}
    write_safetensors(folder / SINGLE, bad)
    pattern = rf"{re.escape(str(folder))}: .*{re.escape(UP)}: expected a floating-point dtype, got int32"
    for validate in (True, False):
        with pytest.raises(WeightError, match=pattern):
            load_checkpoint(folder, validate=validate)
    with pytest.raises(WeightError, match=pattern):
        gemma_core.load(folder, backend="numpy")
    with pytest.raises(WeightError, match=rf"{re.escape(UP)}: expected a floating-point dtype, got int32"):
        validate_weights(config, bad)


def test_quantised_checkpoint_keeps_its_integers_but_not_integer_scales(tmp_path: Path, tiny3: Tiny) -> None:
    from gemma_core.weights import quantize_model

    config, weights = tiny3
    qconfig, qweights = quantize_model(config, weights, "int8")
    folder = save_checkpoint(tmp_path / "q", qconfig, qweights)
    _, loaded = load_checkpoint(folder)
    assert loaded[UP].dtype == np.int8
    scale = UP + "_scale"
    write_safetensors(folder / SINGLE, {**qweights, scale: np.ones(qweights[scale].shape, np.int32)})
    with pytest.raises(WeightError, match=rf"{re.escape(scale)}: expected a floating-point dtype"):
        load_checkpoint(folder)


# ---- 4. NaN and infinity -------------------------------------------------------------------------


def _poisoned(weights: dict[str, np.ndarray], name: str, value: float,
              at: tuple[int, ...]) -> dict[str, np.ndarray]:
    w = np.array(weights[name])
    w[at] = value
    return {**weights, name: w}


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_hf_folder_with_non_finite_weights_is_refused(tmp_path: Path, tiny3: Tiny, value: float) -> None:
    config, weights = tiny3
    bad = _poisoned(weights, UP, value, (3, 7))
    folder = _folder(tmp_path, config, bad)
    pattern = (rf"{re.escape(str(folder))}: tensor {re.escape(UP)} holds a non-finite value "
               rf"\({value} at index \[3, 7\]")
    with pytest.raises(WeightError, match=pattern):
        load_checkpoint(folder)
    with pytest.raises(WeightError, match=pattern):
        gemma_core.load(folder, backend="numpy")
    _, loaded = load_checkpoint(folder, allow_nonfinite=True)
    assert np.isnan(loaded[UP][3, 7]) or np.isinf(loaded[UP][3, 7])
    gemma_core.load(folder, backend="numpy", allow_nonfinite=True)


def test_first_non_finite_tensor_is_named_and_blocks_are_checked_in_bounded_chunks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny3: Tiny) -> None:
    _, weights = tiny3
    embed = "model.embed_tokens.weight"
    bad = _poisoned(_poisoned(weights, embed, np.nan, (37, 5)), UP, np.inf, (0, 0))
    monkeypatch.setattr(checkpoint, "FINITE_CHUNK", 3 * bad[embed].shape[1])  # three rows a block
    seen: list[int] = []
    isfinite = np.isfinite

    def counting(a: np.ndarray) -> np.ndarray:
        seen.append(np.size(a))
        return isfinite(a)

    monkeypatch.setattr(checkpoint.np, "isfinite", counting)
    with pytest.raises(WeightError, match=rf"tensor {re.escape(embed)} holds a non-finite value \(nan at "
                                          r"index \[37, 5\]\)"):
        checkpoint.check_finite(bad, "src")
    assert max(seen) <= 3 * bad[embed].shape[1]


def test_gguf_with_non_finite_weights_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from gguf_writer import write_gguf

    from gemma_core.formats.gguf import load_gguf

    config = get_preset("tiny-gemma")
    weights = _poisoned(random_weights(config, 0), UP, np.nan, (2, 1))
    path = write_gguf(tmp_path / "nan.gguf", config, weights)
    pattern = (rf"nan\.gguf: tensor blk\.0\.ffn_up\.weight \({re.escape(UP)}\) holds a non-finite "
               r"value \(nan at index \[2, 1\]")
    with pytest.raises(WeightError, match=pattern):
        load_gguf(path)
    with pytest.raises(WeightError, match=pattern):
        gemma_core.load(path, backend="numpy")
    _, loaded, _ = load_gguf(path, allow_nonfinite=True)
    assert np.isnan(loaded[UP][2, 1])
    # quantising never spreads a NaN over a row's scale, allowed or not
    with pytest.raises(WeightError, match=rf"{re.escape(UP)}: cannot quantise a non-finite value"):
        load_gguf(path, quant=QuantConfig("int8"), allow_nonfinite=True)
    with pytest.raises(WeightError, match=pattern):
        load_gguf(path, quant=QuantConfig("int8"))


def test_other_formats_with_non_finite_weights_are_refused_on_read(tmp_path: Path, tiny3: Tiny) -> None:
    from gemma_core.formats import flax
    from gemma_core.formats.convert import read
    from gemma_core.formats.mapping import Checkpoint

    config, weights = tiny3
    tree = tmp_path / "tree.safetensors"
    flax.write_safetensors_tree(tree, Checkpoint(config, _poisoned(weights, UP, np.inf, (1, 2))))
    with pytest.raises(WeightError, match=rf"tree\.safetensors: tensor {re.escape(UP)} holds a non-finite"):
        read(tree)
    with pytest.raises(WeightError, match=rf"tree\.safetensors: tensor {re.escape(UP)} holds a non-finite"):
        gemma_core.load(tree, backend="numpy")
    assert np.isinf(read(tree, allow_nonfinite=True).weights[UP][1, 2])


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_quantisation_refuses_non_finite_input(tiny3: Tiny, scheme: str, value: float) -> None:
    from gemma_core.quant import quantize

    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    w[4, 33] = value
    message = rf"{re.escape(UP)}: cannot quantise a non-finite value \({value} at index \[4, 33\]\)"
    with pytest.raises(WeightError, match=message):
        quantize(w, scheme, None if scheme == "int8" else 32, UP)
    _, weights = tiny3
    with pytest.raises(WeightError, match=rf"{re.escape(UP)}: cannot quantise a non-finite value"):
        quantize_weights(_poisoned(weights, UP, value, (4, 0)), QuantConfig("int8"))


# ---- 5. GGUF ---------------------------------------------------------------------------------------


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    pytest.importorskip("gguf")
    from gguf_writer import write_gguf

    config = get_preset("tiny-gemma3")
    return write_gguf(tmp_path / "m.gguf", config, random_weights(config, 0))


def _string_at(data: bytes, text: str) -> int:
    """The offset of GGUF string `text` (its uint64 length, then its bytes), found exactly once."""
    needle = struct.pack("<Q", len(text)) + text.encode()
    assert data.count(needle) == 1, text
    return data.index(needle)


def _rename(path: Path, old: str, new: str) -> None:
    data = path.read_bytes()
    pos = _string_at(data, old)
    path.write_bytes(data[:pos] + struct.pack("<Q", len(new)) + new.encode() + data[pos + 8 + len(old):])


def _set_u32(path: Path, key: str, value: int) -> None:
    data = bytearray(path.read_bytes())
    pos = _string_at(bytes(data), key) + 8 + len(key)
    assert struct.unpack_from("<I", data, pos)[0] == 4  # a uint32 value follows
    struct.pack_into("<I", data, pos + 4, value)
    path.write_bytes(bytes(data))


def _gguf_py_refuses(path: Path) -> bool:
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except (ValueError, KeyError):
        return True
    return False


def test_gguf_duplicate_tensor_name_is_refused(gguf_file: Path) -> None:
    from gemma_core.formats.gguf import load_gguf

    _rename(gguf_file, "blk.0.attn_k.weight", "blk.0.attn_q.weight")  # same length: offsets stay valid
    assert _gguf_py_refuses(gguf_file)
    with pytest.raises(CheckpointError, match=r"m\.gguf: tensor blk\.0\.attn_q\.weight appears twice"):
        load_gguf(gguf_file)


def test_gguf_duplicate_metadata_key_is_refused(gguf_file: Path) -> None:
    from gemma_core.formats.gguf import load_gguf

    _rename(gguf_file, "gemma3.attention.value_length", "gemma3.attention.head_count")
    assert _gguf_py_refuses(gguf_file)
    with pytest.raises(CheckpointError, match=r"m\.gguf: metadata key gemma3\.attention\.head_count "
                                              r"appears twice"):
        load_gguf(gguf_file)


@pytest.mark.parametrize("alignment", [0, 3])
def test_gguf_alignment_must_be_a_power_of_two(gguf_file: Path, alignment: int) -> None:
    from gemma_core.formats.gguf import load_gguf

    _rename(gguf_file, "gemma3.attention.value_length", "general.alignment")  # a uint32 either way
    _set_u32(gguf_file, "general.alignment", alignment)
    assert _gguf_py_refuses(gguf_file)
    with pytest.raises(CheckpointError, match=rf"m\.gguf: general\.alignment must be a power of two "
                                              rf".*{alignment}"):
        load_gguf(gguf_file)


@pytest.mark.parametrize("key", ["attention.head_count", "block_count", "embedding_length",
                                 "feed_forward_length", "context_length", "attention.head_count_kv",
                                 "attention.key_length"])
def test_gguf_zero_sizes_are_config_errors(gguf_file: Path, key: str) -> None:
    from gemma_core.formats.gguf import load_gguf

    _set_u32(gguf_file, f"gemma3.{key}", 0)
    with pytest.raises(ConfigError, match=rf"m\.gguf: metadata gemma3\.{re.escape(key)} must be a positive "
                                          r"integer, got 0"):
        load_gguf(gguf_file)


def test_gguf_block_count_of_millions_is_refused_before_allocating(gguf_file: Path) -> None:
    import tracemalloc

    from gemma_core.formats.gguf import load_gguf

    _set_u32(gguf_file, "gemma3.block_count", 3_000_000)
    tracemalloc.start()
    with pytest.raises(ConfigError, match="num_layers: 3000000 is past any Gemma"):
        load_gguf(gguf_file, query_pre_attn_scalar=16)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 * 2**20


def test_gguf_tensor_data_must_follow_in_order(gguf_file: Path) -> None:
    """llama.cpp's rule: each tensor's offset is the padded end of the one before; a tensor
    pointing at another's bytes is refused."""
    from gemma_core.formats.gguf import load_gguf
    from gemma_core.formats.gguf_file import read_gguf

    _, tensors = read_gguf(gguf_file)
    second = list(tensors)[1]
    data = bytearray(gguf_file.read_bytes())
    pos = _string_at(bytes(data), second) + 8 + len(second)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    struct.pack_into("<Q", data, pos + 4 + 8 * n_dims + 4, 0)  # its data offset: the first tensor's
    gguf_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"m\.gguf: tensor {re.escape(second)} has data offset 0, "
                                              "expected"):
        load_gguf(gguf_file)


def test_gguf_tensor_data_past_the_end_is_refused(gguf_file: Path) -> None:
    from gemma_core.formats.gguf import load_gguf

    data = gguf_file.read_bytes()
    gguf_file.write_bytes(data[:-64])
    with pytest.raises(CheckpointError, match=r"m\.gguf: truncated: tensor .* needs bytes up to"):
        load_gguf(gguf_file)


def test_gguf_deeply_nested_metadata_arrays_are_refused(tmp_path: Path) -> None:
    from gemma_core.formats.gguf_file import read_gguf

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    depth = 100_000
    body = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string("x") + struct.pack("<I", 9)
            + struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0))
    path = tmp_path / "deep.gguf"
    path.write_bytes(body)
    with pytest.raises(CheckpointError, match=r"deep\.gguf: metadata arrays nested more than"):
        read_gguf(path)


# ---- 6. the numpy backend's weights are private memory, not a view of the file -----------------


def test_numpy_logits_do_not_change_when_the_file_is_rewritten(tmp_path: Path, tiny3: Tiny) -> None:
    config, weights = tiny3
    folder = _folder(tmp_path, config, weights)
    model = gemma_core.load(folder, backend="numpy")
    ids = np.array([[2, 5, 9, 14, 3]])
    first = model.to_numpy(model.forward(ids).logits)
    # same names and sizes, other values, written over the same file (same inode)
    with open(folder / SINGLE, "r+b") as f:
        _, offset = read_header(folder / SINGLE)
        f.seek(offset)
        f.write(np.random.default_rng(0).standard_normal(
            (os.path.getsize(folder / SINGLE) - offset) // 4).astype(np.float32).tobytes())
    np.testing.assert_array_equal(model.to_numpy(model.forward(ids).logits), first)


def test_numpy_model_survives_truncation_of_its_file(tmp_path: Path, tiny3: Tiny) -> None:
    """A mapped file cut short kills the process with SIGBUS on the next read of its pages."""
    config, weights = tiny3
    folder = _folder(tmp_path, config, weights)
    code = (f"import os, numpy as np, gemma_core\n"
            f"m = gemma_core.load({str(folder)!r}, backend='numpy')\n"
            f"ids = np.array([[2, 5, 9, 14, 3]])\n"
            f"a = m.to_numpy(m.forward(ids).logits)\n"
            f"os.truncate({str(folder / SINGLE)!r}, 0)\n"
            f"b = m.to_numpy(m.forward(ids).logits)\n"
            f"print(np.array_equal(a, b))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


def test_read_safetensors_arrays_are_read_only_copies(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    a = read_safetensors(path)["a"]
    assert not isinstance(a, np.memmap) and not isinstance(a.base, np.memmap)
    assert not a.flags.writeable
    path.write_bytes(b"")
    np.testing.assert_array_equal(a, np.arange(6, dtype=np.float32).reshape(2, 3))


# ---- 7. keras-hub .weights.h5: names and shapes before any read; no virtual or external data --------


@pytest.fixture
def keras_preset(tmp_path: Path, tiny3: Tiny) -> Path:
    pytest.importorskip("h5py")
    from gemma_core.formats import keras_hub
    from gemma_core.formats.mapping import Checkpoint

    config, weights = tiny3
    keras_hub.write(tmp_path / "preset", Checkpoint(config, weights))
    return tmp_path / "preset"


NORM = "layers/rms_normalization/vars/0"


def _replace(preset: Path, name: str, make: Any) -> None:
    import h5py

    from gemma_core.formats import keras_hub

    with h5py.File(preset / keras_hub.WEIGHTS, "a") as f:
        shape, dtype = f[name].shape, f[name].dtype
        del f[name]
        make(f, shape, dtype)


@pytest.fixture
def no_dataset_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    import h5py

    def refuse(self: Any, *args: Any) -> Any:
        raise AssertionError(f"dataset {self.name} was read")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", refuse)


def test_keras_virtual_dataset_is_refused(tmp_path: Path, keras_preset: Path) -> None:
    import h5py

    from gemma_core.formats import keras_hub

    other = tmp_path / "other.h5"

    def virtual(f: Any, shape: tuple[int, ...], dtype: Any) -> None:
        with h5py.File(other, "w") as g:
            g.create_dataset("x", data=np.full(shape, 7, dtype))
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[...] = h5py.VirtualSource(str(other), "x", shape=shape)
        f.create_virtual_dataset(NORM, layout)

    _replace(keras_preset, NORM, virtual)
    with pytest.raises(CheckpointError, match=rf"model\.weights\.h5: dataset {NORM} is virtual"):
        keras_hub.read(keras_preset)


def test_keras_external_dataset_is_refused(tmp_path: Path, keras_preset: Path) -> None:
    from gemma_core.formats import keras_hub

    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"\0" * 4096)
    _replace(keras_preset, NORM, lambda f, shape, dtype: f.create_dataset(
        NORM, shape, dtype, external=[(str(raw), 0, int(np.prod(shape)) * dtype.itemsize)]))
    with pytest.raises(CheckpointError, match=rf"model\.weights\.h5: dataset {NORM} stores its data outside"):
        keras_hub.read(keras_preset)


def test_keras_compressed_dataset_larger_than_the_layout_is_refused_unread(
        keras_preset: Path, no_dataset_reads: None) -> None:
    """A few kilobytes of gzip that would decode to 64 MB: refused from its declared shape."""
    from gemma_core.formats import keras_hub

    _replace(keras_preset, NORM, lambda f, shape, dtype: f.create_dataset(
        NORM, (1 << 24,), dtype, chunks=(1 << 20,), compression="gzip", fillvalue=1.0))
    assert (keras_preset / keras_hub.WEIGHTS).stat().st_size < 1 << 20
    with pytest.raises(WeightError, match=rf"mis-shaped 1: {NORM}: expected \[48\], got \[16777216\]"):
        keras_hub.read(keras_preset)


def test_keras_unexpected_dataset_is_refused_unread(keras_preset: Path, no_dataset_reads: None) -> None:
    from gemma_core.formats import keras_hub

    def with_extra(f: Any, shape: tuple[int, ...], dtype: Any) -> None:
        f.create_dataset(NORM, shape, dtype)
        f.create_dataset("layers/extra/vars/0", (4,), dtype)

    _replace(keras_preset, NORM, with_extra)
    with pytest.raises(WeightError, match=r"unexpected 1: layers/extra/vars/0"):
        keras_hub.read(keras_preset)


def test_keras_integer_dataset_is_refused(keras_preset: Path) -> None:
    from gemma_core.formats import keras_hub

    _replace(keras_preset, NORM, lambda f, shape, dtype: f.create_dataset(NORM, shape, np.int32))
    with pytest.raises(CheckpointError, match=rf"dataset {NORM} has dtype int32, not a float weight"):
        keras_hub.read(keras_preset)
