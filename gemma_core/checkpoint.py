"""Hugging Face model folders: config.json plus safetensors, single-file or sharded.

Writes are transactions (gemma_core.transaction): a temporary folder renamed into place only
on success, so a failed or interrupted write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from gemma_core.config import GemmaConfig
from gemma_core.errors import CheckpointError, ConfigError, WeightError
from gemma_core.jsonfile import read_json
from gemma_core.layout import LM_HEAD, dtype_problems, is_float_dtype, validate_weights
from gemma_core.quant import SCALE_SUFFIX, keeps_dtype
from gemma_core.safetensors_io import read_header, read_safetensors, write_safetensors
from gemma_core.transaction import write_transaction

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Multimodal Gemma 3 checkpoints keep the text model under one of these prefixes.
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.")
_MULTIMODAL_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                        "multi_modal_projector.")
# A base model saved on its own (no `model.` prefix): the names under `model.` in a causal LM.
_BARE_EMBED = "embed_tokens.weight"
_BARE_PREFIXES = ("embed_tokens.", "layers.", "norm.")
_SAVE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}


def read_config(folder: str | os.PathLike[str]) -> GemmaConfig:
    """The config of a model folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    return GemmaConfig.from_hf(read_json(path, ConfigError))


def read_tensors(folder: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors file(s), by checkpoint name."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = _read_index(folder)
        paths = {shard: _shard_path(folder, shard) for shard in sorted(set(weight_map.values()))}
        # every shard's header is checked against the index before any tensor is read
        holders: dict[str, list[str]] = {}
        for shard, path in paths.items():
            for name in read_header(path)[0]:
                if name != "__metadata__":
                    holders.setdefault(name, []).append(shard)
        twice = {name: shards for name, shards in holders.items() if len(shards) > 1}
        if twice:
            name, shards = min(twice.items())
            raise CheckpointError(f"{folder}: tensor {name} is stored in {len(shards)} shards "
                                  f"({', '.join(shards)})")
        unlisted = sorted((shards[0], name) for name, shards in holders.items()
                          if weight_map.get(name) != shards[0])
        if unlisted:
            shard = unlisted[0][0]
            names = [name for s, name in unlisted if s == shard]
            raise CheckpointError(f"{folder / shard}: holds tensors {INDEX} does not list for this "
                                  f"shard: {', '.join(names)}")
        missing = sorted(set(weight_map) - set(holders))
        if missing:
            raise CheckpointError(f"{folder}: tensors listed in {INDEX} but absent: {', '.join(missing)}")
        tensors: dict[str, np.ndarray] = {}
        for path in paths.values():
            tensors.update(read_safetensors(path))
        return tensors
    if (folder / SINGLE).is_file():
        return read_safetensors(folder / SINGLE)
    raise CheckpointError(f"{folder}: no {SINGLE} or {INDEX}")


def _read_index(folder: Path) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file) of a folder's index."""
    index = read_json(folder / INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{folder / INDEX}: malformed index (expected a weight_map of tensor "
                              f"names to shard files, got {weight_map!r:.200})")
    return weight_map


def _shard_path(folder: Path, shard: str) -> Path:
    """The path of a shard the index names, refused unless it lies inside `folder`: no absolute
    path, no `..`, no symlink out of the folder (except a Hugging Face hub cache snapshot's links
    to its own `blobs/`)."""
    parts = Path(shard).parts
    if not shard or Path(shard).is_absolute() or ".." in parts or "\\" in shard:
        raise CheckpointError(f"{folder / INDEX}: shard {shard!r} is not a file name inside the folder")
    path = folder / shard
    if not path.is_file():
        raise CheckpointError(f"{folder}: shard {shard} named in {INDEX} is missing")
    root, real = folder.resolve(), path.resolve()
    hub_blob = root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"
    if not (real.is_relative_to(root) or hub_blob):
        raise CheckpointError(f"{folder / INDEX}: shard {shard} resolves to {real}, outside the folder")
    return path


FINITE_CHUNK = 1 << 22  # elements checked at a time by check_finite (4 MB of booleans)


def check_finite(weights: Mapping[str, np.ndarray], source: str, first_row: int = 0) -> None:
    """Raise a `WeightError` naming the first floating tensor (in order) that holds a NaN or an
    infinity. Checked a block of rows at a time, so memory stays bounded. Row indices in the
    message count from `first_row` (for a block of rows of a larger tensor)."""
    for name, w in weights.items():
        a = np.asarray(w)
        if not is_float_dtype(a.dtype) or a.size == 0:
            continue
        a = a.reshape(1) if a.ndim == 0 else a
        step = max(1, FINITE_CHUNK // max(1, a[0].size))  # rows per block
        for r in range(0, a.shape[0], step):
            ok = np.isfinite(a[r:r + step])
            if not ok.all():
                where = np.unravel_index(int(np.argmin(ok)), ok.shape)
                index = (int(where[0]) + r, *map(int, where[1:]))
                shown = [index[0] + first_row, *index[1:]] if np.ndim(w) else []
                raise WeightError(f"{source}: tensor {name} holds a non-finite value ({a[index]} at "
                                  f"index {shown}); pass allow_nonfinite=True to load it anyway")


def canonical_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strip multimodal prefixes to the text model's names and drop vision tensors; a bare base
    model's names (transformers' `GemmaModel` / `Gemma2Model` / `Gemma3TextModel` save
    `embed_tokens.weight`, `layers.0...`, `norm.weight`) gain the `model.` prefix."""
    bare = _BARE_EMBED in tensors and "model." + _BARE_EMBED not in tensors
    out = {}
    for name, value in tensors.items():
        if name.startswith(_MULTIMODAL_PREFIXES):
            continue
        for prefix in _TEXT_PREFIXES:
            if name.startswith(prefix):
                name = "model." + name[len(prefix):]
                break
        if name.startswith("language_model.lm_head."):
            name = name[len("language_model."):]
        if bare and name.startswith(_BARE_PREFIXES):
            name = "model." + name
        out[name] = value
    return out


def read_labels(path: str | os.PathLike[str]) -> list[str] | None:
    """The label names (`id2label`, by id) of a folder's config.json, if it has them."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        id2label = read_json(folder / "config.json").get("id2label")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(id2label, dict):
        return None
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    except ValueError:
        raise ConfigError(f"id2label: keys must be integers, got {sorted(id2label)}") from None


def load_checkpoint(path: str | os.PathLike[str], validate: bool = True, *,
                    allow_nonfinite: bool = False) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    """(config, weights) of a Hugging Face folder (or a safetensors file inside one), validated
    as a causal LM unless `validate=False` (the caller validates for its task). Whatever
    `validate` says, float weights stored as integers are refused, and so are NaN and infinite
    values unless `allow_nonfinite=True`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    folder = path.parent if path.is_file() else path
    config = read_config(folder)
    tensors = read_safetensors(path) if path.is_file() else read_tensors(folder)
    weights = canonical_names(tensors)
    problems = dtype_problems(config, weights)
    if problems:
        raise WeightError(f"{path}: tensors in the wrong dtype: {'; '.join(problems)}")
    if validate:
        validate_weights(config, weights)
        if config.tie_word_embeddings:
            weights.pop(LM_HEAD, None)
    if not allow_nonfinite:
        check_finite(weights, str(path))
    return config, weights


def save_checkpoint(folder: str | os.PathLike[str], config: GemmaConfig,
                    weights: Mapping[str, np.ndarray], *, dtype: str | None = None,
                    max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write a Hugging Face folder (config.json + safetensors, sharded past `max_shard_bytes`).

    `dtype` casts floating tensors (float32, bfloat16, float16); None keeps each tensor's dtype.
    """
    folder = Path(folder)
    if (folder.exists() or folder.is_symlink()) and not overwrite:
        raise CheckpointError(f"{folder}: already exists (pass overwrite=True to replace it)")
    tensors = stored_tensors(config, weights, dtype)
    with write_transaction(folder, overwrite) as tmp:
        write_folder(tmp, config, tensors, dtype, max_shard_bytes)
    return folder


def stored_tensors(config: GemmaConfig, weights: Mapping[str, np.ndarray],
                   dtype: str | None = None) -> dict[str, np.ndarray]:
    """The tensors a folder of `weights` stores, validated: a tied head dropped, floating
    tensors cast to `dtype` (quantised values and their scales kept)."""
    validate_weights(config, weights)
    if dtype is not None and dtype not in _SAVE_DTYPES:
        raise ConfigError(f"dtype: cannot save as {dtype!r} (supported: {', '.join(_SAVE_DTYPES)})")
    tensors = {k: v for k, v in weights.items()
               if not (config.tie_word_embeddings and k in (LM_HEAD, LM_HEAD + SCALE_SUFFIX))}
    if dtype is not None:
        tensors = {k: v if keeps_dtype(k, v) else np.asarray(v).astype(_SAVE_DTYPES[dtype])
                   for k, v in tensors.items()}
    return tensors


def write_folder(folder: Path, config: GemmaConfig, tensors: Mapping[str, np.ndarray],
                 dtype: str | None = None, max_shard_bytes: int | None = None) -> None:
    """Write config.json and the safetensors of `tensors` (stored as they are) into the new
    folder `folder`, with no transaction of its own (callers write into one)."""
    shards = _plan_shards(tensors, max_shard_bytes)
    folder.mkdir()
    hf = config.to_hf()
    if dtype is not None:
        hf["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(folder / SINGLE, shards[0], meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(folder / name, shard, meta)
            weight_map.update({k: name for k in shard})
        total = sum(np.asarray(v).nbytes for v in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _plan_shards(tensors: Mapping[str, np.ndarray],
                 max_bytes: int | None) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = np.asarray(tensors[name]).nbytes
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards
