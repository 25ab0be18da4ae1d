"""Write GGUF files as llama.cpp's converter does (`conversion/gemma.py`): tensor names from
`gguf-py` `TENSOR_NAMES`, identical NumPy shapes, every norm stored as `1 + w` in float32, no
output tensor when the head is tied, the SentencePiece vocabulary in `tokenizer.ggml.*`.

Tensor types: F32, F16, BF16 (bit-exact from bfloat16 weights) and Q8_0 (matrices whose rows
are whole 32-blocks; others stay F32). GGUF has no key for `query_pre_attn_scalar` or a list of
end-of-sequence ids; we add `gemma_core.query_pre_attn_scalar` and `gemma_core.eos_token_ids`,
which `gemma convert` reads back (llama.cpp ignores unknown keys).
"""

from __future__ import annotations

import os
from typing import Any

import ml_dtypes
import numpy as np

from gemma_core.config import Architecture, AttentionKind, GemmaConfig
from gemma_core.errors import CheckpointError, ConfigError
from gemma_core.formats.mapping import Checkpoint, Progress, Table, offset, row, to_format
from gemma_core.layout import EMBED, FINAL_NORM, LM_HEAD

TYPES = ("F32", "F16", "BF16", "Q8_0")
_L = "model.layers.{layer}."
_B = "blk.{layer}."
_ONE = offset(1.0)  # GGUF stores norm weights as 1 + w
QPAS_KEY = "gemma_core.query_pre_attn_scalar"
EOS_KEY = "gemma_core.eos_token_ids"

TABLE = Table("gguf", (
    row("token_embd.weight", EMBED),
    row(_B + "attn_norm.weight", _L + "input_layernorm.weight", _ONE),
    row(_B + "attn_q.weight", _L + "self_attn.q_proj.weight"),
    row(_B + "attn_k.weight", _L + "self_attn.k_proj.weight"),
    row(_B + "attn_v.weight", _L + "self_attn.v_proj.weight"),
    row(_B + "attn_q_norm.weight", _L + "self_attn.q_norm.weight", _ONE, when="has_qk_norm"),
    row(_B + "attn_k_norm.weight", _L + "self_attn.k_norm.weight", _ONE, when="has_qk_norm"),
    row(_B + "attn_output.weight", _L + "self_attn.o_proj.weight"),
    # the pre-MLP norm is ffn_norm in every generation; HF names it differently in Gemma 1
    row(_B + "ffn_norm.weight", _L + "post_attention_layernorm.weight", _ONE, when="not has_sandwich_norms"),
    row(_B + "post_attention_norm.weight", _L + "post_attention_layernorm.weight", _ONE,
        when="has_sandwich_norms"),
    row(_B + "ffn_norm.weight", _L + "pre_feedforward_layernorm.weight", _ONE, when="has_sandwich_norms"),
    row(_B + "post_ffw_norm.weight", _L + "post_feedforward_layernorm.weight", _ONE,
        when="has_sandwich_norms"),
    row(_B + "ffn_gate.weight", _L + "mlp.gate_proj.weight"),
    row(_B + "ffn_up.weight", _L + "mlp.up_proj.weight"),
    row(_B + "ffn_down.weight", _L + "mlp.down_proj.weight"),
    row("output_norm.weight", FINAL_NORM, _ONE),
    row("output.weight", LM_HEAD, when="not tie_word_embeddings"),
))


def check_config(config: GemmaConfig) -> None:
    if config.architecture is Architecture.GEMMA3 and config.rope_local_theta != 10_000.0:
        raise ConfigError(f"rope_local_theta: llama.cpp fixes Gemma 3's local RoPE base at 10000; got "
                          f"{config.rope_local_theta:g}")


def _tensor_type(value: np.ndarray, qtype: str) -> str:
    if value.ndim == 1:
        return "F32"  # llama.cpp keeps 1-D tensors (every norm is one) in float32
    if qtype == "Q8_0" and value.shape[-1] % 32:
        return "F32"
    return qtype


def _default_type(weights: dict[str, np.ndarray]) -> str:
    from gemma_core.formats.mapping import dtype_name

    return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype_name(weights)]


def _vocab(config: GemmaConfig, spm: bytes) -> tuple[list[str], list[float], list[int], int]:
    """(pieces, scores, types, unknown id) as llama.cpp's `_create_vocab_sentencepiece` lays them out."""
    import importlib

    pb: Any = importlib.import_module("sentencepiece.sentencepiece_model_pb2")
    m = pb.ModelProto()
    m.ParseFromString(spm)
    user_defined = pb.ModelProto.SentencePiece.USER_DEFINED
    tokens, scores, types = [], [], []
    for p in m.pieces:
        tokens.append(p.piece.replace("\u2581", " ") if p.type == user_defined else p.piece)
        scores.append(p.score)
        types.append(int(p.type))
    if len(tokens) > config.vocab_size:
        raise ConfigError(f"tokenizer: {len(tokens)} pieces for vocab_size {config.vocab_size}")
    for i in range(len(tokens), config.vocab_size):  # padded rows of the embedding
        tokens.append(f"[PAD{i}]")
        scores.append(-10000.0)
        types.append(5)  # UNUSED
    return tokens, scores, types, int(m.trainer_spec.unk_id)


def write(path: str | os.PathLike[str], ckpt: Checkpoint, qtype: str | None = None,
          progress: Progress | None = None) -> None:
    """Write `ckpt` as one GGUF file; `qtype` F32/F16/BF16/Q8_0 (None: the weights' own dtype)."""
    try:
        import gguf
    except ModuleNotFoundError:
        raise CheckpointError("writing .gguf files needs the gguf package: "
                              "pip install 'gemma-core[gguf]'") from None
    config = ckpt.config
    check_config(config)
    qtype = qtype or _default_type(ckpt.weights)
    if qtype not in TYPES:
        raise ConfigError(f"gguf type: {qtype!r} is not supported (supported: {', '.join(TYPES)})")
    tensors = to_format(TABLE, config, ckpt.weights)
    arch = config.architecture.value
    w = gguf.GGUFWriter(os.fspath(path), arch)
    try:
        _write_metadata(w, gguf, config, ckpt.tokenizer_model)
        for i, (name, value) in enumerate(tensors.items()):
            kind = _tensor_type(value, qtype)
            q = gguf.GGMLQuantizationType[kind]
            if kind == "BF16" and value.dtype == np.dtype(ml_dtypes.bfloat16):
                w.add_tensor(name, np.ascontiguousarray(value).view(np.uint8), raw_dtype=q)
            elif kind == "F32":
                w.add_tensor(name, np.ascontiguousarray(value, np.float32))
            elif kind == "F16":
                w.add_tensor(name, np.ascontiguousarray(value, np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(np.asarray(value, np.float32), q), raw_dtype=q)
            if progress is not None:
                progress(i + 1, len(tensors))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _write_metadata(w: Any, gguf: Any, config: GemmaConfig, spm: bytes | None) -> None:
    c = config
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    if c.sliding_window is not None:
        w.add_sliding_window(c.sliding_window)
    if c.architecture is not Architecture.GEMMA:
        w.add_array(f"{c.architecture.value}.attention.sliding_window_pattern",
                    [kind is AttentionKind.LOCAL for kind in c.layer_types])
    if c.attn_logit_softcap is not None:
        w.add_attn_logit_softcapping(c.attn_logit_softcap)
    if c.final_logit_softcap is not None:
        w.add_final_logit_softcapping(c.final_logit_softcap)
    if c.rope_scaling_factor != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling_factor)
    if c.query_pre_attn_scalar is not None:
        w.add_float32(QPAS_KEY, float(c.query_pre_attn_scalar))
    w.add_array(EOS_KEY, [int(e) for e in c.eos_token_ids])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_ids[0])
    w.add_pad_token_id(c.pad_token_id)
    if spm is not None:
        tokens, scores, types, unk = _vocab(c, spm)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(unk)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(False)


def read_extras(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The keys `write` adds beyond llama.cpp's (query_pre_attn_scalar, eos ids), when present."""
    from gemma_core.formats.gguf import open_gguf

    meta = open_gguf(path).meta
    return {"query_pre_attn_scalar": meta.get(QPAS_KEY), "eos_token_ids": meta.get(EOS_KEY)}
