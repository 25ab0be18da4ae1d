"""Write small GGUF files the way llama.cpp's converter does (norms stored as 1 + w, no output
tensor when tied), for testing the reader without the real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gemma_core.config import Architecture, GemmaConfig

_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "pre_feedforward_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str, arch: Architecture) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, *rest = name.split(".")
    part = ".".join(rest[:-1])
    if part == "post_attention_layernorm":
        gg = "ffn_norm" if arch is Architecture.GEMMA else "post_attention_norm"
    else:
        gg = _BLOCK[part]
    return f"blk.{layer}.{gg}.weight"


def write_gguf(path: Path, config: GemmaConfig, weights: dict[str, np.ndarray], qtype: str = "F32",
               tokenizer: tuple[list[str], list[float], list[int]] | None = None,
               arch_name: str | None = None) -> Path:
    import gguf

    arch = arch_name or config.architecture.value
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    if config.sliding_window is not None:
        w.add_sliding_window(config.sliding_window)
    if config.attn_logit_softcap is not None:
        w.add_attn_logit_softcapping(config.attn_logit_softcap)
    if config.final_logit_softcap is not None:
        w.add_final_logit_softcapping(config.final_logit_softcap)
    if config.rope_scaling_factor != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scaling_factor)
    if tokenizer is not None:
        tokens, scores, types = tokenizer
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(False)
    q = gguf.GGMLQuantizationType[qtype]
    for name, value in weights.items():
        data = np.asarray(value, np.float32)
        if name.endswith("norm.weight"):
            data = data + np.float32(1.0)
        if data.ndim == 1 or q is gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name, config.architecture), data)
        elif q is gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name(name, config.architecture), data.astype(np.float16))
        else:
            packed = gguf.quants.quantize(data, q)
            w.add_tensor(gguf_name(name, config.architecture), packed, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
