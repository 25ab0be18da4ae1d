"""GGUF (llama.cpp) files: the config from metadata, tensors mapped to the canonical layout and
dequantised with the `gguf` package, and the SentencePiece tokenizer rebuilt from metadata.

GGUF stores norm weights as `1 + w` (subtracted here) and no output tensor (the embedding is the
tied head). It does not record `query_pre_attn_scalar`: llama.cpp infers it from the model size,
so we take it from the published model of the same shape, or from the caller.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from gemma_core.config import Architecture, AttentionKind, GemmaConfig, default_layer_types
from gemma_core.errors import CheckpointError, ConfigError, InputError
from gemma_core.formats.gguf_file import TensorInfo, read_gguf
from gemma_core.layout import NORMS, has_role, param_template, validate_weights
from gemma_core.quant import SCALE_SUFFIX, QuantConfig, quantize

_ARCHS = {"gemma": Architecture.GEMMA, "gemma2": Architecture.GEMMA2, "gemma3": Architecture.GEMMA3}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_K", "Q6_K")

# GGUF tensor -> layout role (gemma_core.layout_table). ffn_norm is the pre-MLP norm in every
# generation; the layout knows that Gemma 1 names it post_attention_layernorm.
_GLOBAL_ROLES = {"token_embd.weight": "embedding", "output_norm.weight": "final_norm",
                 "output.weight": "lm_head"}
_BLOCK_ROLES = {
    "attn_norm": "pre_attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_q_norm": "q_norm",
    "attn_k_norm": "k_norm", "attn_output": "o", "post_attention_norm": "post_attn_norm",
    "ffn_norm": "pre_mlp_norm", "post_ffw_norm": "post_mlp_norm", "ffn_gate": "gate", "ffn_up": "up",
    "ffn_down": "down",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")  # GGUF's own names; canonical ones come from the layout
_STAND_IN = {Architecture.GEMMA: "tiny-gemma", Architecture.GEMMA2: "tiny-gemma2",
             Architecture.GEMMA3: "tiny-gemma3"}


def _generation(config: GemmaConfig | Architecture) -> GemmaConfig:
    """`config`, or for a bare architecture a preset of it, untied so that every tensor the
    generation can hold is listed (which rows hold depends on the generation and the tying only)."""
    if isinstance(config, GemmaConfig):
        return config
    from gemma_core.presets import PRESETS

    return PRESETS[_STAND_IN[Architecture(config)]].replace(tie_word_embeddings=False)


def _mapped(name: str, config: GemmaConfig) -> tuple[str, str] | None:
    """(canonical name, role) of a GGUF tensor, or None where `config` has no such tensor."""
    layer: int | None = None
    role = _GLOBAL_ROLES.get(name)
    if role is None:
        m = _BLOCK_RE.fullmatch(name)
        role = _BLOCK_ROLES.get(m.group(2)) if m else None
        layer = int(m.group(1)) if m else None
    if role is None or not has_role(config, role):
        return None
    # the file's layer index as it stands: validate_weights names any past num_layers
    return param_template(config, role).format(layer=layer), role


def canonical_name(name: str, config: GemmaConfig | Architecture) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None if Gemma (`config`, or any model of that
    architecture) has no such tensor."""
    found = _mapped(name, _generation(config))
    return None if found is None else found[0]


@dataclasses.dataclass(frozen=True)
class _Reader:
    meta: dict[str, Any]
    tensors: dict[str, TensorInfo]


def open_gguf(path: str | os.PathLike[str]) -> _Reader:
    """The metadata and tensors of a GGUF file (tensor data memory-mapped, not yet decoded)."""
    try:
        import gguf  # noqa: F401  (dequantisation and the ggml type table)
    except ModuleNotFoundError:
        raise CheckpointError("reading .gguf files needs the gguf package: "
                              "pip install 'gemma-core[gguf]'") from None
    return _Reader(*read_gguf(path))


def _field(reader: _Reader, key: str, default: Any = None) -> Any:
    return reader.meta.get(key, default)


def _query_scalar(arch: Architecture, hidden: int, layers: int, heads: int, head_dim: int,
                  override: float | None) -> float | None:
    if arch is Architecture.GEMMA:
        return None
    if override is not None:
        return override
    from gemma_core.presets import PRESETS, PUBLISHED_PARAMS

    for preset in (PRESETS[name] for name in PUBLISHED_PARAMS):
        if (preset.architecture, preset.hidden_size, preset.num_layers, preset.num_heads,
                preset.head_dim) == (arch, hidden, layers, heads, head_dim):
            return preset.query_pre_attn_scalar
    raise ConfigError(
        f"query_pre_attn_scalar: GGUF does not record it and no published {arch.value} model has "
        f"hidden_size {hidden}, {layers} layers, {heads} heads; pass query_pre_attn_scalar=..."
    )


def read_config(reader: _Reader, path: str = "", query_pre_attn_scalar: float | None = None) -> GemmaConfig:
    """The config from a GGUF's metadata (and its embedding's shape for the vocabulary)."""
    name = _field(reader, "general.architecture")
    if name not in _ARCHS:
        raise ConfigError(f"{path}: general.architecture {name!r} is not supported "
                          f"(supported: {', '.join(_ARCHS)})")
    arch = _ARCHS[name]

    def need(key: str) -> Any:
        value = _field(reader, f"{name}.{key}")
        if value is None:
            raise ConfigError(f"{path}: metadata {name}.{key} is missing")
        return value

    def count(key: str, default: int | None = None) -> int:
        value = need(key) if default is None else _field(reader, f"{name}.{key}", default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{path}: metadata {name}.{key} must be a positive integer, got {value!r}")
        return value

    embed = reader.tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{path}: tensor token_embd.weight is missing")
    hidden, layers, heads = count("embedding_length"), count("block_count"), count("attention.head_count")
    head_dim = count("attention.key_length", hidden // heads)
    window = _field(reader, f"{name}.attention.sliding_window")
    layer_types: tuple[AttentionKind, ...] = ()
    pattern = _field(reader, f"{name}.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer files list one flag per layer (True = sliding)
        layer_types = tuple(AttentionKind.LOCAL if p else AttentionKind.GLOBAL for p in pattern)
    elif isinstance(pattern, int) and arch is Architecture.GEMMA3:
        pattern = count("attention.sliding_window_pattern")
        layer_types = tuple(AttentionKind.GLOBAL if (i + 1) % pattern == 0 else AttentionKind.LOCAL
                            for i in range(layers))
    factor = 1.0
    if _field(reader, f"{name}.rope.scaling.type") == "linear":
        factor = float(_field(reader, f"{name}.rope.scaling.factor", 1.0))
    bos = _field(reader, "tokenizer.ggml.bos_token_id", 2)
    eos = _field(reader, "tokenizer.ggml.eos_token_id", 1)
    pad = _field(reader, "tokenizer.ggml.padding_token_id", 0)
    return GemmaConfig(
        architecture=arch,
        vocab_size=int(embed.shape[0]),
        hidden_size=hidden,
        intermediate_size=count("feed_forward_length"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=count("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=count("context_length"),
        # stored as float32: 1e-6 comes back as 9.99999997e-07; take the shortest decimal
        rms_norm_eps=float(str(np.float32(need("attention.layer_norm_rms_epsilon")))),
        # gemma-core's own writer records the scalar (llama.cpp does not): gemma_core.formats.gguf_write
        query_pre_attn_scalar=_query_scalar(
            arch, hidden, layers, heads, head_dim,
            query_pre_attn_scalar if query_pre_attn_scalar is not None
            else _field(reader, "gemma_core.query_pre_attn_scalar")),
        attn_logit_softcap=_field(reader, f"{name}.attn_logit_softcapping")
        if arch is Architecture.GEMMA2 else None,
        final_logit_softcap=_field(reader, f"{name}.final_logit_softcapping"),
        sliding_window=int(window) if window is not None and arch is not Architecture.GEMMA else None,
        layer_types=layer_types or default_layer_types(arch, layers),
        rope_theta=float(_field(reader, f"{name}.rope.freq_base", 10_000.0)),
        rope_local_theta=10_000.0,
        rope_scaling_factor=factor,
        tie_word_embeddings="output.weight" not in reader.tensors,
        pad_token_id=int(pad), bos_token_id=int(bos),
        eos_token_ids=tuple(int(e) for e in _field(reader, "gemma_core.eos_token_ids", [eos])),
    )


QUANTIZE_ROWS = 8192  # rows dequantised at a time when quantising on load


def read_weights(reader: _Reader, config: GemmaConfig, path: str = "",
                 progress: Callable[[int, int], None] | None = None, *,
                 allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
    """Every tensor dequantised to float32 under its canonical name, norms shifted back by 1.
    Where `config.quantization` is set, the tensors it stores quantised are requantised as they
    are read, a block of rows at a time (each scale covers part of one row), so the float32
    model is never held whole: the embedding alone is 671 MB in float32 for Gemma 3 270M.
    A tensor holding NaN or infinity is refused unless `allow_nonfinite=True` (quantising one
    is refused regardless). The arrays are private copies, never views of the mapped file."""
    import gguf

    from gemma_core.checkpoint import check_finite

    out: dict[str, np.ndarray] = {}
    tensors = list(reader.tensors.values())
    for i, t in enumerate(tensors):
        found = _mapped(t.name, config)
        if found is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for {config.architecture.value}")
        name, role = found
        qtype = gguf.GGMLQuantizationType(t.type_id)
        if qtype.name not in SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name} has quantisation type {qtype.name}, not "
                                  f"supported (supported: {', '.join(SUPPORTED_TYPES)})")

        def dequantized(data: np.ndarray, shape: tuple[int, ...], t: Any = t, qtype: Any = qtype,
                        name: str = name, row: int = 0) -> np.ndarray:
            try:
                w = np.asarray(gguf.quants.dequantize(data, qtype), np.float32).reshape(shape)
            except Exception as e:
                raise CheckpointError(f"{path}: tensor {t.name} could not be dequantised ({e})") from None
            if np.may_share_memory(w, data):  # F32 comes back as a view of the mapped file
                w = w.copy()
            if not allow_nonfinite:
                check_finite({f"{t.name} ({name})": w}, path, first_row=row)
            return w

        quant = config.quantization
        scheme = quant.scheme_for(name) if quant is not None else None
        if scheme is not None and len(t.shape) == 2:
            rows = t.shape[0]
            parts = [quantize(dequantized(t.data[r:r + QUANTIZE_ROWS], (-1, t.shape[1]), row=r), scheme,
                              quant.group_for(scheme), name)
                     for r in range(0, rows, QUANTIZE_ROWS)]
            out[name] = np.concatenate([v for v, _ in parts])
            out[name + SCALE_SUFFIX] = np.concatenate([sc for _, sc in parts])
        else:
            w = dequantized(t.data, t.shape)
            if role in NORMS:
                w = w - np.float32(1.0)  # GGUF stores 1 + w
            out[name] = w
        if progress is not None:
            progress(i + 1, len(tensors))
    validate_weights(config, out)
    return out


def build_tokenizer_proto(reader: _Reader) -> bytes:
    """A serialized SentencePiece ModelProto equal to the one the GGUF was made from.

    Piece types follow Google's Gemma files, not llama.cpp's: llama.cpp writes every added token
    that the Hugging Face config calls special (or that looks special: `<mask>`, `<unused*>`) as
    CONTROL, while in Google's `tokenizer.model` only pad, eos and bos are CONTROL and unk is
    UNKNOWN; `<start_of_turn>`, `<end_of_turn>`, `<mask>`, `<unused*>`, ... are USER_DEFINED, so
    that plain SentencePiece (DeepMind's gemma, keras-hub, gemma_pytorch) matches them in text.
    The other types (normal, user-defined, byte, unused) are kept as stored.
    """
    import importlib

    pb: Any = importlib.import_module("sentencepiece.sentencepiece_model_pb2")
    kinds = pb.ModelProto.SentencePiece

    if _field(reader, "tokenizer.ggml.model") != "llama":
        raise CheckpointError(f"tokenizer.ggml.model: {_field(reader, 'tokenizer.ggml.model')!r} is not a "
                              "SentencePiece (llama) vocabulary")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    if not (tokens and len(tokens) == len(scores) == len(types)):
        raise CheckpointError("tokenizer.ggml.tokens/scores/token_type: missing or of different lengths")
    m = pb.ModelProto()
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = True
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    for name, key, default in (("unk", "unknown", 3), ("bos", "bos", 2), ("eos", "eos", 1),
                               ("pad", "padding", 0)):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id", default)
        is_id = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if not (is_id and 0 <= value < len(tokens)):
            raise CheckpointError(f"tokenizer.ggml.{key}_token_id: {value!r} is outside the vocabulary "
                                  f"[0, {len(tokens)})")
        setattr(t, f"{name}_id", int(value))
        setattr(t, f"{name}_piece", tokens[value])  # SentencePiece finds its special ids by piece name
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    control_ids = {t.bos_id, t.eos_id, t.pad_id}
    for i, (text, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind not in kinds.Type.values():
            raise CheckpointError(f"tokenizer.ggml.token_type[{i}]: {kind!r} is not a SentencePiece "
                                  "piece type (1-6)")
        piece = m.pieces.add()
        # llama.cpp writes user-defined pieces with real spaces; SentencePiece wants them escaped
        piece.piece = text.replace(" ", "\u2581") if kind == kinds.USER_DEFINED else text
        piece.score = float(score)
        if i == t.unk_id:  # the unknown piece may be stored as a control token
            piece.type = kinds.UNKNOWN
        elif kind == kinds.CONTROL and i not in control_ids:
            piece.type = kinds.USER_DEFINED
        else:
            piece.type = int(kind)
    return m.SerializeToString()


def load_gguf(
    path: str | os.PathLike[str], *, query_pre_attn_scalar: float | None = None,
    progress: Callable[[int, int], None] | None = None, quant: QuantConfig | None = None,
    allow_nonfinite: bool = False,
) -> tuple[GemmaConfig, dict[str, np.ndarray], Any]:
    """(config, float32 weights, GemmaTokenizer or None) of a GGUF file; with `quant`, the
    weights quantised as they are read and the config recording it (see `read_weights`; NaN
    and infinite weights are refused unless `allow_nonfinite=True`). What a load decodes is
    kept in the load cache (`gemma_core.load_cache`, off under GEMMA_LOAD_CACHE=0): the next
    load of the same file with the same settings maps it instead, the same values bit for bit."""
    from gemma_core import load_cache

    settings = {"quant": None if quant is None else quant.to_hf(),
                "query_pre_attn_scalar": query_pre_attn_scalar, "allow_nonfinite": allow_nonfinite}
    hit = load_cache.lookup(path, settings)
    if hit is not None:
        try:
            return hit.config, hit.weights, _tokenizer(hit.config, hit.tokenizer)
        except InputError:  # special pieces its proto does not hold: read as a miss, rewritten
            pass
    reader = open_gguf(path)
    config = read_config(reader, os.fspath(path), query_pre_attn_scalar)
    if quant is not None:
        config = config.replace(quantization=quant)
    weights = read_weights(reader, config, os.fspath(path), progress, allow_nonfinite=allow_nonfinite)
    state = None
    if _field(reader, "tokenizer.ggml.tokens") is not None:
        state = load_cache.TokenizerState(build_tokenizer_proto(reader),
                                          bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
                                          _field(reader, "tokenizer.chat_template"))
    tokenizer = _tokenizer(config, state)  # before the entry is kept: a refused proto is not
    if tokenizer is not None:
        state = dataclasses.replace(state, special_pieces=tokenizer.special_pieces)
    kept = load_cache.store(path, settings, config, weights, state)
    return config, weights if kept is None else kept, tokenizer


def _tokenizer(config: GemmaConfig, state: Any) -> Any:
    """The GemmaTokenizer of a `load_cache.TokenizerState`, or None without one."""
    from gemma_core.tokenizer import GemmaTokenizer

    if state is None:
        return None
    fmt = "gemma3" if config.architecture is Architecture.GEMMA3 else "gemma"
    return GemmaTokenizer(state.proto, chat_format=fmt, add_bos=state.add_bos,
                          chat_template=state.chat_template, special_pieces=state.special_pieces)
