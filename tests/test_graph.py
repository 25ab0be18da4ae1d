"""The op list: vocabulary, structure per generation, and its printed form."""

from __future__ import annotations

from collections import Counter

import pytest

from backends.numpy import backend as numpy_backend
from gemma_core.graph import OP_KINDS, Op, build_graph, format_graph
from gemma_core.layout import expected_shapes
from gemma_core.presets import PRESETS, get_preset


def test_numpy_op_table_is_exactly_the_vocabulary() -> None:
    for dtype in numpy_backend.dtypes:
        assert set(numpy_backend.op_table(dtype)) == set(OP_KINDS)


def test_unknown_op_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown op kind 'conv'"):
        Op("conv", ("x",), ("y",))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_graph_reads_every_weight_once_per_use(name: str) -> None:
    config = get_preset(name)
    ops = build_graph(config)
    assert {op.kind for op in ops} <= set(OP_KINDS)
    used = Counter(p for op in ops for p in op.params)
    shapes = expected_shapes(config)
    assert set(used) == set(shapes)
    tied = "model.embed_tokens.weight"
    assert used[tied] == (2 if config.tie_word_embeddings else 1)  # embed + tied lm_head
    assert all(n == 1 for p, n in used.items() if p != tied)


def _layer_kinds(name: str, layer: int = 0) -> Counter[str]:
    return Counter(op.kind for op in build_graph(get_preset(name)) if op.layer == layer)


def test_norm_counts_per_generation() -> None:
    assert _layer_kinds("gemma-2b")["rms_norm"] == 2
    assert _layer_kinds("gemma-2-2b")["rms_norm"] == 4
    assert _layer_kinds("gemma-3-1b")["rms_norm"] == 6  # four + q/k norms


def test_softcaps_only_where_the_config_has_them() -> None:
    def caps(name: str) -> tuple[set[object], int]:
        ops = build_graph(get_preset(name))
        attn = {op.attrs["softcap"] for op in ops if op.kind == "attention"}
        return attn, sum(op.kind == "softcap" for op in ops)

    assert caps("gemma-2b") == ({None}, 0)
    assert caps("gemma-2-9b") == ({50.0}, 1)
    assert caps("gemma-3-4b") == ({None}, 0)


def test_gemma3_per_layer_rope_and_window() -> None:
    config = get_preset("gemma-3-4b")
    ops = build_graph(config)
    tables = {op.outputs[0]: (op.attrs["theta"], op.attrs["scaling"])
              for op in ops if op.kind == "rope_table"}
    assert sorted(tables.values()) == [(1e4, 1.0), (1e6, 8.0)]  # one table per distinct RoPE
    ropes = [op for op in ops if op.kind == "rope" and op.inputs[0] == "k"]
    attns = [op for op in ops if op.kind == "attention"]
    for layer, (rope, attn) in enumerate(zip(ropes, attns, strict=True)):
        if (layer + 1) % 6 == 0:
            assert tables[rope.inputs[1]] == (1e6, 8.0)
            assert attn.attrs["window"] is None
        else:
            assert tables[rope.inputs[1]] == (1e4, 1.0)
            assert attn.attrs["window"] == 1024


def test_query_scale_in_attention_ops() -> None:
    attn = next(op for op in build_graph(get_preset("gemma-2-27b")) if op.kind == "attention")
    assert attn.attrs["scale"] == pytest.approx(144 ** -0.5)
    attn = next(op for op in build_graph(get_preset("gemma-7b")) if op.kind == "attention")
    assert attn.attrs["scale"] == pytest.approx(256 ** -0.5)


def test_gemma1_norm_order_pre_mlp_is_post_attention_layernorm() -> None:
    ops = [op for op in build_graph(get_preset("gemma-2b")) if op.layer == 0]
    kinds = [(op.kind, op.params) for op in ops]
    add = kinds.index(("add", ()))
    assert kinds[add + 1] == ("rms_norm", ("model.layers.0.post_attention_layernorm.weight",))


def test_format_graph_is_readable() -> None:
    text = format_graph(get_preset("gemma-3-270m"))
    assert text.startswith("# gemma3: 18 layers")
    assert "layer 0 (local window=512, rope theta=10000 scaling=1)" in text
    assert "layer 5 (global, rope theta=1e+06 scaling=1)" in text
    assert "attention        q, keys, values, key_slots, query_slots, valid -> a" in text
    assert text.splitlines()[-1].strip().startswith("linear           h -> logits")
    assert "add              r, m -> x18" in text  # the residual stream after layer 17
