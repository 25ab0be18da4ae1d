"""keras-hub presets: `config.json` (a serialized `GemmaBackbone` / `Gemma3Backbone`),
`model.weights.h5` (Keras 3 layout), `metadata.json` and, with a tokenizer, `tokenizer.json`,
`preprocessor.json` and `assets/tokenizer/vocabulary.spm`. Loadable with
`keras_hub.models.Backbone.from_preset` and `GemmaCausalLM` / `Gemma3CausalLM.from_preset`.

The H5 file is read and written with h5py alone (no keras). Its paths follow Keras 3's saving
rules (`keras/src/saving/saving_lib.py`): functional layers under `layers/`, named by snake-cased
class with a uniqueness suffix (`gemma_decoder_block`, `gemma_decoder_block_1`, ...), nested
layers by attribute, each layer's variables in `vars/0, 1, ...`; bfloat16 is an opaque 2-byte
dataset with the attribute `dtype="bfloat16"`.

keras-hub hard-codes parts of the model that Hugging Face configs vary (RMSNorm epsilon 1e-6 in
the blocks, RoPE thetas, the layer pattern, the query scale 1/sqrt(head_dim): its decoder blocks
ignore the backbone's `query_head_dim_normalize`); an export of a config that differs is refused
rather than written to compute something else. Reading computes what keras-hub's backbone
computes: a key its constructor does not take, or a flag it ignores, is ignored with a warning;
a value it uses that this package cannot compute the same way is refused. The full Hugging Face
config also goes into `metadata.json` (key `gemma_core`); only the fields keras-hub does not
hold and that change no logit (token ids, context length) are taken back from it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gemma_core.config import Architecture, AttentionKind, GemmaConfig
from gemma_core.errors import CheckpointError, ConfigError
from gemma_core.formats.mapping import Checkpoint, Progress, T, Table, from_format, reshape, row, to_format
from gemma_core.formats.mapping import transpose as tr
from gemma_core.jsonfile import read_json
from gemma_core.layout import EMBED, FINAL_NORM, param_count

WEIGHTS = "model.weights.h5"
_CLASSES = {"keras_hub>GemmaBackbone": "gemma", "keras_hub>Gemma3Backbone": "gemma3"}
_L = "model.layers.{layer}."


def table(arch: Architecture) -> Table:
    """The keras-hub weight table of one generation."""
    prefix = "gemma3" if arch is Architecture.GEMMA3 else "gemma"
    b = f"layers/{prefix}_decoder_block{{layer}}/"
    rows = (
        row("layers/reversible_embedding/vars/0", EMBED),
        row(b + "pre_attention_norm/vars/0", _L + "input_layernorm.weight"),
        row(b + "attention/query_dense/vars/0", _L + "self_attn.q_proj.weight", reshape("N", "H", "D"),
            tr(0, 2, 1)),
        row(b + "attention/key_dense/vars/0", _L + "self_attn.k_proj.weight", reshape("K", "H", "D"),
            tr(0, 2, 1)),
        row(b + "attention/value_dense/vars/0", _L + "self_attn.v_proj.weight", reshape("K", "H", "D"),
            tr(0, 2, 1)),
        row(b + "attention/output_dense/vars/0", _L + "self_attn.o_proj.weight", reshape("D", "N", "H"),
            tr(1, 2, 0)),
        row(b + "attention/query_norm/vars/0", _L + "self_attn.q_norm.weight", when="has_qk_norm"),
        row(b + "attention/key_norm/vars/0", _L + "self_attn.k_norm.weight", when="has_qk_norm"),
        # Gemma 1's post_attention_layernorm is the pre-MLP norm
        row(b + "pre_ffw_norm/vars/0", _L + "post_attention_layernorm.weight", when="not has_sandwich_norms"),
        row(b + "post_attention_norm/vars/0", _L + "post_attention_layernorm.weight",
            when="has_sandwich_norms"),
        row(b + "pre_ffw_norm/vars/0", _L + "pre_feedforward_layernorm.weight", when="has_sandwich_norms"),
        row(b + "post_ffw_norm/vars/0", _L + "post_feedforward_layernorm.weight", when="has_sandwich_norms"),
        row(b + "gating_ffw/vars/0", _L + "mlp.gate_proj.weight", T),
        row(b + "gating_ffw_2/vars/0", _L + "mlp.up_proj.weight", T),
        row(b + "ffw_linear/vars/0", _L + "mlp.down_proj.weight", T),
        row("layers/rms_normalization/vars/0", FINAL_NORM),
    )
    return Table("keras-hub", rows, layer_key=lambda i: f"_{i}" if i else "")


# ---- config ------------------------------------------------------------------------------------


def _keras_layer_types(arch: Architecture, n: int, sliding: bool) -> tuple[AttentionKind, ...]:
    """The pattern keras-hub builds: Gemma 2 `i % 2 == 0` local, Gemma 3 `i % 6 < 5` local."""
    if not sliding:
        return (AttentionKind.GLOBAL,) * n
    period = 2 if arch is Architecture.GEMMA2 else 6
    return tuple(AttentionKind.LOCAL if i % period < period - 1 else AttentionKind.GLOBAL for i in range(n))


def _query_normalize(config: GemmaConfig) -> bool:
    """keras-hub's decoder blocks pass `query_head_dim_normalize=True` to their attention whatever
    the backbone says: queries are always scaled by 1/sqrt(head_dim)."""
    qpas = config.query_pre_attn_scalar
    if qpas is None or qpas == config.head_dim:
        return True
    raise ConfigError(
        f"query_pre_attn_scalar: keras-hub scales queries by 1/sqrt(head_dim) ({config.head_dim}) in "
        f"every model (its decoder blocks ignore query_head_dim_normalize); {qpas} cannot be expressed")


def check_config(config: GemmaConfig) -> None:
    """Refuse configs a keras-hub backbone would compute differently."""
    arch = config.architecture
    if not config.tie_word_embeddings:
        raise ConfigError("tie_word_embeddings: keras-hub Gemma always ties the LM head; got False")
    if config.rms_norm_eps != 1e-6:
        raise ConfigError(f"rms_norm_eps: keras-hub's decoder blocks use 1e-6; got {config.rms_norm_eps}")
    sliding = AttentionKind.LOCAL in config.layer_types
    if config.layer_types != _keras_layer_types(arch, config.num_layers, sliding):
        raise ConfigError(f"layer_types: keras-hub builds a fixed {arch.value} layer pattern; "
                          f"got {[k.value for k in config.layer_types]}")
    if arch is Architecture.GEMMA3:
        if (config.rope_theta, config.rope_local_theta) != (1e6, 1e4):
            raise ConfigError(f"rope_theta: keras-hub Gemma 3 uses 1e6 (global) and 1e4 (local); got "
                              f"{config.rope_theta:g} and {config.rope_local_theta:g}")
    elif (config.rope_theta, config.rope_scaling_factor) != (1e4, 1.0):
        raise ConfigError(f"rope_theta: keras-hub {arch.value} uses 10000 without scaling; got "
                          f"{config.rope_theta:g} (factor {config.rope_scaling_factor:g})")
    _query_normalize(config)


def backbone_config(config: GemmaConfig, dtype: str) -> dict[str, Any]:
    """The serialized backbone keras-hub writes to `config.json`."""
    check_config(config)
    arch = config.architecture
    c = config
    sliding = AttentionKind.LOCAL in c.layer_types
    body: dict[str, Any] = {
        "name": "gemma3_backbone" if arch is Architecture.GEMMA3 else "gemma_backbone",
        "trainable": True,
        "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": dtype},
                  "registered_name": None},
        "vocabulary_size": c.vocab_size,
    }
    if arch is Architecture.GEMMA3:
        body.update({
            "image_size": None, "num_layers": c.num_layers, "num_query_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "hidden_dim": c.hidden_size,
            "intermediate_dim": c.intermediate_size, "head_dim": c.head_dim,
            "query_head_dim_normalize": _query_normalize(c), "use_query_key_norm": True,
            "use_post_ffw_norm": True, "use_post_attention_norm": True,
            "attention_logit_soft_cap": None, "final_logit_soft_cap": c.final_logit_softcap,
            "use_sliding_window_attention": sliding, "sliding_window_size": c.sliding_window or 1024,
            "local_rope_scaling_factor": 1.0, "global_rope_scaling_factor": c.rope_scaling_factor,
            "vision_encoder": None, "use_bidirectional_attention": False,
            "layer_norm_epsilon": c.rms_norm_eps, "dropout": 0, "is_embedding_model": False,
            "pooling_intermediate_dim": None, "embedding_dim": None,
        })
        module, name = "keras_hub.src.models.gemma3.gemma3_backbone", "Gemma3Backbone"
    else:
        g2 = arch is Architecture.GEMMA2
        body.update({
            "num_layers": c.num_layers, "num_query_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "hidden_dim": c.hidden_size,
            # keras-hub's gating layers are intermediate_dim // 2 wide
            "intermediate_dim": 2 * c.intermediate_size, "head_dim": c.head_dim,
            "layer_norm_epsilon": c.rms_norm_eps, "dropout": 0,
            "query_head_dim_normalize": _query_normalize(c), "use_post_ffw_norm": g2,
            "use_post_attention_norm": g2, "final_logit_soft_cap": c.final_logit_softcap,
            "attention_logit_soft_cap": c.attn_logit_softcap,
            "sliding_window_size": c.sliding_window or 4096, "use_sliding_window_attention": sliding,
        })
        module, name = "keras_hub.src.models.gemma.gemma_backbone", "GemmaBackbone"
    return {"module": module, "class_name": name, "config": body, "registered_name": f"keras_hub>{name}"}


def _defaults(arch: Architecture, config: GemmaConfig) -> GemmaConfig:
    """Fields keras-hub does not store, from the published model of the same shape if any."""
    from gemma_core.presets import PRESETS, PUBLISHED_PARAMS

    for preset in (PRESETS[n] for n in PUBLISHED_PARAMS):
        if (preset.architecture, preset.hidden_size, preset.num_layers, preset.num_heads) == (
                arch, config.hidden_size, config.num_layers, config.num_heads):
            return config.replace(max_position_embeddings=preset.max_position_embeddings,
                                  eos_token_ids=preset.eos_token_ids)
    eos = {Architecture.GEMMA: (1,), Architecture.GEMMA2: (1, 107), Architecture.GEMMA3: (1, 106)}[arch]
    return config.replace(eos_token_ids=eos)


# The arguments of keras-hub's backbone constructors (keras_hub 0.32
# `models/gemma/gemma_backbone.py`, `models/gemma3/gemma3_backbone.py`) with their defaults;
# _REQUIRED have none. Keras layers also take `name`, `trainable` and `dtype`. Anything else in a
# config.json lands in `**kwargs` and is ignored by keras-hub, so it is ignored here (with a warning).
_REQUIRED = ("vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads", "hidden_dim",
             "intermediate_dim", "head_dim")
_GEMMA_ARGS: dict[str, Any] = {
    "query_head_dim_normalize": True, "use_post_ffw_norm": False, "use_post_attention_norm": False,
    "attention_logit_soft_cap": None, "final_logit_soft_cap": None,
    "use_sliding_window_attention": False, "sliding_window_size": 4096, "layer_norm_epsilon": 1e-6,
    "dropout": 0,
}
_GEMMA3_ARGS: dict[str, Any] = {
    "query_head_dim_normalize": True, "use_query_key_norm": True, "use_post_ffw_norm": False,
    "use_post_attention_norm": False, "attention_logit_soft_cap": None, "final_logit_soft_cap": None,
    "use_sliding_window_attention": False, "sliding_window_size": 1024,
    "local_rope_scaling_factor": 1.0, "global_rope_scaling_factor": 1.0, "vision_encoder": None,
    "layer_norm_epsilon": 1e-6, "use_bidirectional_attention": False, "dropout": 0,
    "is_embedding_model": False, "pooling_intermediate_dim": None, "embedding_dim": None,
}
_LAYER_ARGS = ("name", "trainable", "dtype")
# keras-hub hard-codes these: RMSNorm epsilon 1e-6 inside the decoder blocks (the backbone passes
# layer_norm_epsilon to the final norm only), RoPE max_wavelength 10000 (Gemma 1/2) or 10000 local
# and 1e6 global (Gemma 3), the layer pattern, and the 1/sqrt(head_dim) query scale.
_BLOCK_EPS = 1e-6


def _backbone_args(c: dict[str, Any], g3: bool, source: str) -> dict[str, Any]:
    """The backbone's constructor arguments as keras-hub sees them: defaults filled in, keys it
    does not take dropped with a warning, a missing required one refused (as its __init__ does)."""
    defaults = _GEMMA3_ARGS if g3 else _GEMMA_ARGS
    required = (*_REQUIRED, "image_size") if g3 else _REQUIRED
    missing = [k for k in required if k not in c]
    if missing:
        raise ConfigError(f"{source}: malformed keras-hub backbone config (missing {', '.join(missing)})")
    ignored = sorted(set(c) - set(required) - set(defaults) - set(_LAYER_ARGS))
    if ignored:
        cls = "Gemma3Backbone" if g3 else "GemmaBackbone"
        warnings.warn(f"{source}: {', '.join(ignored)} ignored: keras-hub's {cls} takes no such "
                      "argument and does not use it", stacklevel=3)
    return {**defaults, **{k: c[k] for k in (*required, *defaults) if k in c}}


def _refuse(source: str, what: str) -> ConfigError:
    return ConfigError(f"{source}: {what}")


def config_from_backbone(data: Any, source: str) -> GemmaConfig:
    """The GemmaConfig of a serialized keras-hub backbone: what keras-hub's backbone computes
    from it, refused where this package cannot compute the same (module docstring)."""
    if not isinstance(data, dict) or data.get("registered_name") not in _CLASSES:
        found = data.get("registered_name") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{source}: not a keras-hub Gemma backbone (registered_name {found!r}; "
                          f"supported: {', '.join(_CLASSES)})")
    raw: Any = data.get("config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: malformed keras-hub backbone config (no config object)")
    g3 = _CLASSES[data["registered_name"]] == "gemma3"
    c = _backbone_args(raw, g3, source)
    post = (bool(c["use_post_ffw_norm"]), bool(c["use_post_attention_norm"]))
    sliding = bool(c["use_sliding_window_attention"])
    if g3:
        arch, intermediate = Architecture.GEMMA3, c["intermediate_dim"]  # gate_dim_reduction 1
        if c["vision_encoder"] is not None:
            raise _refuse(source, "a multimodal Gemma 3 preset (vision_encoder set); only the "
                                  "text-only Gemma3Backbone is supported")
        if c["is_embedding_model"] or c["use_bidirectional_attention"]:
            raise _refuse(source, "an embedding (bidirectional) Gemma 3 is not supported")
        if post != (True, True) or not c["use_query_key_norm"]:
            raise _refuse(source, "use_post_ffw_norm, use_post_attention_norm and use_query_key_norm "
                                  f"must all be true for Gemma 3 (got {post[0]}, {post[1]}, "
                                  f"{bool(c['use_query_key_norm'])})")
        if c["attention_logit_soft_cap"] is not None:
            raise _refuse(source, f"attention_logit_soft_cap {c['attention_logit_soft_cap']}: Gemma 3 "
                                  "soft-caps no attention scores here")
        if c["local_rope_scaling_factor"] != 1.0:
            raise _refuse(source, f"local_rope_scaling_factor {c['local_rope_scaling_factor']} is not "
                                  "supported (local layers take no rope scaling)")
    else:
        if post not in ((True, True), (False, False)):
            raise _refuse(source, f"use_post_ffw_norm/use_post_attention_norm {post} match neither "
                                  "Gemma 1 nor Gemma 2")
        arch = Architecture.GEMMA2 if post[0] else Architecture.GEMMA
        intermediate = c["intermediate_dim"] // 2 if isinstance(c["intermediate_dim"], int) else None
        if arch is Architecture.GEMMA:
            for key in ("attention_logit_soft_cap", "final_logit_soft_cap"):
                if c[key] is not None:
                    raise _refuse(source, f"{key} {c[key]}: a Gemma 1 model with soft-capping is not "
                                          "supported")
            if sliding:
                raise _refuse(source, "use_sliding_window_attention: a Gemma 1 model with sliding "
                                      "window layers is not supported")
    eps = c["layer_norm_epsilon"]
    if eps != _BLOCK_EPS:
        raise _refuse(source, f"layer_norm_epsilon {eps}: keras-hub uses it for the final norm only "
                              f"and {_BLOCK_EPS} in every decoder block; one epsilon is supported")
    n, d, h = c["num_query_heads"], c["hidden_dim"], c["head_dim"]
    if not c["query_head_dim_normalize"] and all(isinstance(v, int) and v > 0 for v in (n, d)) and (
            d // n != h):
        warnings.warn(f"{source}: query_head_dim_normalize false ignored: keras-hub's decoder blocks "
                      f"scale queries by 1/sqrt(head_dim) ({h}), not 1/sqrt(hidden_dim/num_query_heads) "
                      f"({d // n}), and so does this reader", stacklevel=2)
    rope_factor = c["global_rope_scaling_factor"] if g3 else 1.0
    try:
        config = GemmaConfig(
            architecture=arch, vocab_size=c["vocabulary_size"], hidden_size=d,
            intermediate_size=intermediate, num_layers=c["num_layers"], num_heads=n,
            num_kv_heads=c["num_key_value_heads"], head_dim=h, rms_norm_eps=_BLOCK_EPS,
            query_pre_attn_scalar=None if arch is Architecture.GEMMA else h,
            attn_logit_softcap=c["attention_logit_soft_cap"] if arch is Architecture.GEMMA2 else None,
            final_logit_softcap=c["final_logit_soft_cap"],
            sliding_window=c["sliding_window_size"] if sliding else None,
            layer_types=_keras_layer_types(arch, c["num_layers"], sliding),
            rope_theta=1e6 if g3 else 1e4, rope_local_theta=1e4,
            rope_scaling_factor=float(rope_factor) if isinstance(rope_factor, (int, float)) else rope_factor,
        )
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{source}: {e}") from None
    if g3 and config.max_position_embeddings == 8192:
        config = config.replace(max_position_embeddings=131_072)
    return _defaults(arch, config)


# What metadata.json's Hugging Face config may add: fields keras-hub does not hold and that
# change no logit. Everything else is what keras-hub computes from config.json.
_METADATA_FIELDS = ("max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_ids")


def _with_metadata(config: GemmaConfig, meta_path: Path) -> GemmaConfig:
    """`config` with the token ids and context length of our `metadata.json` entry (written by
    `write`). keras-hub never reads metadata.json: an entry whose other fields differ from what
    keras-hub computes is ignored whole, with a warning."""
    try:
        entry = read_json(meta_path).get("gemma_core", {}).get("hf_config")
    except (OSError, ValueError, AttributeError):
        return config
    if entry is None:
        return config
    try:
        full = GemmaConfig.from_hf(entry)
    except (ConfigError, TypeError, AttributeError) as e:
        warnings.warn(f"{meta_path}: gemma_core.hf_config ignored (not a valid config: {e})", stacklevel=3)
        return config
    differ = [f.name for f in dataclasses.fields(GemmaConfig)
              if f.name not in _METADATA_FIELDS and f.name != "query_pre_attn_scalar"
              and getattr(full, f.name) != getattr(config, f.name)]
    if full.query_scale != config.query_scale:
        differ.append("query_pre_attn_scalar")
    if differ:  # not this model as keras-hub computes it: none of it is trusted
        warnings.warn(f"{meta_path}: gemma_core.hf_config ignored: its {', '.join(sorted(differ))} "
                      "differ from what keras-hub computes from config.json", stacklevel=3)
        return config
    return config.replace(**{k: getattr(full, k) for k in _METADATA_FIELDS})


def read_config(path: str | os.PathLike[str]) -> GemmaConfig:
    """The GemmaConfig of a keras-hub preset folder (config.json, plus the token ids and context
    length our metadata.json entry records), without reading the weights."""
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    data = read_json(config_path, ConfigError)
    config = config_from_backbone(data, str(config_path))
    meta_path = folder / "metadata.json"
    return _with_metadata(config, meta_path) if meta_path.is_file() else config


# ---- files -------------------------------------------------------------------------------------


def is_preset(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    data = read_json(path / "config.json", ConfigError)  # a malformed one is reported, whatever it is
    return isinstance(data, dict) and "registered_name" in data


def _h5py() -> Any:
    try:
        import h5py
    except ModuleNotFoundError:
        raise CheckpointError("keras-hub presets need h5py: pip install 'gemma-core[keras-hub]'") from None
    return h5py


def read_h5(path: Path, config: GemmaConfig | None = None) -> dict[str, np.ndarray]:
    """Every dataset of a Keras 3 `.weights.h5` by path, bfloat16 restored.

    Nothing is read until every dataset is known to be plain: stored in the file (not virtual,
    not external), of a float dtype (or keras' 2-byte opaque bfloat16); and, given `config`,
    the names and shapes are those of its keras-hub layout, so no dataset (compressed ones
    included) can decode to more than the model's size.
    """
    import ml_dtypes

    from gemma_core.formats.mapping import check_tensors

    h5py = _h5py()
    out: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            datasets: dict[str, Any] = {}

            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    datasets[name] = obj

            f.visititems(visit)
            for name, ds in datasets.items():
                _check_dataset(path, name, ds)
            if config is not None:
                check_tensors(table(config.architecture), config, datasets, str(path))
            for name, ds in datasets.items():
                value = np.asarray(ds[()])
                if ds.attrs.get("dtype") == "bfloat16":
                    value = value.view(ml_dtypes.bfloat16)
                out[name] = value
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable HDF5 file ({e})") from None
    return out


def _check_dataset(path: Path, name: str, ds: Any) -> None:
    """Refuse a dataset whose values come from elsewhere or are not float weights."""
    if ds.is_virtual:
        raise CheckpointError(f"{path}: dataset {name} is virtual (its values come from other files)")
    if ds.external:
        raise CheckpointError(f"{path}: dataset {name} stores its data outside the file")
    dtype = ds.dtype
    bf16 = dtype.kind == "V" and dtype.itemsize == 2 and ds.attrs.get("dtype") == "bfloat16"
    if not (bf16 or (dtype.kind == "f" and dtype.itemsize in (2, 4, 8))):
        raise CheckpointError(f"{path}: dataset {name} has dtype {dtype}, not a float weight")


def write_h5(path: Path, tensors: dict[str, np.ndarray]) -> None:
    import ml_dtypes

    h5py = _h5py()
    try:
        # through a Python file object: HDF5's own driver crashes the process (SIGSEGV) after a
        # failed write (a full disk); this way the failure comes back as an exception
        with open(path, "wb") as raw, h5py.File(raw, "w") as f:
            for key in sorted(tensors):
                value = np.ascontiguousarray(tensors[key])
                ds = f.create_dataset(key, data=value)
                if value.dtype == np.dtype(ml_dtypes.bfloat16):
                    ds.attrs["dtype"] = "bfloat16"
    except SystemError as e:  # h5py wraps the OSError the file object raised
        cause = e.__cause__ or e.__context__
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror, os.fspath(path)) from None
        raise OSError(f"writing {path} failed ({e})") from None


def read(path: str | os.PathLike[str], progress: Progress | None = None) -> Checkpoint:
    folder = Path(path)
    config = read_config(folder)
    weights_path = folder / WEIGHTS
    if not weights_path.is_file():
        if (folder / "model.weights.json").is_file():
            raise CheckpointError(f"{folder}: sharded keras-hub weights (model.weights.json) are not "
                                  "supported")
        raise CheckpointError(f"{folder}: no {WEIGHTS}")
    tensors = read_h5(weights_path, config)
    weights = from_format(table(config.architecture), config, tensors, str(weights_path), progress)
    spm = folder / "assets" / "tokenizer" / "vocabulary.spm"
    return Checkpoint(config, weights, spm.read_bytes() if spm.is_file() else None)


def _tokenizer_configs(config: GemmaConfig, spm: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """tokenizer.json and preprocessor.json of a CausalLM preset."""
    g3 = config.architecture is Architecture.GEMMA3
    tok_config: dict[str, Any] = {
        "name": "gemma3_tokenizer" if g3 else "gemma_tokenizer", "trainable": True,
        "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "int32"},
                  "registered_name": None},
        "config_file": "tokenizer.json", "proto": None, "sequence_length": None,
        "add_bos": False, "add_eos": False,
    }
    if g3:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_proto=spm)
        vision = ("<img>", "<start_of_image>", "<end_of_image>")
        tok_config["has_vision_tokens"] = all(sp.piece_to_id(p) != sp.unk_id() for p in vision)
        module, cls = "keras_hub.src.models.gemma3.gemma3_tokenizer", "Gemma3Tokenizer"
        pmodule, pcls = ("keras_hub.src.models.gemma3.gemma3_causal_lm_preprocessor",
                         "Gemma3CausalLMPreprocessor")
    else:
        module, cls = "keras_hub.src.models.gemma.gemma_tokenizer", "GemmaTokenizer"
        pmodule, pcls = "keras_hub.src.models.gemma.gemma_causal_lm_preprocessor", "GemmaCausalLMPreprocessor"
    tokenizer = {"module": module, "class_name": cls, "config": tok_config,
                 "registered_name": f"keras_hub>{cls}"}
    pre_config: dict[str, Any] = {
        "name": "gemma3_causal_lm_preprocessor" if g3 else "gemma_causal_lm_preprocessor",
        "trainable": True,
        "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"},
                  "registered_name": None},
        "tokenizer": tokenizer, "config_file": "preprocessor.json", "sequence_length": 1024,
        "add_start_token": True, "add_end_token": True,
    }
    if g3:
        pre_config.update({"num_vision_tokens_per_image": 256, "max_images_per_prompt": 2})
    preprocessor = {"module": pmodule, "class_name": pcls, "config": pre_config,
                    "registered_name": f"keras_hub>{pcls}"}
    return tokenizer, preprocessor


def write(path: str | os.PathLike[str], ckpt: Checkpoint, progress: Progress | None = None) -> None:
    """Write a preset folder at `path` (which must not exist)."""
    from gemma_core.formats.mapping import dtype_name

    folder = Path(path)
    config = ckpt.config
    backbone = backbone_config(config, dtype_name(ckpt.weights))
    tensors = to_format(table(config.architecture), config, ckpt.weights, progress)
    folder.mkdir()
    write_h5(folder / WEIGHTS, tensors)
    (folder / "config.json").write_text(json.dumps(backbone, indent=4))
    metadata = {
        "keras_version": None, "keras_hub_version": None,
        "parameter_count": param_count(config),
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
        "tasks": ["CausalLM"],
        "gemma_core": {"hf_config": config.to_hf()},
    }
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=4))
    if ckpt.tokenizer_model is not None:
        tokenizer, preprocessor = _tokenizer_configs(config, ckpt.tokenizer_model)
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer, indent=4))
        (folder / "preprocessor.json").write_text(json.dumps(preprocessor, indent=4))
        assets = folder / "assets" / "tokenizer"
        assets.mkdir(parents=True)
        (assets / "vocabulary.spm").write_bytes(ckpt.tokenizer_model)
