"""Loading: `load()` from any checkpoint format, a preset or the embedded model, and the helpers
it shares with the CLI (format detection, the tokenizer beside a checkpoint, quantise on load)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from gemma_core.backend import Backend
from gemma_core.config import Architecture, GemmaConfig
from gemma_core.errors import CheckpointError, ConfigError
from gemma_core.layout import SCORE
from gemma_core.model import Model
from gemma_core.quant import as_quant_config
from gemma_core.weights import quantize_model


def load(path_or_preset: str | os.PathLike[str], backend: str | Backend | None = None,
         dtype: str = "float32", device: str | None = None, *, seed: int = 0,
         allow_float16: bool = False, progress: Any = None, compile: bool | None = None,
         task: str = "causal-lm", num_labels: int = 2, quantize: Any = None,
         allow_nonfinite: bool = False, adapter: str | os.PathLike[str] | None = None,
         **config_changes: Any) -> Model:
    """A model from any checkpoint `gemma convert` reads (a Hugging Face folder or a safetensors
    file beside its config.json, a keras-hub preset folder, a Flax orbax folder or flat
    `.safetensors` tree, a gemma_pytorch checkpoint, a `.gguf` file), "embedded" (the embedded
    Gemma 3 270M), or a preset name (random weights from `seed`). `config_changes` override preset fields
    (tests); for GGUF they are passed to the reader (e.g. `query_pre_attn_scalar`).
    `progress(done, total)` is called while a GGUF file is dequantised. `compile` chooses
    whether the step goes through the backend's compiler (torch.compile, jax.jit); None takes
    the backend's default (eager for numpy and torch, jit for jax). `task` picks the head:
    causal-lm, base, sequence-classification or token-classification (`num_labels` sizes a
    preset's random head; a checkpoint's comes from its `score.weight` and id2label).
    `quantize` ("int8", "int4", "nf4" or a `QuantConfig`) quantises the weights on load
    (gemma_core.quant); a checkpoint saved quantised loads quantised without it.
    Weights holding NaN or infinity are refused unless `allow_nonfinite=True` (quantising them
    is refused regardless). `adapter` is a PEFT LoRA adapter folder (gemma_core.lora), run
    unmerged over the weights as loaded (over quantised weights: QLoRA).
    The default backend stays the NumPy reference (or $GEMMA_BACKEND); `backend="auto"` runs the
    fastest installed engine, as the CLI does by default (`gemma_core.engine_choice`: torch
    bf16 with its kept decode program for a GGUF model, then jax, then numpy); `dtype="auto"`
    is the backend's fastest dtype."""
    from gemma_core.presets import PRESETS
    from gemma_core.weights import random_weights

    if backend == "auto" or dtype == "auto":
        from gemma_core.engine_choice import resolve

        named = backend.name if isinstance(backend, Backend) else backend
        chosen, dtype, compile, _ = resolve(named, dtype, compile)
        backend = backend if isinstance(backend, Backend) else chosen
    key = resolve_source(path_or_preset)
    tokenizer, labels = None, None
    if key in PRESETS and not os.path.exists(key):
        config = PRESETS[key].replace(**config_changes) if config_changes else PRESETS[key]
        classifier = task in ("sequence-classification", "token-classification")
        weights = random_weights(config, seed, task=task, num_labels=num_labels if classifier else 0)
    else:
        if not os.path.exists(key) and not key.endswith(".gguf") and os.sep not in key:
            raise CheckpointError(f"{key}: no such file or folder, nor a preset name (presets: "
                                  f"{', '.join(PRESETS)}; or 'embedded')")
        fmt = source_format(key)
        if fmt == "gguf":
            from gemma_core.formats.gguf import load_gguf

            # quantised tensor by tensor as the file is read (the float32 model is never whole)
            quant = as_quant_config(quantize) if quantize is not None else None
            config, weights, tokenizer = load_gguf(key, progress=progress, quant=quant,
                                                   allow_nonfinite=allow_nonfinite, **config_changes)
            quantize = None
        else:
            if config_changes:
                raise ConfigError(f"config overrides apply to presets only, got {sorted(config_changes)}")
            if fmt == "hf":
                # here only: the checkpoint module is not needed to load the other formats
                from gemma_core.checkpoint import load_checkpoint, read_labels

                config, weights = load_checkpoint(key, validate=False, allow_nonfinite=allow_nonfinite)
                tokenizer = find_tokenizer(key, config)
                labels = read_labels(key)
            else:
                config, weights, tokenizer = _read_converted(key, fmt, progress, allow_nonfinite)
    if quantize is not None:
        config, weights = quantize_model(config, weights, quantize, task)
    rows = int(weights[SCORE].shape[0]) if SCORE in weights else 0
    if task not in ("sequence-classification", "token-classification") or (
            labels is not None and len(labels) != rows):
        labels = None  # transformers writes two default labels even for causal LMs
    lora, lora_weights = None, None
    if adapter is not None:
        from gemma_core.lora import load_peft

        lora, lora_weights = load_peft(adapter, config)
    return Model(config, weights, backend=backend, dtype=dtype, device=device,
                 allow_float16=allow_float16, tokenizer=tokenizer, compile=compile, task=task,
                 labels=labels, lora=lora, lora_weights=lora_weights)


def find_tokenizer(path: str | os.PathLike[str], config: GemmaConfig) -> Any:
    """The `tokenizer.model` beside a checkpoint, as a `GemmaTokenizer`, or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.fspath(path))
    spm_file = os.path.join(folder, "tokenizer.model")
    if not os.path.isfile(spm_file):
        return None
    return _tokenizer(spm_file, config)


def _tokenizer(spm: str | bytes, config: GemmaConfig) -> Any:
    """A `GemmaTokenizer` of a SentencePiece file or its bytes, chatting as `config`'s generation."""
    from gemma_core.tokenizer import GemmaTokenizer

    fmt = "gemma3" if config.architecture is Architecture.GEMMA3 else "gemma"
    return GemmaTokenizer(spm, chat_format=fmt)


EMBEDDED = "embedded"  # `load("embedded")`: the embedded Gemma 3 270M (gemma_core.embedded)


def resolve_source(path_or_preset: str | os.PathLike[str]) -> str:
    """The path or preset name a `load` argument stands for: "embedded" (when no file of that
    name exists) is the embedded model's GGUF file."""
    key = os.fspath(path_or_preset)
    if key == EMBEDDED and not os.path.exists(key):
        from gemma_core.embedded import default_model_path

        return default_model_path()
    return key


def source_format(path: str | os.PathLike[str]) -> str:
    """The checkpoint format of `path` (a `gemma convert` name: hf, keras-hub, flax,
    gemma-pytorch, gguf). A `.gguf` name is gguf without looking (its reader reports a missing
    or damaged file); a folder with a config.json that no reader recognises is taken as a
    Hugging Face folder, so that its reader names what is missing."""
    from gemma_core.transaction import check_source

    if os.fspath(path).endswith(".gguf"):
        if os.path.exists(path):
            check_source(path)
        return "gguf"
    from gemma_core.formats.convert import detect  # not for GGUF: it imports every reader

    try:
        return detect(path)
    except CheckpointError:
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf"
        raise


def _read_converted(path: str, fmt: str, progress: Any,
                    allow_nonfinite: bool = False) -> tuple[GemmaConfig, dict[str, np.ndarray], Any]:
    """(config, weights, tokenizer or None) of a keras-hub, flax or gemma-pytorch checkpoint,
    read as `gemma convert` reads it; the tokenizer travels with the checkpoint or lies beside it."""
    from gemma_core.formats.convert import read

    stage = None if progress is None else (lambda _label, done, total: progress(done, total))
    ckpt = read(path, fmt, stage, allow_nonfinite=allow_nonfinite)
    if ckpt.tokenizer_model is not None:
        tokenizer = _tokenizer(ckpt.tokenizer_model, ckpt.config)
    else:
        tokenizer = find_tokenizer(path, ckpt.config)
    return ckpt.config, ckpt.weights, tokenizer


