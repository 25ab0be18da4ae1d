"""Named model shapes: the published Gemma text models and tiny test models.

`PUBLISHED_PARAMS` holds the parameter counts the publishers state (keras-hub preset metadata,
`keras_hub/src/models/gemma*/gemma*_presets.py`), used by a test to check every preset's shape.
"""

from __future__ import annotations

from gemma_core.config import Architecture, AttentionKind, GemmaConfig
from gemma_core.errors import ConfigError

G1, G2, G3 = Architecture.GEMMA, Architecture.GEMMA2, Architecture.GEMMA3
_LOCAL, _GLOBAL = AttentionKind.LOCAL, AttentionKind.GLOBAL


def _g1(**kw: object) -> GemmaConfig:
    return GemmaConfig(architecture=G1, vocab_size=256_000, head_dim=256,
                       max_position_embeddings=8192, **kw)  # type: ignore[arg-type]


def _g2(**kw: object) -> GemmaConfig:
    return GemmaConfig(architecture=G2, vocab_size=256_000, max_position_embeddings=8192,
                       sliding_window=4096, attn_logit_softcap=50.0, final_logit_softcap=30.0,
                       eos_token_ids=(1, 107), **kw)  # type: ignore[arg-type]


def _g3(**kw: object) -> GemmaConfig:
    kw.setdefault("vocab_size", 262_144)
    kw.setdefault("head_dim", 256)
    kw.setdefault("query_pre_attn_scalar", 256)
    return GemmaConfig(architecture=G3, max_position_embeddings=131_072, rope_theta=1e6,
                       rope_local_theta=1e4, eos_token_ids=(1, 106), **kw)  # type: ignore[arg-type]


PRESETS: dict[str, GemmaConfig] = {
    "gemma-2b": _g1(hidden_size=2048, intermediate_size=16_384, num_layers=18, num_heads=8,
                    num_kv_heads=1),
    "gemma-7b": _g1(hidden_size=3072, intermediate_size=24_576, num_layers=28, num_heads=16,
                    num_kv_heads=16),
    "gemma-2-2b": _g2(hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8,
                      num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "gemma-2-9b": _g2(hidden_size=3584, intermediate_size=14_336, num_layers=42, num_heads=16,
                      num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "gemma-2-27b": _g2(hidden_size=4608, intermediate_size=36_864, num_layers=46, num_heads=32,
                       num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144),
    "gemma-3-270m": _g3(hidden_size=640, intermediate_size=2048, num_layers=18, num_heads=4,
                        num_kv_heads=1, sliding_window=512).replace(max_position_embeddings=32_768),
    "gemma-3-1b": _g3(hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4,
                      num_kv_heads=1, sliding_window=512).replace(max_position_embeddings=32_768),
    "gemma-3-4b": _g3(hidden_size=2560, intermediate_size=10_240, num_layers=34, num_heads=8,
                      num_kv_heads=4, sliding_window=1024, rope_scaling_factor=8.0),
    "gemma-3-12b": _g3(hidden_size=3840, intermediate_size=15_360, num_layers=48, num_heads=16,
                       num_kv_heads=8, sliding_window=1024, rope_scaling_factor=8.0),
    "gemma-3-27b": _g3(hidden_size=5376, intermediate_size=21_504, num_layers=62, num_heads=32,
                       num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168,
                       sliding_window=1024, rope_scaling_factor=8.0),
    # Tiny random-weight models for tests: N*H != D, MQA/GQA, query_pre_attn_scalar != head_dim
    # (tiny-gemma2), windows shorter than test prompts, Gemma 3 local/global RoPE with scaling.
    "tiny-gemma": _g1(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=1).replace(vocab_size=512, head_dim=24, max_position_embeddings=256),
    "tiny-gemma2": _g2(hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4,
                       num_kv_heads=2, head_dim=24, query_pre_attn_scalar=20,
                       ).replace(vocab_size=512, sliding_window=8, max_position_embeddings=256),
    "tiny-gemma3": _g3(hidden_size=48, intermediate_size=96, num_layers=6, num_heads=4,
                       num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16, vocab_size=512,
                       sliding_window=8, rope_scaling_factor=8.0).replace(max_position_embeddings=256),
}

# Published counts (keras-hub preset metadata): vocab 256000 (Gemma 1/2) and 262144 (Gemma 3 text).
PUBLISHED_PARAMS: dict[str, int] = {
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma-2-2b": 2_614_341_888,
    "gemma-2-9b": 9_241_705_984,
    "gemma-2-27b": 27_227_128_320,
    "gemma-3-270m": 268_098_176,
    "gemma-3-1b": 999_885_952,
    "gemma-3-4b": 3_880_099_328,
    "gemma-3-12b": 11_765_788_416,
    "gemma-3-27b": 27_009_002_240,
}


def get_preset(name: str) -> GemmaConfig:
    """The config of preset `name`; the error lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset: unknown name {name!r} (known: {', '.join(PRESETS)})") from None
