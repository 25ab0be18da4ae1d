"""GemmaConfig: presets against published sizes, layer patterns, RoPE, HF config.json I/O, validation."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from typing import Any

import pytest

from gemma_core.checkpoint import read_config
from gemma_core.config import Architecture, AttentionKind, GemmaConfig
from gemma_core.errors import ConfigError
from gemma_core.layout import param_count
from gemma_core.presets import PRESETS, PUBLISHED_PARAMS

LOCAL, GLOBAL = AttentionKind.LOCAL, AttentionKind.GLOBAL
HF_ROUND_TRIP = ("tiny-gemma", "tiny-gemma2", "tiny-gemma3", "gemma-3-4b")


def global_layers(config: GemmaConfig) -> list[int]:
    return [i for i, kind in enumerate(config.layer_types) if kind is GLOBAL]


# ---- presets against published parameter counts ---------------------------------------------


@pytest.mark.parametrize("name", sorted(set(PRESETS) & set(PUBLISHED_PARAMS)))
def test_param_count_matches_published(name: str) -> None:
    assert param_count(PRESETS[name]) == PUBLISHED_PARAMS[name]


def test_every_published_count_names_a_preset() -> None:
    assert set(PUBLISHED_PARAMS) <= set(PRESETS)
    assert len(PUBLISHED_PARAMS) == 10


# ---- layer patterns, RoPE, query scale ----------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma-2b", "gemma-7b", "tiny-gemma"])
def test_gemma1_layers_are_all_global(name: str) -> None:
    config = PRESETS[name]
    assert len(config.layer_types) == config.num_layers
    assert set(config.layer_types) == {GLOBAL}
    assert config.window(0) is None
    assert config.sliding_window is None


@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-2-9b", "gemma-2-27b", "tiny-gemma2"])
def test_gemma2_alternates_starting_local(name: str) -> None:
    config = PRESETS[name]
    assert len(config.layer_types) == config.num_layers
    assert config.is_local(0)
    assert not config.is_local(1)
    assert config.layer_types == tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(config.num_layers))
    assert config.window(0) == config.sliding_window
    assert config.window(1) is None


def test_gemma3_five_local_then_one_global() -> None:
    config = PRESETS["gemma-3-270m"]
    assert config.num_layers == 18
    assert global_layers(config) == [5, 11, 17]
    assert config.layer_types[:6] == (LOCAL,) * 5 + (GLOBAL,)


@pytest.mark.parametrize("name", ["gemma-3-1b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b", "tiny-gemma3"])
def test_gemma3_presets_follow_period_six(name: str) -> None:
    config = PRESETS[name]
    assert global_layers(config) == list(range(5, config.num_layers, 6))


def test_gemma3_rope_local_and_global() -> None:
    config = PRESETS["gemma-3-4b"]
    assert config.rope(0) == (10_000.0, 1.0)
    assert config.rope(4) == (10_000.0, 1.0)
    assert config.rope(5) == (1_000_000.0, 8.0)
    assert config.rope(11) == (1_000_000.0, 8.0)
    # the local theta is its own field, not a constant
    changed = config.replace(rope_local_theta=20_000.0)
    assert changed.rope(0) == (20_000.0, 1.0)
    assert changed.rope(5) == (1_000_000.0, 8.0)


@pytest.mark.parametrize("name", ["gemma-2b", "tiny-gemma", "gemma-2-9b", "tiny-gemma2"])
def test_gemma1_and_2_use_rope_theta_everywhere(name: str) -> None:
    # a local theta and a scaling factor that Gemma 3 would treat per layer kind
    config = PRESETS[name].replace(rope_theta=50_000.0, rope_local_theta=777.0, rope_scaling_factor=2.0)
    for layer in range(config.num_layers):
        assert config.rope(layer) == (50_000.0, 2.0)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gemma-2-27b", 144**-0.5),
        ("gemma-3-27b", 168**-0.5),
        ("gemma-2-2b", 256**-0.5),
        ("tiny-gemma2", 20**-0.5),
        ("gemma-2b", 256**-0.5),
        ("tiny-gemma", 24**-0.5),
    ],
)
def test_query_scale(name: str, expected: float) -> None:
    assert PRESETS[name].query_scale == pytest.approx(expected, rel=1e-12)


def test_query_scale_gemma1_follows_head_dim() -> None:
    config = PRESETS["tiny-gemma"]
    assert config.query_pre_attn_scalar is None
    assert config.replace(head_dim=32).query_scale == pytest.approx(32**-0.5, rel=1e-12)


# ---- Hugging Face round trip against transformers ------------------------------------------------


@pytest.fixture(scope="module")
def hf_classes() -> dict[str, Any]:
    transformers = pytest.importorskip("transformers")
    return {
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
        "gemma3_text": transformers.Gemma3TextConfig,
        "auto": transformers.AutoConfig,
        "gemma3": transformers.Gemma3Config,
    }


@pytest.mark.transformers
@pytest.mark.parametrize("name", HF_ROUND_TRIP)
def test_hf_round_trip_auto_config(name: str, hf_classes: dict[str, Any]) -> None:
    config = PRESETS[name]
    hf = config.to_hf()
    hf_config = hf_classes["auto"].for_model(**hf)
    assert type(hf_config) is hf_classes[hf["model_type"]]
    assert GemmaConfig.from_hf(hf_config.to_dict()) == config


@pytest.mark.transformers
@pytest.mark.parametrize("name", HF_ROUND_TRIP)
def test_hf_round_trip_specific_class(name: str, hf_classes: dict[str, Any]) -> None:
    config = PRESETS[name]
    hf = config.to_hf()
    cls = hf_classes[hf.pop("model_type")]
    hf_config = cls(**hf)
    assert GemmaConfig.from_hf(hf_config.to_dict()) == config
    # what transformers parsed agrees with us field by field
    assert hf_config.vocab_size == config.vocab_size
    assert hf_config.hidden_size == config.hidden_size
    assert hf_config.intermediate_size == config.intermediate_size
    assert hf_config.num_hidden_layers == config.num_layers
    assert hf_config.num_attention_heads == config.num_heads
    assert hf_config.num_key_value_heads == config.num_kv_heads
    assert hf_config.head_dim == config.head_dim
    assert hf_config.rms_norm_eps == config.rms_norm_eps
    assert hf_config.hidden_activation == "gelu_pytorch_tanh"
    assert hf_config.tie_word_embeddings is config.tie_word_embeddings
    eos = hf_config.eos_token_id
    assert tuple(eos if isinstance(eos, list) else [eos]) == config.eos_token_ids
    if config.architecture is Architecture.GEMMA:
        assert hf_config.rope_parameters == {"rope_type": "default", "rope_theta": config.rope_theta}
        return
    assert hf_config.layer_types == [kind.value for kind in config.layer_types]
    assert hf_config.sliding_window == config.sliding_window
    assert hf_config.query_pre_attn_scalar == config.query_pre_attn_scalar
    assert hf_config.final_logit_softcapping == config.final_logit_softcap
    if config.architecture is Architecture.GEMMA2:
        assert hf_config.attn_logit_softcapping == config.attn_logit_softcap
        assert hf_config.rope_parameters["rope_theta"] == config.rope_theta
        return
    full = hf_config.rope_parameters["full_attention"]
    sliding = hf_config.rope_parameters["sliding_attention"]
    assert full["rope_theta"] == config.rope(5)[0] == 1_000_000.0
    assert (full["rope_type"], full["factor"]) == ("linear", config.rope_scaling_factor)
    assert config.rope_scaling_factor == 8.0
    assert sliding == {"rope_type": "default", "rope_theta": config.rope_local_theta}


@pytest.mark.transformers
@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_read_config_of_transformers_save_pretrained(name: str, hf_classes: dict[str, Any], tmp_path) -> None:
    config = PRESETS[name]
    hf_classes["auto"].for_model(**config.to_hf()).save_pretrained(tmp_path)
    assert read_config(tmp_path) == config


@pytest.mark.transformers
def test_hf_multimodal_config_from_transformers(hf_classes: dict[str, Any]) -> None:
    config = PRESETS["tiny-gemma3"]
    text = hf_classes["gemma3_text"](**{k: v for k, v in config.to_hf().items() if k != "model_type"})
    multimodal = hf_classes["gemma3"](text_config=text).to_dict()
    assert multimodal["model_type"] == "gemma3"
    assert GemmaConfig.from_hf(multimodal) == config


# ---- from_hf on hand-written config.json dicts ---------------------------------------------


def gemma1_hub() -> dict[str, Any]:
    """gemma-2b's config.json as published (transformers 4.38 era)."""
    return {
        "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 16384, "max_position_embeddings": 8192, "num_attention_heads": 8,
        "num_hidden_layers": 18, "num_key_value_heads": 1, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 256000,
    }


def gemma2_hub() -> dict[str, Any]:
    """gemma-2-2b's config.json as published."""
    return {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attention_bias": False,
        "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
        "eos_token_id": [1, 107], "final_logit_softcapping": 30.0, "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
        "intermediate_size": 9216, "max_position_embeddings": 8192, "num_attention_heads": 8,
        "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
        "sliding_window": 4096, "vocab_size": 256000,
    }


def gemma3_hub() -> dict[str, Any]:
    """gemma-3-1b's config.json as published (sliding_window_pattern, no layer_types)."""
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
        "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": [1, 106],
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "vocab_size": 262144,
    }


def test_from_hf_gemma1_legacy_gelu_is_tanh_gelu() -> None:
    hf = gemma1_hub()
    assert hf["hidden_act"] == "gelu"
    assert GemmaConfig.from_hf(hf) == PRESETS["gemma-2b"]


@pytest.mark.parametrize("key", ["hidden_act", "hidden_activation"])
def test_from_hf_rejects_other_activations(key: str) -> None:
    hf = {**gemma1_hub(), key: "relu"}
    with pytest.raises(ConfigError, match=key) as excinfo:
        GemmaConfig.from_hf(hf)
    assert "'relu'" in str(excinfo.value)


def test_from_hf_gemma2_hub_config() -> None:
    config = GemmaConfig.from_hf(gemma2_hub())
    assert config == PRESETS["gemma-2-2b"]
    assert config.eos_token_ids == (1, 107)
    assert config.attn_logit_softcap == 50.0


def test_from_hf_gemma3_hub_config() -> None:
    config = GemmaConfig.from_hf(gemma3_hub())
    assert config == PRESETS["gemma-3-1b"]


@pytest.mark.parametrize(("period", "expected"), [(6, [5, 11, 17, 23]), (3, [2, 5, 8, 11, 14, 17, 20, 23])])
def test_from_hf_sliding_window_pattern(period: int, expected: list[int]) -> None:
    hf = {**gemma3_hub(), "sliding_window_pattern": period}
    assert "layer_types" not in hf
    config = GemmaConfig.from_hf(hf)
    assert len(config.layer_types) == 26
    assert global_layers(config) == expected


def test_from_hf_layer_types_win_over_pattern() -> None:
    layer_types = ["full_attention"] * 2 + ["sliding_attention"] * 24
    config = GemmaConfig.from_hf({**gemma3_hub(), "layer_types": layer_types})
    assert global_layers(config) == [0, 1]


def test_from_hf_legacy_rope_scaling_and_local_base_freq() -> None:
    hf = {**gemma3_hub(), "rope_scaling": {"rope_type": "linear", "factor": 8.0},
          "rope_local_base_freq": 20000.0, "rope_theta": 500000.0}
    config = GemmaConfig.from_hf(hf)
    assert config.rope_scaling_factor == 8.0
    assert config.rope(0) == (20_000.0, 1.0)
    assert config.rope(5) == (500_000.0, 8.0)


def test_from_hf_legacy_rope_scaling_old_type_key() -> None:
    hf = {**gemma3_hub(), "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert GemmaConfig.from_hf(hf).rope(5) == (1_000_000.0, 4.0)


def test_from_hf_v5_rope_parameters_per_layer_kind() -> None:
    hf = gemma3_hub()
    for key in ("rope_theta", "rope_local_base_freq", "rope_scaling"):
        del hf[key]
    hf["rope_parameters"] = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 2_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 15_000.0},
    }
    config = GemmaConfig.from_hf(hf)
    assert config.rope_theta == 2_000_000.0
    assert config.rope_local_theta == 15_000.0
    assert config.rope(0) == (15_000.0, 1.0)
    assert config.rope(5) == (2_000_000.0, 8.0)


def test_from_hf_v5_rope_parameters_flat() -> None:
    hf = {**gemma2_hub(), "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}
    del hf["rope_theta"]
    config = GemmaConfig.from_hf(hf)
    assert config.rope(0) == (5000.0, 1.0)
    assert config.rope(1) == (5000.0, 1.0)


def test_from_hf_scaled_sliding_attention_rejected() -> None:
    hf = {**gemma3_hub(), "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
    }}
    with pytest.raises(ConfigError, match="sliding_attention"):
        GemmaConfig.from_hf(hf)


def test_from_hf_multimodal_gemma3_uses_text_config() -> None:
    text = gemma3_hub()
    del text["eos_token_id"]
    del text["architectures"]
    hf = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "eos_token_id": [1, 106], "image_token_index": 262144, "mm_tokens_per_image": 256,
        "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "num_hidden_layers": 27},
    }
    config = GemmaConfig.from_hf(hf)
    assert config == PRESETS["gemma-3-1b"]
    assert config.eos_token_ids == (1, 106)  # inherited from the outer config


def test_from_hf_multimodal_without_text_config() -> None:
    with pytest.raises(ConfigError, match="text_config"):
        GemmaConfig.from_hf({"model_type": "gemma3", "vision_config": {}})


@pytest.mark.parametrize(("eos", "expected"), [([1, 107], (1, 107)), (1, (1,)), ([7], (7,))])
def test_from_hf_eos_token_id_list_or_int(eos: Any, expected: tuple[int, ...]) -> None:
    config = GemmaConfig.from_hf({**gemma2_hub(), "eos_token_id": eos})
    assert config.eos_token_ids == expected


def test_from_hf_gemma3_attn_softcap_dropped_with_warning() -> None:
    hf = {**gemma3_hub(), "attn_logit_softcapping": 50}
    with pytest.warns(UserWarning, match="attn_logit_softcapping=50"):
        config = GemmaConfig.from_hf(hf)
    assert config.attn_logit_softcap is None
    assert config == PRESETS["gemma-3-1b"]


def test_from_hf_gemma2_attn_softcap_kept_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = GemmaConfig.from_hf({**gemma2_hub(), "attn_logit_softcapping": 40.0})
    assert config.attn_logit_softcap == 40.0


@pytest.mark.parametrize("where", ["rope_scaling", "rope_parameters"])
def test_from_hf_yarn_rejected(where: str) -> None:
    entry = {"rope_type": "yarn", "factor": 4.0}
    hf = gemma3_hub()
    hf[where] = entry if where == "rope_scaling" else {"full_attention": entry}
    with pytest.raises(ConfigError, match="yarn") as excinfo:
        GemmaConfig.from_hf(hf)
    assert where in str(excinfo.value)


def test_from_hf_unknown_model_type_lists_supported() -> None:
    with pytest.raises(ConfigError) as excinfo:
        GemmaConfig.from_hf({**gemma2_hub(), "model_type": "llama"})
    message = str(excinfo.value)
    assert "model_type" in message
    assert "'llama'" in message
    for supported in ("gemma", "gemma2", "gemma3_text", "gemma3"):
        assert supported in message.split("supported:")[1]


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "num_hidden_layers", "head_dim",
                                 "attn_logit_softcapping", "sliding_window", "query_pre_attn_scalar"])
@pytest.mark.parametrize("hub", ["gemma2", "gemma3"])
def test_from_hf_missing_field_takes_transformers_default(key: str, hub: str) -> None:
    """A key left out of config.json means transformers' class default (multimodal hub configs
    rely on that), so we parse incomplete configs exactly as transformers does."""
    transformers = pytest.importorskip("transformers")
    hf = gemma2_hub() if hub == "gemma2" else gemma3_hub()
    del hf[key]
    cls = transformers.Gemma2Config if hub == "gemma2" else transformers.Gemma3TextConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = GemmaConfig.from_hf(cls(**hf).to_dict())
    assert GemmaConfig.from_hf(hf) == expected


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "head_dim"])
def test_from_hf_explicit_null_is_rejected(key: str) -> None:
    hf = {**gemma2_hub(), key: None}
    with pytest.raises(ConfigError, match="must be a positive integer, got None"):
        GemmaConfig.from_hf(hf)


@pytest.mark.parametrize(
    ("change", "needle"),
    [({"attention_bias": True}, "attention_bias"),
     ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
     ({"vocab_size": "big"}, "vocab_size")],
)
def test_from_hf_rejects_unsupported(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        GemmaConfig.from_hf({**gemma2_hub(), **change})


def test_from_hf_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError, match="expected an object"):
        GemmaConfig.from_hf(json.loads("[1, 2]"))


def test_to_hf_is_json_serialisable() -> None:
    for name in HF_ROUND_TRIP:
        text = json.dumps(PRESETS[name].to_hf())
        assert GemmaConfig.from_hf(json.loads(text)) == PRESETS[name]


# ---- validation ---------------------------------------------------------------------------------

BASE_KWARGS: dict[str, Any] = {
    "architecture": Architecture.GEMMA2, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96,
    "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "head_dim": 24, "sliding_window": 8,
}


def test_base_kwargs_are_valid() -> None:
    config = GemmaConfig(**BASE_KWARGS)
    assert config.layer_types == (LOCAL, GLOBAL, LOCAL, GLOBAL)
    assert config.architecture is Architecture.GEMMA2


def test_architecture_accepts_its_string() -> None:
    config = GemmaConfig(**{**BASE_KWARGS, "architecture": "gemma2", "layer_types": ["sliding_attention",
                                                                                      "full_attention"] * 2})
    assert config == GemmaConfig(**BASE_KWARGS)
    assert isinstance(config.layer_types, tuple)


@pytest.mark.parametrize(
    ("preset", "field", "value", "needles"),
    [
        ("tiny-gemma2", "hidden_size", 0, ["hidden_size", "0"]),
        ("tiny-gemma2", "num_layers", -3, ["num_layers", "-3"]),
        ("tiny-gemma2", "num_kv_heads", 3, ["num_kv_heads", "3", "num_heads 4"]),
        ("tiny-gemma2", "head_dim", 25, ["head_dim", "25"]),
        ("tiny-gemma3", "layer_types", (LOCAL,) * 5, ["layer_types", "5 entries", "num_layers 6"]),
        ("tiny-gemma3", "layer_types", ("sliding_attention", "chunked") * 3, ["layer_types", "'chunked'"]),
        ("tiny-gemma3", "sliding_window", None, ["sliding_window", "None"]),
        ("tiny-gemma3", "sliding_window", 0, ["sliding_window", "0"]),
        ("tiny-gemma2", "rms_norm_eps", -1, ["rms_norm_eps", "-1"]),
        ("tiny-gemma2", "rope_theta", float("nan"), ["rope_theta", "nan"]),
        ("tiny-gemma3", "rope_scaling_factor", float("inf"), ["rope_scaling_factor", "inf"]),
        ("tiny-gemma2", "final_logit_softcap", 0.0, ["final_logit_softcap", "0.0"]),
        ("tiny-gemma2", "bos_token_id", 512, ["bos_token_id", "512", "[0, 512)"]),
        ("tiny-gemma2", "pad_token_id", -1, ["pad_token_id", "-1"]),
        ("tiny-gemma2", "eos_token_ids", (1, 9999), ["eos_token_ids", "9999"]),
        ("tiny-gemma3", "attn_logit_softcap", 50.0, ["attn_logit_softcap", "50.0"]),
        ("tiny-gemma2", "vocab_size", "big", ["vocab_size", "'big'"]),
        ("tiny-gemma2", "max_position_embeddings", True, ["max_position_embeddings", "True"]),
        ("tiny-gemma2", "architecture", "gemma4", ["architecture", "'gemma4'"]),
    ],
)
def test_invalid_value_names_field_and_value(preset: str, field: str, value: Any,
                                             needles: list[str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        PRESETS[preset].replace(**{field: value})
    message = str(excinfo.value)
    assert message.startswith(field)
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", 0), ("num_kv_heads", 3), ("head_dim", 7), ("rms_norm_eps", -1.0),
     ("rope_theta", float("nan")), ("bos_token_id", 512), ("vocab_size", "big")],
)
def test_invalid_value_through_constructor(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: .*{value!r}"):
        GemmaConfig(**{**BASE_KWARGS, field: value})


def test_gemma1_rejects_sliding_layers() -> None:
    with pytest.raises(ConfigError, match="layer_types: Gemma 1"):
        PRESETS["tiny-gemma"].replace(layer_types=(LOCAL, GLOBAL), sliding_window=8)


@pytest.mark.parametrize("value", [2.5, "4"])
def test_non_integer_num_layers_raises_config_error(value: Any) -> None:
    with pytest.raises(ConfigError, match="num_layers"):
        PRESETS["tiny-gemma"].replace(num_layers=value)


# ---- immutability and replace -------------------------------------------------------------------


def test_config_is_frozen() -> None:
    config = PRESETS["tiny-gemma3"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_layers = 12  # type: ignore[misc]
    assert config.num_layers == 6


def test_replace_num_layers_rederives_layer_types() -> None:
    config = PRESETS["tiny-gemma3"].replace(num_layers=12)
    assert config.num_layers == 12
    assert len(config.layer_types) == 12
    assert global_layers(config) == [5, 11]
    assert PRESETS["tiny-gemma3"].num_layers == 6  # the preset is untouched
    shorter = PRESETS["gemma-2-2b"].replace(num_layers=3)
    assert shorter.layer_types == (LOCAL, GLOBAL, LOCAL)


def test_replace_keeps_explicit_layer_types() -> None:
    custom = (GLOBAL, LOCAL, LOCAL, GLOBAL)
    config = PRESETS["tiny-gemma3"].replace(num_layers=4, layer_types=custom)
    assert config.layer_types == custom
    # other changes keep the pattern as it is
    assert config.replace(hidden_size=32).layer_types == custom


def test_derived_properties() -> None:
    g1, g2, g3 = PRESETS["tiny-gemma"], PRESETS["tiny-gemma2"], PRESETS["tiny-gemma3"]
    assert (g1.has_sandwich_norms, g2.has_sandwich_norms, g3.has_sandwich_norms) == (False, True, True)
    assert (g1.has_qk_norm, g2.has_qk_norm, g3.has_qk_norm) == (False, False, True)
    assert g1.queries_per_kv == 4
    assert g2.queries_per_kv == 2
    assert g3.embed_scale == pytest.approx(math.sqrt(48))


def test_whole_query_pre_attn_scalar_is_written_as_an_int() -> None:
    """A GGUF stores it as float32; transformers' config types it int and refuses 256.0."""
    from gemma_core.presets import get_preset

    config = get_preset("tiny-gemma3").replace(query_pre_attn_scalar=16.0)
    value = config.to_hf()["query_pre_attn_scalar"]
    assert value == 16 and isinstance(value, int)
    half = get_preset("tiny-gemma3").replace(query_pre_attn_scalar=12.5)
    assert half.to_hf()["query_pre_attn_scalar"] == 12.5
