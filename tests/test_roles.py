"""Weight roles, the layout table's role column: every role resolves to the name each generation
uses (the Gemma 1 norm quirk included), names map back to their roles, fused names, quantisation
overrides by role, the GGUF reader and writer agree through roles, and lookups outside the
layout fail clearly."""

from __future__ import annotations

import re

import pytest

from gemma_core.config import Architecture
from gemma_core.errors import ConfigError
from gemma_core.graph import TASKS, build_graph, fuse_projections
from gemma_core.layout import (
    LAYOUT,
    NORMS,
    ROLES,
    format_layout,
    fused_name,
    fused_parts,
    has_role,
    iter_params,
    param_name,
    role_of,
    roles_of,
)
from gemma_core.presets import PRESETS
from gemma_core.quant import MODULE_ROLES, PROJECTIONS, QuantConfig

TINY = ("tiny-gemma", "tiny-gemma2", "tiny-gemma3")
L3 = "model.layers.3."
# every role's name in layer 3 (or globally), per generation; None: the generation has none
EXPECTED = {
    "embedding": ("model.embed_tokens.weight",) * 3,
    "pre_attn_norm": (L3 + "input_layernorm.weight",) * 3,
    "q": (L3 + "self_attn.q_proj.weight",) * 3,
    "k": (L3 + "self_attn.k_proj.weight",) * 3,
    "v": (L3 + "self_attn.v_proj.weight",) * 3,
    "q_norm": (None, None, L3 + "self_attn.q_norm.weight"),
    "k_norm": (None, None, L3 + "self_attn.k_norm.weight"),
    "o": (L3 + "self_attn.o_proj.weight",) * 3,
    "post_attn_norm": (None, L3 + "post_attention_layernorm.weight", L3 + "post_attention_layernorm.weight"),
    "pre_mlp_norm": (L3 + "post_attention_layernorm.weight", L3 + "pre_feedforward_layernorm.weight",
                     L3 + "pre_feedforward_layernorm.weight"),
    "post_mlp_norm": (None, L3 + "post_feedforward_layernorm.weight",
                      L3 + "post_feedforward_layernorm.weight"),
    "gate": (L3 + "mlp.gate_proj.weight",) * 3,
    "up": (L3 + "mlp.up_proj.weight",) * 3,
    "down": (L3 + "mlp.down_proj.weight",) * 3,
    "final_norm": ("model.norm.weight",) * 3,
    "lm_head": ("lm_head.weight",) * 3,  # untied configs
    "score": ("score.weight",) * 3,
    "score_bias": ("score.bias",) * 3,
}
GENERATIONS = {"gemma-7b": 0, "gemma-2-9b": 1, "gemma-3-1b": 2}  # one published preset each


def test_the_roles_are_the_documented_ones() -> None:
    assert set(ROLES) == set(EXPECTED)
    assert {row.role for row in LAYOUT} == set(ROLES)
    norms = {"pre_attn_norm", "q_norm", "k_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm",
             "final_norm"}
    assert norms == NORMS


@pytest.mark.parametrize("preset", list(GENERATIONS))
@pytest.mark.parametrize("role", list(EXPECTED))
def test_every_role_resolves_per_generation(preset: str, role: str) -> None:
    config = PRESETS[preset].replace(tie_word_embeddings=False)
    want = EXPECTED[role][GENERATIONS[preset]]
    layer = 3 if want is not None and want.startswith("model.layers.") else None
    if want is None:
        assert not has_role(config, role)
        with pytest.raises(ConfigError, match=rf"weight role '{role}': {config.architecture.value} has no"):
            param_name(config, role, 3)
        return
    assert has_role(config, role)
    assert param_name(config, role, layer) == want
    assert role_of(want, config) == (role, layer)


def test_the_gemma_1_norm_quirk() -> None:
    g1, g2 = PRESETS["tiny-gemma"], PRESETS["tiny-gemma2"]
    name = "model.layers.1.post_attention_layernorm.weight"
    assert param_name(g1, "pre_mlp_norm", 1) == name
    assert param_name(g2, "post_attn_norm", 1) == name
    assert param_name(g2, "pre_mlp_norm", 1) == "model.layers.1.pre_feedforward_layernorm.weight"
    assert role_of(name, g1) == ("pre_mlp_norm", 1)
    assert role_of(name, g2) == ("post_attn_norm", 1)
    assert roles_of(name) == {"pre_mlp_norm", "post_attn_norm"}
    with pytest.raises(ConfigError, match=r"post_attn_norm or pre_mlp_norm\); pass the config"):
        role_of(name)
    assert [row.role for row in LAYOUT if row.name.endswith("post_attention_layernorm.weight")] == [
        "pre_mlp_norm", "post_attn_norm"]


@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_role_of_round_trips_over_the_layout(preset: str, untied: bool) -> None:
    config = PRESETS[preset].replace(tie_word_embeddings=not untied)
    for task in TASKS:
        names = []
        for name, _, row in iter_params(config, task, num_labels=3):
            found = role_of(name, config)
            assert found is not None, name
            role, layer = found
            assert role == row.role, name
            assert (layer is not None) == row.per_layer, name
            assert param_name(config, role, layer, task) == name
            names.append(name)
        assert len(names) == len(set(names))  # each tensor once


def test_the_graph_reads_the_norms_by_role() -> None:
    want = {
        "tiny-gemma": ["input_layernorm", "post_attention_layernorm"],
        "tiny-gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                        "post_feedforward_layernorm"],
        "tiny-gemma3": ["input_layernorm", "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm",
                        "pre_feedforward_layernorm", "post_feedforward_layernorm"],
    }
    for preset, norms in want.items():
        ops = [op for op in build_graph(PRESETS[preset]).ops if op.kind == "rms_norm" and op.layer == 1]
        assert [op.params[0] for op in ops] == [f"model.layers.1.{n}.weight" for n in norms]


def test_fused_names_resolve_to_their_parts() -> None:
    config = PRESETS["tiny-gemma3"]
    shapes = {name: shape for name, shape, _ in iter_params(config)}
    _, groups = fuse_projections(build_graph(config), shapes)
    assert groups["model.layers.2.self_attn.{q,k,v}_proj.weight"] == tuple(
        param_name(config, r, 2) for r in ("q", "k", "v"))
    assert groups["model.layers.2.mlp.{gate,up}_proj.weight"] == tuple(
        param_name(config, r, 2) for r in ("gate", "up"))
    assert len(groups) == 2 * config.num_layers
    for name, parts in groups.items():
        assert fused_parts(name) == parts
        assert fused_name(parts) == name
        assert role_of(name) is None  # not a table name: read it through its parts
        found = [role_of(p) for p in parts]
        assert roles_of(name) == {f[0] for f in found if f is not None} and None not in found
    assert fused_parts("model.norm.weight") == ("model.norm.weight",)


@pytest.mark.parametrize("names", [
    ["model.layers.0.self_attn.q_proj.weight"],
    ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"],
    ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"],
    ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.x_proj.weight"],
])
def test_fused_name_refuses_what_is_not_one_layers_tensors(names: list[str]) -> None:
    with pytest.raises(ValueError, match="fused_name: expected two or more distinct tensors of one layer"):
        fused_name(names)


def test_quantisation_overrides_by_role() -> None:
    quant = QuantConfig("int4", modules={"v_proj": "int8", "down_proj": "float"})
    for preset in TINY:
        config = PRESETS[preset].replace(tie_word_embeddings=False)
        for name, _, row in iter_params(config, "causal-lm"):
            want = {"v": "int8", "down": None, "q": "int4", "k": "int4", "o": "int4", "gate": "int4",
                    "up": "int4", "embedding": "int8", "lm_head": "int8"}.get(row.role)
            assert quant.scheme_for(name) == want, name
            assert quant.role_scheme(row.role) == want
    assert quant.scheme_for("model.layers.0.mlp.{gate,up}_proj.weight") == "int4"
    with pytest.raises(ConfigError, match=r"fused projections in different schemes \['int4', 'int8'\]"):
        quant.scheme_for("model.layers.0.self_attn.{q,k,v}_proj.weight")
    assert quant.scheme_for("model.layers.0.self_attn.v_proj.weight_scale") is None
    assert quant.scheme_for("model.layers.0.self_attn.x_proj.weight") is None


def test_module_names_are_the_layouts() -> None:
    config = PRESETS["tiny-gemma3"]
    assert PROJECTIONS == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for module, role in MODULE_ROLES.items():
        assert param_name(config, role, 0).split(".")[-2] == module


def test_unknown_roles_and_names() -> None:
    config = PRESETS["tiny-gemma"]
    with pytest.raises(ConfigError, match=r"unknown role 'qkv' \(known: embedding, pre_attn_norm, q,"):
        param_name(config, "qkv", 0)
    with pytest.raises(ConfigError, match="unknown role 'qkv'"):
        has_role(config, "qkv")
    with pytest.raises(ConfigError, match=r"'q': layer must be in 0\.\.1, got None"):
        param_name(config, "q")
    with pytest.raises(ConfigError, match=r"'q': layer must be in 0\.\.1, got 2"):
        param_name(config, "q", 2)
    with pytest.raises(ConfigError, match=r"'embedding': not per layer; got layer=0"):
        param_name(config, "embedding", 0)
    with pytest.raises(ConfigError, match="'lm_head': gemma has no such tensor"):
        param_name(config, "lm_head")  # tied
    for name in ("model.layers.0.foo.weight", "model.layers.01.self_attn.q_proj.weight",
                 "model.layers.x.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight_scale",
                 "layers.0.self_attn.q_proj.weight", "model.embed_tokens"):
        assert role_of(name) is None, name
        assert roles_of(name) == frozenset(), name
    assert role_of("model.layers.0.self_attn.q_norm.weight", config) is None  # not in Gemma 1
    assert role_of("model.layers.0.self_attn.q_norm.weight") == ("q_norm", 0)
    assert role_of("model.layers.40.self_attn.q_proj.weight", config) == ("q", 40)  # layers not bounded


@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("preset", TINY)
def test_format_layout_lists_each_row_with_its_role(preset: str, untied: bool) -> None:
    config = PRESETS[preset].replace(tie_word_embeddings=not untied)
    rows = list(dict.fromkeys(row for _, _, row in iter_params(config)))  # the rows that hold
    lines = format_layout(config).splitlines()
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows, strict=True):
        assert re.match(rf"{re.escape(row.name)}\s+{row.role}\s+\[", line), line


@pytest.mark.parametrize("preset", TINY)
def test_the_gguf_reader_and_writer_agree_through_roles(preset: str) -> None:
    from gemma_core.formats.gguf import canonical_name
    from gemma_core.formats.gguf_write import TABLE
    from gemma_core.formats.mapping import _instances

    config = PRESETS[preset].replace(tie_word_embeddings=False)
    pairs = list(_instances(TABLE, config))
    assert len(pairs) == len(list(iter_params(config)))
    for key, sources, _ in pairs:
        assert canonical_name(key, config) == sources[0]
        assert canonical_name(key, config.architecture) == sources[0]  # a bare generation
    assert canonical_name("blk.0.attn_q_norm.weight", Architecture.GEMMA2) is None
    assert canonical_name("blk.0.post_attention_norm.weight", Architecture.GEMMA) is None
    assert canonical_name("blk.0.ffn_norm.weight", Architecture.GEMMA) == (
        "model.layers.0.post_attention_layernorm.weight")


def test_sharding_specs_by_role() -> None:
    pytest.importorskip("jax")
    from jax.sharding import PartitionSpec

    from backends.jax.sharding import weight_spec

    config = PRESETS["tiny-gemma3"].replace(tie_word_embeddings=False)
    for name, _, row in iter_params(config):
        want = (PartitionSpec("tp", None) if row.role in ("q", "k", "v", "gate", "up")
                else PartitionSpec(None, "tp") if row.role in ("o", "down") else PartitionSpec())
        assert weight_spec(name, "tp") == want, name
    assert weight_spec("model.layers.0.self_attn.{q,k,v}_proj.weight", "tp") == PartitionSpec()
    assert weight_spec("model.layers.0.mlp.down_proj.weight_scale", "tp") == PartitionSpec()
