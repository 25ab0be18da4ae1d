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
the blocks, RoPE thetas, the layer pattern, the query scale as 1/sqrt(head_dim) or
1/sqrt(D/N)); an export of a config that differs is refused rather than written to compute
something else. The full Hugging Face config also goes into `metadata.json` (key `gemma_core`),
so fields keras-hub does not hold (token ids, context length) survive a round trip.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from gemma_core.config import Architecture, AttentionKind, GemmaConfig
from gemma_core.errors import CheckpointError, ConfigError
from gemma_core.formats.mapping import Checkpoint, Progress, T, Table, from_format, reshape, row, to_format
from gemma_core.formats.mapping import transpose as tr
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
    qpas = config.query_pre_attn_scalar
    if qpas is None or qpas == config.head_dim:
        return True
    if config.hidden_size % config.num_heads == 0 and qpas == config.hidden_size // config.num_heads:
        return False
    raise ConfigError(
        f"query_pre_attn_scalar: keras-hub scales queries by 1/sqrt(head_dim) ({config.head_dim}) or "
        f"1/sqrt(hidden_size/num_heads) ({config.hidden_size / config.num_heads:g}); "
        f"{qpas} cannot be expressed")


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


def config_from_backbone(data: Any, source: str) -> GemmaConfig:
    """The GemmaConfig of a serialized keras-hub backbone."""
    if not isinstance(data, dict) or data.get("registered_name") not in _CLASSES:
        found = data.get("registered_name") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{source}: not a keras-hub Gemma backbone (registered_name {found!r}; "
                          f"supported: {', '.join(_CLASSES)})")
    c: Any = data.get("config")
    if not isinstance(c, dict):
        raise ConfigError(f"{source}: malformed keras-hub backbone config (no config object)")
    try:
        if _CLASSES[data["registered_name"]] == "gemma3":
            if c.get("vision_encoder") is not None:
                raise ConfigError(f"{source}: a multimodal Gemma 3 preset (vision_encoder set); only the "
                                  "text-only Gemma3Backbone is supported")
            if c.get("is_embedding_model") or c.get("use_bidirectional_attention"):
                raise ConfigError(f"{source}: an embedding (bidirectional) Gemma 3 is not supported")
            arch, intermediate = Architecture.GEMMA3, c["intermediate_dim"]
            if c.get("local_rope_scaling_factor", 1.0) != 1.0:
                raise ConfigError(f"{source}: local_rope_scaling_factor "
                                  f"{c['local_rope_scaling_factor']} is not supported")
        else:
            post = (c.get("use_post_ffw_norm", False), c.get("use_post_attention_norm", False))
            if post not in ((True, True), (False, False)):
                raise ConfigError(f"{source}: use_post_ffw_norm/use_post_attention_norm {post} match "
                                  "neither Gemma 1 nor Gemma 2")
            arch = Architecture.GEMMA2 if post[0] else Architecture.GEMMA
            intermediate = c["intermediate_dim"] // 2
        n, d, h = c["num_query_heads"], c["hidden_dim"], c["head_dim"]
        sliding = bool(c.get("use_sliding_window_attention", False))
        normalize = c.get("query_head_dim_normalize", True)
        qpas = None if arch is Architecture.GEMMA else (h if normalize else d // n)
        config = GemmaConfig(
            architecture=arch, vocab_size=c["vocabulary_size"], hidden_size=d,
            intermediate_size=intermediate, num_layers=c["num_layers"], num_heads=n,
            num_kv_heads=c["num_key_value_heads"], head_dim=h,
            rms_norm_eps=c.get("layer_norm_epsilon", 1e-6), query_pre_attn_scalar=qpas,
            attn_logit_softcap=c.get("attention_logit_soft_cap") if arch is Architecture.GEMMA2 else None,
            final_logit_softcap=c.get("final_logit_soft_cap"),
            sliding_window=c.get("sliding_window_size") if sliding else None,
            layer_types=_keras_layer_types(arch, c["num_layers"], sliding),
            rope_theta=1e6 if arch is Architecture.GEMMA3 else 1e4, rope_local_theta=1e4,
            rope_scaling_factor=float(c.get("global_rope_scaling_factor", 1.0)),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{source}: malformed keras-hub backbone config ({e!r})") from None
    if arch is Architecture.GEMMA3 and config.max_position_embeddings == 8192:
        config = config.replace(max_position_embeddings=131_072)
    return _defaults(arch, config)


# ---- files -------------------------------------------------------------------------------------


def is_preset(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "registered_name" in data


def _h5py() -> Any:
    try:
        import h5py
    except ModuleNotFoundError:
        raise CheckpointError("keras-hub presets need h5py: pip install 'gemma-core[keras-hub]'") from None
    return h5py


def read_h5(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a Keras 3 `.weights.h5` by path, bfloat16 restored."""
    import ml_dtypes

    h5py = _h5py()
    out: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    if obj.external:
                        raise CheckpointError(f"{path}: dataset {name} stores its data outside the file")
                    value = np.asarray(obj[()])
                    if obj.attrs.get("dtype") == "bfloat16":
                        value = value.view(ml_dtypes.bfloat16)
                    out[name] = value

            f.visititems(visit)
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable HDF5 file ({e})") from None
    return out


def write_h5(path: Path, tensors: dict[str, np.ndarray]) -> None:
    import ml_dtypes

    h5py = _h5py()
    with h5py.File(path, "w") as f:
        for key in sorted(tensors):
            value = np.ascontiguousarray(tensors[key])
            ds = f.create_dataset(key, data=value)
            if value.dtype == np.dtype(ml_dtypes.bfloat16):
                ds.attrs["dtype"] = "bfloat16"


def read(path: str | os.PathLike[str], progress: Progress | None = None) -> Checkpoint:
    folder = Path(path)
    config_path = folder / "config.json"
    try:
        data = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no config.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{config_path}: not valid JSON ({e})") from None
    config = config_from_backbone(data, str(config_path))
    meta_path = folder / "metadata.json"
    if meta_path.is_file():
        try:
            hf = json.loads(meta_path.read_text()).get("gemma_core", {}).get("hf_config")
        except (ValueError, AttributeError):
            hf = None
        if isinstance(hf, dict):
            full = GemmaConfig.from_hf(hf)
            if all(getattr(full, k) == getattr(config, k) for k in _KERAS_FIELDS):
                config = full
    weights_path = folder / WEIGHTS
    if not weights_path.is_file():
        if (folder / "model.weights.json").is_file():
            raise CheckpointError(f"{folder}: sharded keras-hub weights (model.weights.json) are not "
                                  "supported")
        raise CheckpointError(f"{folder}: no {WEIGHTS}")
    tensors = read_h5(weights_path)
    weights = from_format(table(config.architecture), config, tensors, str(weights_path), progress)
    spm = folder / "assets" / "tokenizer" / "vocabulary.spm"
    return Checkpoint(config, weights, spm.read_bytes() if spm.is_file() else None)


# fields keras-hub's backbone config determines; metadata.json may add the others
_KERAS_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim", "sliding_window", "layer_types",
                 "attn_logit_softcap", "final_logit_softcap", "rope_scaling_factor")


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
