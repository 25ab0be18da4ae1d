"""`gemma convert`: detect a checkpoint's format, read it into the canonical layout, write another.

Formats (`--to` names): `hf` (Hugging Face folder, single or sharded safetensors, tokenizer
files), `keras-hub` (preset folder), `flax` (orbax folder, or a flat `.safetensors` file of the
tree when DST ends `.safetensors`), `gemma-pytorch` (folder with model.ckpt, or one `.ckpt` file),
`gguf` (read: F32/F16/BF16/Q8_0/Q5_0/Q4_K/Q6_K; write: F32/F16/BF16/Q8_0).

The output is written to a temporary path beside the destination and renamed into place only
when complete, so a failure leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemma_core.errors import CheckpointError, ConfigError
from gemma_core.formats import flax, gemma_pytorch, keras_hub
from gemma_core.formats.mapping import Checkpoint, cast, dtype_name
from gemma_core.safetensors_io import read_header
from gemma_core.transaction import check_destination, check_source, write_transaction

FORMATS = ("hf", "keras-hub", "flax", "gemma-pytorch", "gguf")
DTYPES = ("float32", "bfloat16", "float16")
GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "q8_0": "Q8_0"}
# Hugging Face files copied verbatim from an HF source to an HF destination
HF_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json")

StageProgress = Callable[[str, int, int], None]


def detect(path: str | os.PathLike[str]) -> str:
    """The format name of a checkpoint file or folder."""
    p = check_source(path)
    if p.is_dir():
        if flax.is_orbax(p):
            return "flax"
        if keras_hub.is_preset(p):
            return "keras-hub"
        if gemma_pytorch.is_checkpoint(p):
            return "gemma-pytorch"
        if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
            return "hf"
        raise CheckpointError(f"{p}: not a checkpoint folder this tool knows (hf, keras-hub, flax orbax, "
                              "gemma-pytorch)")
    with open(p, "rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF" or p.suffix == ".gguf":
        return "gguf"
    if head[:4] == b"PK\x03\x04" or p.suffix in gemma_pytorch.SUFFIXES:
        return "gemma-pytorch"
    if p.suffix == ".safetensors":
        header, _ = read_header(p)  # a damaged file is reported here, whichever format it was
        return "flax" if any(k.startswith("transformer/") for k in header) else "hf"
    raise CheckpointError(f"{p}: cannot tell the checkpoint format of this file")


def _stage(progress: StageProgress | None, label: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(label, done, total)


def read(path: str | os.PathLike[str], fmt: str | None = None,
         progress: StageProgress | None = None, *, allow_nonfinite: bool = False) -> Checkpoint:
    """Any supported checkpoint in canonical form (format detected unless given). Weights
    holding NaN or infinity are refused unless `allow_nonfinite=True`."""
    from gemma_core.checkpoint import check_finite

    fmt = fmt or detect(path)
    bar = _stage(progress, "reading")
    if fmt == "hf":  # these two readers check finiteness themselves, as they read
        return _read_hf(Path(path), allow_nonfinite)
    if fmt == "gguf":
        return _read_gguf(Path(path), bar, allow_nonfinite)
    if fmt == "keras-hub":
        ckpt = keras_hub.read(path, bar)
    elif fmt == "flax":
        ckpt = flax.read_orbax(path, bar) if Path(path).is_dir() else flax.read_safetensors_tree(path, bar)
    elif fmt == "gemma-pytorch":
        ckpt = gemma_pytorch.read(path, bar)
    else:
        raise ConfigError(f"format: unknown {fmt!r} (known: {', '.join(FORMATS)})")
    if not allow_nonfinite:
        check_finite(ckpt.weights, os.fspath(path))
    return ckpt


def _read_hf(path: Path, allow_nonfinite: bool = False) -> Checkpoint:
    from gemma_core.checkpoint import load_checkpoint

    config, weights = load_checkpoint(path, allow_nonfinite=allow_nonfinite)
    folder = path if path.is_dir() else path.parent
    files = {name: (folder / name).read_bytes() for name in HF_FILES if (folder / name).is_file()}
    return Checkpoint(config, weights, files.get("tokenizer.model"), files)


def _read_gguf(path: Path, bar: Callable[[int, int], None] | None,
               allow_nonfinite: bool = False) -> Checkpoint:
    import gguf as gguf_lib
    import numpy as np

    from gemma_core.formats.gguf import build_tokenizer_proto, open_gguf, read_config, read_weights
    from gemma_core.formats.gguf_write import EOS_KEY, QPAS_KEY

    reader = open_gguf(path)
    config = read_config(reader, str(path), reader.meta.get(QPAS_KEY))
    eos = reader.meta.get(EOS_KEY)
    if isinstance(eos, list) and eos:
        config = config.replace(eos_token_ids=tuple(int(e) for e in eos))
    weights = read_weights(reader, config, str(path), bar, allow_nonfinite=allow_nonfinite)
    embed = reader.tensors.get("token_embd.weight")
    kind = gguf_lib.GGMLQuantizationType(embed.type_id).name if embed is not None else "F32"
    if kind in ("BF16", "F16"):  # keep the stored precision (exact: these widen to float32)
        weights = cast(weights, "bfloat16" if kind == "BF16" else "float16")
    else:
        weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    spm = build_tokenizer_proto(reader) if reader.meta.get("tokenizer.ggml.tokens") is not None else None
    return Checkpoint(config, weights, spm)


def _write(path: Path, fmt: str, ckpt: Checkpoint, dst: Path, gguf_type: str | None,
           bar: Callable[[int, int], None] | None) -> None:
    if fmt == "hf":
        from gemma_core.checkpoint import stored_tensors, write_folder
        from gemma_core.formats.hf_files import hf_files

        dtype = dtype_name(ckpt.weights)
        write_folder(path, ckpt.config, stored_tensors(ckpt.config, ckpt.weights, dtype), dtype)
        files = dict(ckpt.hf_files)  # an HF source's own files, verbatim
        if ckpt.tokenizer_model is not None:
            files.setdefault("tokenizer.model", ckpt.tokenizer_model)
        # what transformers needs to tokenize and generate as we do, where the source has none
        own = "tokenizer_config.json" in files or "tokenizer.json" in files
        for name, data in hf_files(ckpt.config, None if own else files.get("tokenizer.model")).items():
            files.setdefault(name, data)
        for name, data in files.items():
            (path / name).write_bytes(data)
        if bar is not None:
            bar(1, 1)
    elif fmt == "keras-hub":
        keras_hub.write(path, ckpt, bar)
    elif fmt == "flax":
        if dst.suffix == ".safetensors":
            flax.write_safetensors_tree(path, ckpt, bar, tokenizer_path=flax.tokenizer_sidecar(dst))
        else:
            flax.write_orbax(path, ckpt, bar)
    elif fmt == "gemma-pytorch":
        gemma_pytorch.write(path, ckpt, bar)
    elif fmt == "gguf":
        from gemma_core.formats import gguf_write

        gguf_write.write(path, ckpt, gguf_type, bar)
    else:
        raise ConfigError(f"--to: unknown format {fmt!r} (known: {', '.join(FORMATS)})")


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str, dtype: str | None = None,
            progress: StageProgress | None = None, *, overwrite: bool = False,
            source_format: str | None = None) -> Checkpoint:
    """Convert `src` (any supported format) to `dst` in format `to`.

    `dtype` casts floating tensors (float32, bfloat16, float16; `q8_0` for gguf); None keeps
    them. A quantised source (gemma_core.quant) stays quantised to `hf` and is dequantised
    (float32) for the other formats. The destination appears only once complete; an existing
    one is replaced only with `overwrite=True`. Returns the checkpoint as written (canonical form).
    """
    if to not in FORMATS:
        raise ConfigError(f"--to: unknown format {to!r} (known: {', '.join(FORMATS)})")
    allowed = (*DTYPES, "q8_0") if to == "gguf" else DTYPES
    if dtype is not None and dtype not in allowed:
        raise ConfigError(f"--dtype: {dtype!r} is not supported for {to} (supported: {', '.join(allowed)})")
    src, dst = _paths(src, dst, overwrite)
    ckpt = read(src, source_format, progress)
    quant = ckpt.config.quantization
    if quant is not None and to != "hf":  # other formats hold float weights: dequantise exactly
        from gemma_core.quant import dequantize_weights

        weights = dequantize_weights(ckpt.weights, quant)
        ckpt = Checkpoint(ckpt.config.replace(quantization=None), weights, ckpt.tokenizer_model,
                          ckpt.hf_files)
    gguf_type = GGUF_TYPES[dtype] if to == "gguf" and dtype is not None else None
    if dtype is not None and dtype != "q8_0":
        ckpt.weights = cast(ckpt.weights, dtype)
    _write_atomically(dst, lambda tmp: _write(tmp, to, ckpt, dst, gguf_type, _stage(progress, "writing")),
                      overwrite)
    return ckpt


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], quant: Any,
             progress: StageProgress | None = None, *, overwrite: bool = False) -> Checkpoint:
    """Read `src` (any supported format) and write a quantised Hugging Face folder to `dst`:
    values and scales in safetensors, the `quantization_config` in config.json (gemma_core.quant)."""
    from gemma_core.weights import quantize_model

    src, dst = _paths(src, dst, overwrite)
    ckpt = read(src, None, progress)
    config, weights = quantize_model(ckpt.config, ckpt.weights, quant,
                                     progress=_stage(progress, "quantising"))
    ckpt = Checkpoint(config, weights, ckpt.tokenizer_model, ckpt.hf_files)
    _write_atomically(dst, lambda tmp: _write(tmp, "hf", ckpt, dst, None, _stage(progress, "writing")),
                      overwrite)
    return ckpt


def _paths(src: str | os.PathLike[str], dst: str | os.PathLike[str], overwrite: bool) -> tuple[Path, Path]:
    """(src, dst) as paths, once `dst` is known to be writable: new, or replaceable, and neither
    the source nor inside or around it."""
    return check_destination(src, dst, overwrite)


def _write_atomically(dst: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """`write(tmp)` to a temporary path beside `dst`, put in place only on success."""
    with write_transaction(dst, overwrite) as tmp:
        write(tmp)
