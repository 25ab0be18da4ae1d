"""The parameter tree of google-deepmind/gemma (Flax), as the FLAT orbax checkpoint the library
restores (`transformer/layer_N/attn/q_einsum` -> `{w}`, "how the official Gemma checkpoints were
released", `gemma/gm/ckpts/_checkpoint.py`) and as one flat safetensors file of the same tree
(keys joined with `/`, e.g. `transformer/layer_0/attn/q_einsum/w`).

Layout (reference/weight-layouts.md 2.3, 5.1): einsum kernels `q_einsum` [N, D, H],
`kv_einsum` [2, K, D, H] (index 0 = keys) or `qkv_einsum` [3, N, D, H] when K == N,
`attn_vec_einsum` [N, H, D], `gating_einsum` [2, D, F] (Gemma 1, Gemma 2 2B) or [2, F, D]
(`transpose_gating_einsum`: Gemma 2 9B/27B, Gemma 3), `linear` [F, D]; norms store `scale` = w;
the 256000-token Gemma 1/2 vocabulary is padded to 256128 rows.

The tree carries no config: we store the Hugging Face config beside it (safetensors metadata,
or `config.json` in the orbax folder); without one, the shape must match a published model.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gemma_core.config import Architecture, GemmaConfig
from gemma_core.errors import CheckpointError, ConfigError
from gemma_core.formats.mapping import (
    Checkpoint,
    Progress,
    T,
    Table,
    from_format,
    pad_rows,
    reshape,
    row,
    to_format,
)
from gemma_core.formats.mapping import transpose as tr
from gemma_core.jsonfile import parse_json, read_json
from gemma_core.layout import EMBED, FINAL_NORM
from gemma_core.safetensors_io import read_header, read_safetensors, write_safetensors

_L = "model.layers.{layer}."
_P = "transformer/layer_{layer}/"
META_KEY = "gemma_core.hf_config"
TOKENIZER_KEY = "gemma_core.tokenizer_model"  # the tokenizer.model bytes, base64
# Markers of an orbax checkpoint folder (format_utils in orbax; the msgpack "checkpoint" is legacy).
ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA", "checkpoint")
_GEMMA2_UNTRANSPOSED_D = 2304  # gemma2_2b is the one Gemma 2 with transpose_gating_einsum=False


def padded_vocab(config: GemmaConfig) -> int:
    """Rows of the Flax embedding: Gemma 1/2's 256000 are padded to 256128 for TPUs."""
    return 256_128 if config.vocab_size == 256_000 else config.vocab_size


def gating_transposed(config: GemmaConfig) -> bool:
    """Whether `gating_einsum` is stored [2, F, D] (google-deepmind/gemma `transpose_gating_einsum`)."""
    if config.architecture is Architecture.GEMMA:
        return False
    if config.architecture is Architecture.GEMMA2:
        return config.hidden_size != _GEMMA2_UNTRANSPOSED_D
    return True


def table(transposed_gating: bool | None = None) -> Table:
    """The Flax tree table; `transposed_gating` None decides from the config."""

    def transposed(config: GemmaConfig) -> bool:
        return gating_transposed(config) if transposed_gating is None else transposed_gating

    rows = (
        row("transformer/embedder/input_embedding", EMBED, pad_rows("P")),
        row(_P + "pre_attention_norm/scale", _L + "input_layernorm.weight"),
        row(_P + "attn/qkv_einsum/w", (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight",
                                       _L + "self_attn.v_proj.weight"),
            reshape("N", "H", "D"), tr(0, 2, 1), join="stack", when="qkv"),
        row(_P + "attn/q_einsum/w", _L + "self_attn.q_proj.weight", reshape("N", "H", "D"), tr(0, 2, 1),
            when="not qkv"),
        row(_P + "attn/kv_einsum/w", (_L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
            reshape("K", "H", "D"), tr(0, 2, 1), join="stack", when="not qkv"),
        row(_P + "attn/attn_vec_einsum/w", _L + "self_attn.o_proj.weight", reshape("D", "N", "H"),
            tr(1, 2, 0)),
        row(_P + "attn/_query_norm/scale", _L + "self_attn.q_norm.weight", when="has_qk_norm"),
        row(_P + "attn/_key_norm/scale", _L + "self_attn.k_norm.weight", when="has_qk_norm"),
        row(_P + "pre_ffw_norm/scale", _L + "post_attention_layernorm.weight", when="not has_sandwich_norms"),
        row(_P + "post_attention_norm/scale", _L + "post_attention_layernorm.weight",
            when="has_sandwich_norms"),
        row(_P + "pre_ffw_norm/scale", _L + "pre_feedforward_layernorm.weight", when="has_sandwich_norms"),
        row(_P + "post_ffw_norm/scale", _L + "post_feedforward_layernorm.weight", when="has_sandwich_norms"),
        row(_P + "mlp/gating_einsum/w", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
            join="stack", when="transposed_gating"),
        row(_P + "mlp/gating_einsum/w", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), T,
            join="stack", when="not transposed_gating"),
        row(_P + "mlp/linear/w", _L + "mlp.down_proj.weight", T),
        row("transformer/final_norm/scale", FINAL_NORM),
    )
    return Table("flax", rows, symbols=lambda c: {"P": padded_vocab(c)},
                 predicates={"qkv": lambda c: c.num_kv_heads == c.num_heads,
                             "transposed_gating": transposed})


def check_config(config: GemmaConfig) -> None:
    if not config.tie_word_embeddings:
        raise ConfigError("tie_word_embeddings: the Flax Gemma decodes with the embedding; got False")


# ---- config without metadata -------------------------------------------------------------------


def _layer_count(keys: Any) -> int:
    layers = {k.split("/")[1] for k in keys if k.startswith("transformer/layer_")}
    return len(layers)


def infer_config(tensors: Mapping[str, Any], source: str) -> GemmaConfig:
    """The published config whose shapes the tree has (the tree itself holds no config)."""
    from gemma_core.presets import PRESETS, PUBLISHED_PARAMS

    try:
        rows, d = tensors["transformer/embedder/input_embedding"].shape
        q = _P.format(layer=0) + "attn/q_einsum/w"
        if q in tensors:
            n, _, h = tensors[q].shape
        else:
            _, n, _, h = tensors[_P.format(layer=0) + "attn/qkv_einsum/w"].shape
    except (KeyError, ValueError, AttributeError):
        raise CheckpointError(f"{source}: not a Gemma Flax tree (no embedder or layer_0 attention)") from None
    arch = (Architecture.GEMMA3 if _P.format(layer=0) + "attn/_query_norm/scale" in tensors
            else Architecture.GEMMA2 if _P.format(layer=0) + "post_ffw_norm/scale" in tensors
            else Architecture.GEMMA)
    layers = _layer_count(tensors)
    for preset in (PRESETS[name] for name in PUBLISHED_PARAMS):
        if (preset.architecture, preset.hidden_size, preset.num_layers, preset.num_heads,
                preset.head_dim) == (arch, d, layers, n, h) and rows in (preset.vocab_size,
                                                                        padded_vocab(preset)):
            return preset
    raise ConfigError(f"{source}: no config stored with the tree and no published {arch.value} model has "
                      f"hidden size {d}, {layers} layers, {n} heads of {h}; convert from a checkpoint "
                      "with a config")


def _transposed_in(tensors: Mapping[str, Any], config: GemmaConfig) -> bool | None:
    """The gating orientation the tensors use, when their shape tells (F != D)."""
    g = tensors.get(_P.format(layer=0) + "mlp/gating_einsum/w")
    if g is None or config.intermediate_size == config.hidden_size or len(g.shape) != 3:
        return None
    return tuple(g.shape[1:]) == (config.intermediate_size, config.hidden_size)


# Multimodal Gemma 3 trees: the SigLIP encoder and the embedder's projection (text model only here)
_VISION = ("SigLiPFromPatches_0/", "transformer/embedder/mm_")


def from_tree(tensors: Mapping[str, Any], config: GemmaConfig | None, source: str,
              progress: Progress | None = None) -> dict[str, np.ndarray]:
    tensors = {k: v for k, v in tensors.items() if not k.startswith(_VISION)}
    if config is None:
        config = infer_config(tensors, source)
    return from_format(table(_transposed_in(tensors, config)), config, tensors, source, progress)


# ---- flat safetensors --------------------------------------------------------------------------


def is_flat_safetensors(path: Path) -> bool:
    try:
        header, _ = read_header(path)
    except (CheckpointError, OSError):
        return False
    return any(k.startswith("transformer/") for k in header)


def tokenizer_sidecar(path: str | os.PathLike[str]) -> Path:
    """The `tokenizer.model` written beside a flat tree file: `out.safetensors` -> `out.tokenizer.model`."""
    return Path(path).with_suffix(".tokenizer.model")


def _tokenizer_from(meta: Mapping[str, str], path: str | os.PathLike[str]) -> bytes | None:
    """The tokenizer embedded in the metadata ("" = written without one); without the key (a file
    from elsewhere), the sidecar `tokenizer.model` beside the file, if there is one."""
    if TOKENIZER_KEY not in meta:
        side = tokenizer_sidecar(path)
        return side.read_bytes() if side.is_file() else None
    if not meta[TOKENIZER_KEY]:
        return None
    try:
        return base64.b64decode(meta[TOKENIZER_KEY], validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError(f"{path}: __metadata__ {TOKENIZER_KEY!r} is not base64") from None


def read_safetensors_tree(path: str | os.PathLike[str], progress: Progress | None = None) -> Checkpoint:
    """A flat tree file (see `write_safetensors_tree`), with its config and tokenizer."""
    header, _ = read_header(path)
    meta = header.get("__metadata__") or {}
    config = None
    if META_KEY in meta:
        config = GemmaConfig.from_hf(parse_json(meta[META_KEY], f"{path}: {META_KEY}", ConfigError))
    tensors = read_safetensors(path)
    config = config or infer_config(tensors, os.fspath(path))
    return Checkpoint(config, from_tree(tensors, config, os.fspath(path), progress),
                      _tokenizer_from(meta, path))


def write_safetensors_tree(path: str | os.PathLike[str], ckpt: Checkpoint,
                           progress: Progress | None = None, *,
                           tokenizer_path: str | os.PathLike[str] | None = None) -> None:
    """The Flax tree as one flat safetensors file at `path`, the HF config in its metadata.

    The tokenizer travels two ways. Its bytes are embedded in the metadata (base64 under
    `gemma_core.tokenizer_model`), so the file alone is the whole checkpoint, appears in the same
    atomic rename and reads back with its tokenizer. And, since google-deepmind/gemma loads the
    tokenizer from a file of its own (`gm.text.Gemma3Tokenizer(path)`), a copy is written to
    `tokenizer_path` when given (convert passes `tokenizer_sidecar(dst)`): in its own transaction
    (temporary file and rename, replacing an older copy), after the tree file is complete and
    before that file is renamed into place. A failure before then leaves neither; the one step after
    it (the tree's rename) can leave a new sidecar beside an older or no tree file, which changes
    nothing this reader loads: it takes the embedded tokenizer, and the sidecar only for a file
    written elsewhere (without the metadata key).
    """
    check_config(ckpt.config)
    tensors = to_format(table(), ckpt.config, ckpt.weights, progress)
    tok = ckpt.tokenizer_model
    meta = {"format": "flax", META_KEY: json.dumps(ckpt.config.to_hf()),
            TOKENIZER_KEY: base64.b64encode(tok).decode("ascii") if tok is not None else ""}
    write_safetensors(path, tensors, meta)
    if tok is not None and tokenizer_path is not None:
        from gemma_core.transaction import write_transaction

        with write_transaction(tokenizer_path, overwrite=True) as tmp:
            tmp.write_bytes(tok)


# ---- orbax -------------------------------------------------------------------------------------


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ModuleNotFoundError:
        raise CheckpointError("orbax checkpoints need orbax-checkpoint: pip install 'gemma-core[flax]' "
                              "(or write a .safetensors file of the tree)") from None
    return ocp


def is_orbax(path: Path) -> bool:
    path = Path(path).absolute()
    return path.is_dir() and any((path / m).exists() for m in ORBAX_MARKERS)


def read_orbax(path: str | os.PathLike[str], progress: Progress | None = None) -> Checkpoint:
    ocp = _orbax()
    import jax

    folder = Path(path).absolute()  # orbax refuses relative paths
    try:
        checkpointer = ocp.PyTreeCheckpointer()
        meta = checkpointer.metadata(folder).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        tree = checkpointer.restore(folder, restore_args=args)
    except Exception as e:  # orbax raises many kinds for a damaged folder
        raise CheckpointError(f"{folder}: not a readable orbax checkpoint "
                              f"({type(e).__name__}: {e})") from None
    tensors = _flatten(tree)
    config = None
    if (folder / "config.json").is_file():
        config = GemmaConfig.from_hf(read_json(folder / "config.json", ConfigError))
    config = config or infer_config(tensors, str(folder))
    tok = folder / "tokenizer.model"
    return Checkpoint(config, from_tree(tensors, config, str(folder), progress),
                      tok.read_bytes() if tok.is_file() else None)


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """FLAT (`{"transformer/layer_0/attn/q_einsum": {"w": x}}`) or nested trees to `/` keys;
    a `params` wrapper (NESTED) is unwrapped and `transformer/` prefixed."""
    if isinstance(tree, Mapping) and set(tree) == {"params"}:
        tree = tree["params"]
    out: dict[str, np.ndarray] = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: np.asarray(tree)}


def _unflatten(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        group, leaf = key.rsplit("/", 1)
        out.setdefault(group, {})[leaf] = value
    return out


def _remove_orbax_temporaries(folder: Path) -> None:
    """Remove orbax's own temporary folders beside `folder` after a failed save; its background
    threads may still be creating them for a moment after the failure is reported."""
    for _ in range(20):
        found = list(folder.parent.glob(f"{folder.name}.orbax-checkpoint-tmp*"))
        for tmp in found:
            shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(0.05)
        if not found and not any(folder.parent.glob(f"{folder.name}.orbax-checkpoint-tmp*")):
            return


def write_orbax(path: str | os.PathLike[str], ckpt: Checkpoint, progress: Progress | None = None) -> None:
    """Write a FLAT orbax checkpoint folder at `path` (which must not exist), plus config.json and
    tokenizer.model beside the orbax files."""
    ocp = _orbax()
    check_config(ckpt.config)
    tensors = to_format(table(), ckpt.config, ckpt.weights, progress)
    folder = Path(path).absolute()  # orbax refuses relative paths
    checkpointer = ocp.PyTreeCheckpointer()
    failure = None
    try:
        checkpointer.save(folder, _unflatten(tensors))
    except (ValueError, RuntimeError) as e:  # orbax reports a failed write (a full disk) so
        failure = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    finally:
        checkpointer.close()
    if failure is not None:
        _remove_orbax_temporaries(folder)
        raise OSError(f"orbax could not write the checkpoint ({failure})")
    (folder / "config.json").write_text(json.dumps(ckpt.config.to_hf(), indent=2) + "\n")
    if ckpt.tokenizer_model is not None:
        (folder / "tokenizer.model").write_bytes(ckpt.tokenizer_model)
