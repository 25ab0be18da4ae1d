"""google/gemma_pytorch checkpoints: `torch.save({"model_state_dict": state})` with the query, key
and value projections fused as `self_attn.qkv_proj.weight` = Q | K | V along rows, the embedding
as `embedder.weight` (`text_token_embedder.weight` in multimodal Gemma 3) and Gemma 3's QK norms
as `self_attn.query_norm` / `key_norm` (gemma_pytorch `gemma/model.py`).

Files are read with `torch.load(weights_only=True)` only, and anything besides tensors (beyond
the `model_state_dict` wrapper) is refused. int8 checkpoints (`weight` + `weight_scaler`) are
dequantised to float32. The RoPE buffers (`freqs_cis`, ...) are dropped: gemma_pytorch rebuilds
them and loads with `strict=False`.

A checkpoint is a single `.ckpt` file, or a folder holding `model.ckpt` with the Hugging Face
`config.json` and `tokenizer.model` beside it (the file alone holds no config; one is then taken
from the published model of the same shape).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from gemma_core.config import Architecture, GemmaConfig
from gemma_core.errors import CheckpointError, ConfigError
from gemma_core.formats.mapping import Checkpoint, Progress, Table, from_format, row, to_format
from gemma_core.jsonfile import read_json
from gemma_core.layout import EMBED, FINAL_NORM

CKPT = "model.ckpt"
SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_L = "model.layers.{layer}."
_BUFFERS = ("freqs_cis", "local_freqs_cis", "global_freqs_cis")
_VISION = ("siglip_vision_model.", "mm_soft_embedding_norm.", "mm_input_projection.")  # multimodal Gemma 3

TABLE = Table("gemma-pytorch", (
    row("embedder.weight", EMBED),
    row(_L + "input_layernorm.weight", _L + "input_layernorm.weight"),
    row(_L + "self_attn.qkv_proj.weight", (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight",
                                           _L + "self_attn.v_proj.weight"), join="concat"),
    row(_L + "self_attn.o_proj.weight", _L + "self_attn.o_proj.weight"),
    row(_L + "self_attn.query_norm.weight", _L + "self_attn.q_norm.weight", when="has_qk_norm"),
    row(_L + "self_attn.key_norm.weight", _L + "self_attn.k_norm.weight", when="has_qk_norm"),
    row(_L + "post_attention_layernorm.weight", _L + "post_attention_layernorm.weight"),
    row(_L + "pre_feedforward_layernorm.weight", _L + "pre_feedforward_layernorm.weight",
        when="has_sandwich_norms"),
    row(_L + "post_feedforward_layernorm.weight", _L + "post_feedforward_layernorm.weight",
        when="has_sandwich_norms"),
    row(_L + "mlp.gate_proj.weight", _L + "mlp.gate_proj.weight"),
    row(_L + "mlp.up_proj.weight", _L + "mlp.up_proj.weight"),
    row(_L + "mlp.down_proj.weight", _L + "mlp.down_proj.weight"),
    row("model.norm.weight", FINAL_NORM),
))


def _torch() -> Any:
    try:
        import torch
    except ModuleNotFoundError:
        raise CheckpointError("gemma_pytorch checkpoints need torch: "
                              "pip install 'gemma-core[torch]'") from None
    return torch


def check_config(config: GemmaConfig) -> None:
    if not config.tie_word_embeddings:
        raise ConfigError("tie_word_embeddings: gemma_pytorch samples with the embedding; got False")


def is_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return (path / CKPT).is_file()
    return path.suffix in SUFFIXES and zipfile.is_zipfile(path)


def _to_numpy(name: str, t: Any, source: str) -> np.ndarray:
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{source}: entry {name!r} is a {type(t).__name__}, not a tensor; refused")
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def load_state(path: Path) -> dict[str, np.ndarray]:
    """The state dict of a gemma_pytorch file as numpy, loaded weights-only and checked."""
    torch = _torch()
    source = str(path)
    try:
        # read into private memory, not mapped: a file rewritten or truncated after loading
        # must not change (or SIGBUS) the weights
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for refused objects, RuntimeError for damaged zips
        raise CheckpointError(f"{source}: refused or unreadable as a weights-only torch file "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        extra = sorted(set(obj) - {"model_state_dict"})
        if extra:
            raise CheckpointError(f"{source}: entries besides model_state_dict: {extra}; refused")
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a state dict; refused")
    state = {str(k): _to_numpy(str(k), v, source) for k, v in obj.items()}
    return _dequantise(state, source)


def _dequantise(state: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    out = {}
    for name, value in state.items():
        if name.endswith(".weight_scaler") or name.split(".")[-1] in _BUFFERS or name.startswith(_VISION):
            continue
        scaler = state.get(name + "_scaler")
        if scaler is not None:
            value = value.astype(np.float32) * scaler.astype(np.float32)[:, None]
        elif value.dtype == np.int8:
            raise CheckpointError(f"{source}: int8 tensor {name} has no {name}_scaler")
        out[name] = value
    if "text_token_embedder.weight" in out and "embedder.weight" not in out:
        out["embedder.weight"] = out.pop("text_token_embedder.weight")
    return out


def infer_config(state: Mapping[str, np.ndarray], source: str) -> GemmaConfig:
    """The published config with these shapes (a bare .ckpt holds no config)."""
    from gemma_core.presets import PRESETS, PUBLISHED_PARAMS

    try:
        v, d = state["embedder.weight"].shape
        qkv = state[_L.format(layer=0) + "self_attn.qkv_proj.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{source}: not a gemma_pytorch Gemma checkpoint (no {e.args[0]})") from None
    layers = len({k.split(".")[2] for k in state if k.startswith("model.layers.")})
    arch = (Architecture.GEMMA3 if _L.format(layer=0) + "self_attn.query_norm.weight" in state
            else Architecture.GEMMA2 if _L.format(layer=0) + "post_feedforward_layernorm.weight" in state
            else Architecture.GEMMA)
    for preset in (PRESETS[name] for name in PUBLISHED_PARAMS):
        c = preset
        if (c.architecture, c.vocab_size, c.hidden_size, c.num_layers,
                (c.num_heads + 2 * c.num_kv_heads) * c.head_dim) == (arch, v, d, layers, qkv):
            return c
    raise ConfigError(f"{source}: no config.json beside it and no published {arch.value} model has "
                      f"vocabulary {v}, hidden size {d}, {layers} layers; put the model's config.json "
                      "in a folder with it")


def read(path: str | os.PathLike[str], progress: Progress | None = None) -> Checkpoint:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    ckpt_path = path / CKPT if path.is_dir() else path
    if not ckpt_path.is_file():
        raise CheckpointError(f"{path}: no {CKPT}")
    state = load_state(ckpt_path)
    config = None
    if (folder / "config.json").is_file():
        config = GemmaConfig.from_hf(read_json(folder / "config.json", ConfigError))
    config = config or infer_config(state, str(ckpt_path))
    weights = from_format(TABLE, config, state, str(ckpt_path), progress)
    tok = folder / "tokenizer.model"
    return Checkpoint(config, weights, tok.read_bytes() if tok.is_file() else None)


def _to_torch(x: np.ndarray) -> Any:
    torch = _torch()
    x = np.array(x, copy=True, order="C")  # writable: torch refuses read-only (memory-mapped) arrays
    if x.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def write(path: str | os.PathLike[str], ckpt: Checkpoint, progress: Progress | None = None) -> None:
    """A `.ckpt` file when `path` has a checkpoint suffix, else a folder with model.ckpt,
    config.json and tokenizer.model."""
    torch = _torch()
    check_config(ckpt.config)
    tensors = to_format(TABLE, ckpt.config, ckpt.weights, progress)
    state = {k: _to_torch(v) for k, v in tensors.items()}
    path = Path(path)
    if path.suffix in SUFFIXES:
        _save(torch, {"model_state_dict": state}, path)
        return
    path.mkdir()
    _save(torch, {"model_state_dict": state}, path / CKPT)
    (path / "config.json").write_text(json.dumps(ckpt.config.to_hf(), indent=2) + "\n")
    if ckpt.tokenizer_model is not None:
        (path / "tokenizer.model").write_bytes(ckpt.tokenizer_model)


def _save(torch: Any, obj: Any, path: Path) -> None:
    """torch.save, its write failures (a full disk) raised as OSError like every other writer's."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:  # torch's zip writer reports a short write as "unexpected pos ..."
        raise OSError(f"torch.save failed ({' '.join(str(e).split())}); is the disk full?") from None
