"""Hugging Face model folders: config.json plus safetensors, single-file or sharded.

Reads memory-map the tensors; writes go to a temporary folder renamed into place only on
success, so a failed write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from gemma_core.config import GemmaConfig
from gemma_core.errors import CheckpointError, ConfigError
from gemma_core.layout import LM_HEAD, validate_weights
from gemma_core.quant import SCALE_SUFFIX, keeps_dtype
from gemma_core.safetensors_io import read_safetensors, write_safetensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Multimodal Gemma 3 checkpoints keep the text model under one of these prefixes.
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.")
_MULTIMODAL_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                        "multi_modal_projector.")
_SAVE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}


def read_config(folder: str | os.PathLike[str]) -> GemmaConfig:
    """The config of a model folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return GemmaConfig.from_hf(data)


def read_tensors(folder: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors file(s), by checkpoint name."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{folder / INDEX}: malformed index ({e})") from None
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(f"{folder}: shard {shard} named in {INDEX} is missing")
            tensors.update(read_safetensors(folder / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{folder}: tensors listed in {INDEX} but absent: {', '.join(missing)}")
        return tensors
    if (folder / SINGLE).is_file():
        return read_safetensors(folder / SINGLE)
    raise CheckpointError(f"{folder}: no {SINGLE} or {INDEX}")


def canonical_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strip multimodal prefixes to the text model's names and drop vision tensors."""
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
        out[name] = value
    return out


def read_labels(path: str | os.PathLike[str]) -> list[str] | None:
    """The label names (`id2label`, by id) of a folder's config.json, if it has them."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        id2label = json.loads((folder / "config.json").read_text()).get("id2label")
    except (OSError, ValueError):
        return None
    if not isinstance(id2label, dict):
        return None
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    except ValueError:
        raise ConfigError(f"id2label: keys must be integers, got {sorted(id2label)}") from None


def load_checkpoint(path: str | os.PathLike[str],
                    validate: bool = True) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    """(config, weights) of a Hugging Face folder (or a safetensors file inside one), validated
    as a causal LM unless `validate=False` (the caller validates for its task)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    folder = path.parent if path.is_file() else path
    config = read_config(folder)
    tensors = read_safetensors(path) if path.is_file() else read_tensors(folder)
    weights = canonical_names(tensors)
    if validate:
        validate_weights(config, weights)
        if config.tie_word_embeddings:
            weights.pop(LM_HEAD, None)
    return config, weights


def save_checkpoint(folder: str | os.PathLike[str], config: GemmaConfig,
                    weights: Mapping[str, np.ndarray], *, dtype: str | None = None,
                    max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write a Hugging Face folder (config.json + safetensors, sharded past `max_shard_bytes`).

    `dtype` casts floating tensors (float32, bfloat16, float16); None keeps each tensor's dtype.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise CheckpointError(f"{folder}: already exists (pass overwrite=True to replace it)")
    validate_weights(config, weights)
    if dtype is not None and dtype not in _SAVE_DTYPES:
        raise ConfigError(f"dtype: cannot save as {dtype!r} (supported: {', '.join(_SAVE_DTYPES)})")
    tensors = {k: v for k, v in weights.items()
               if not (config.tie_word_embeddings and k in (LM_HEAD, LM_HEAD + SCALE_SUFFIX))}
    if dtype is not None:  # floating weights only: quantised values and their scales are kept
        tensors = {k: v if keeps_dtype(k, v) else np.asarray(v).astype(_SAVE_DTYPES[dtype])
                   for k, v in tensors.items()}
    shards = _plan_shards(tensors, max_shard_bytes)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        hf = config.to_hf()
        if dtype is not None:
            hf["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        meta = {"format": "pt"}
        if len(shards) == 1:
            write_safetensors(tmp / SINGLE, shards[0], meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / name, shard, meta)
                weight_map.update({k: name for k in shard})
            total = sum(np.asarray(v).nbytes for v in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


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
