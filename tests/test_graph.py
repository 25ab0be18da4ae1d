"""The op list: vocabulary, structure per generation, and its printed form."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

import gemma_core
from backends.numpy import backend as numpy_backend
from backends.numpy.ops import make_op_table
from gemma_core.errors import ConfigError
from gemma_core.graph import (
    GRAPH_INPUTS,
    OP_KINDS,
    TASKS,
    Graph,
    GraphError,
    Op,
    bind,
    build_graph,
    format_graph,
    fuse_projections,
    run_bound,
)
from gemma_core.layout import expected_shapes, iter_params
from gemma_core.masks import layer_kinds
from gemma_core.presets import PRESETS, get_preset
from gemma_core.quant import SCALE_SUFFIX, QuantConfig
from gemma_core.step import step_inputs
from gemma_core.weights import random_weights


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
    caches = [op for op in ops if op.kind == "kv_cache"]
    for layer, (rope, attn, cache) in enumerate(zip(ropes, attns, caches, strict=True)):
        if (layer + 1) % 6 == 0:
            assert tables[rope.inputs[1]] == (1e6, 8.0)
            assert cache.attrs["window"] is None and attn.inputs[-1] == "bias[global]"
        else:
            assert tables[rope.inputs[1]] == (1e4, 1.0)
            assert cache.attrs["window"] == 1024 and attn.inputs[-1] == "bias[window=1024]"
    # one bias per layer kind, made once a step from the step's masks
    biases = [op for op in ops if op.kind == "attention_bias"]
    assert [(op.inputs, op.outputs) for op in biases] == [
        (("mask[window=1024]",), ("bias[window=1024]",)), (("mask[global]",), ("bias[global]",))]


def test_graph_without_a_cache_attends_over_the_new_keys() -> None:
    config = get_preset("tiny-gemma3")
    graph = build_graph(config, cache=False)
    assert not any(op.kind == "kv_cache" for op in graph)
    assert not any(name.startswith("cache.") for name in (*graph.inputs, *graph.outputs))
    attn = next(op for op in graph if op.kind == "attention")
    assert attn.inputs == ("q", "k", "v", "bias[window=8]")
    # the same logits as the cached step from an empty cache
    weights = random_weights(config, 0)
    ids = np.array([[0, 5, 6, 7, 8, 9, 10, 11, 12, 13]])  # longer than the window of 8
    mask = ids > 0
    env, _ = step_inputs(ids, mask, windows=layer_kinds(config))
    ours = run_bound(bind(graph, make_op_table("float32"), weights), env)["logits"]
    model = gemma_core.Model(config, weights)
    ref = model.forward(ids, mask).logits
    # real positions only: a pad query sees no key, its (uniform) output depends on the key count
    np.testing.assert_allclose(ours[mask], ref[mask], rtol=1e-5, atol=1e-5)


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
    assert "attention_bias   mask[window=512] -> bias[window=512]" in text
    assert "kv_cache         k, v, cache.0, query_slots -> keys, values, cache.0  window=512" in text
    assert "attention        q, keys, values, bias[window=512] -> a" in text
    assert "attention        q, keys, values, bias[global] -> a" in text
    assert text.splitlines()[-1].strip().startswith("linear           h -> logits")
    assert "add              r, m -> x18" in text  # the residual stream after layer 17


# A graph is verified when built: each error names the op (index, kind, layer) and the bad name.

def _tiny() -> Graph:
    return build_graph(get_preset("tiny-gemma"))


def _first(graph: Graph, kind: str, name: str | None = None) -> int:
    return next(i for i, op in enumerate(graph.ops)
                if op.kind == kind and (name is None or name in op.inputs))


def test_built_graph_declares_its_inputs_outputs_registers_and_params() -> None:
    config = get_preset("tiny-gemma")
    graph = build_graph(config)
    caches = ("cache.0", "cache.1")
    assert graph.inputs == (*GRAPH_INPUTS, "mask[global]", *caches)  # Gemma 1: global layers only
    assert graph.outputs == ("logits", *caches)
    assert {"x0", "x1", "x2", "q", "keys", "logits", *caches} <= set(graph.registers)
    assert not set(graph.registers) & set(GRAPH_INPUTS)
    assert sorted(graph.params) == sorted(expected_shapes(config))  # the tied table once
    assert list(graph) == list(graph.ops) and len(graph) == len(graph.ops)
    base = build_graph(config, "base")
    assert base.outputs == ("hidden", "x0", "x1", *caches)


def test_typo_in_an_op_input_fails_at_build_naming_the_op() -> None:
    graph = _tiny()
    i = _first(graph, "linear", "h")  # layer 0's q projection
    ops = list(graph.ops)
    ops[i] = dataclasses.replace(ops[i], inputs=("hh",))
    with pytest.raises(GraphError, match=rf"op {i} \(linear, layer 0\): reads 'hh', which is neither"):
        Graph(ops, graph.inputs, graph.outputs)


def test_missing_graph_input_fails_at_build_naming_the_first_reader() -> None:
    graph = _tiny()
    i = _first(graph, "kv_cache")
    inputs = tuple(n for n in graph.inputs if n != "query_slots")
    with pytest.raises(GraphError, match=rf"op {i} \(kv_cache, layer 0\): reads 'query_slots'"):
        Graph(graph.ops, inputs, graph.outputs)


def test_dead_output_fails_at_build_naming_the_writer() -> None:
    graph = _tiny()
    ops = list(graph.ops)
    ops.insert(1, Op("mul", ("x0", "x0"), ("unused",)))
    with pytest.raises(GraphError, match=r"op 1 \(mul\): writes 'unused', which no later op reads"):
        Graph(ops, graph.inputs, graph.outputs)
    # a value overwritten before anything reads it is dead too
    i = _first(graph, "rms_norm", "x0")
    ops = list(graph.ops)
    ops.insert(i, ops[i])
    with pytest.raises(GraphError, match=rf"op {i} \(rms_norm, layer 0\): writes 'h', which op {i + 1} "
                                         "overwrites before any op reads it"):
        Graph(ops, graph.inputs, graph.outputs)
    with pytest.raises(GraphError, match=r"output 'hidden' is written by no op"):
        Graph(graph.ops, graph.inputs, (*graph.outputs, "hidden"))


def test_unknown_op_kind_fails_at_build_naming_the_op() -> None:
    graph = _tiny()
    ops = list(graph.ops)
    bad = dataclasses.replace(ops[3])
    object.__setattr__(bad, "kind", "conv")  # past Op's own check, as a careless rewrite might
    ops[3] = bad
    with pytest.raises(GraphError, match=rf"op 3 \(conv, layer {bad.layer}\): unknown op kind 'conv'"):
        Graph(ops, graph.inputs, graph.outputs)


def test_graph_errors_are_config_errors() -> None:
    assert issubclass(GraphError, ConfigError)


QUANTS = {
    "float": None,
    "int8": QuantConfig("int8"),
    "int4-mixed": QuantConfig("int4", embedding="float", modules={"v_proj": "int8", "down_proj": "int8"}),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_graph_verifies_and_reads_exactly_the_layout(name: str) -> None:
    """Every preset x task x quantisation, fused or not: the graph verifies when built and its
    params are the layout's tensor names (fused: the fused names in place of their sources)."""
    for quant in QUANTS.values():
        config = get_preset(name).replace(quantization=quant)
        group = quant.group_size if quant is not None else None
        if group and any(n % group for n in (config.hidden_size, config.intermediate_size)):
            continue  # no 4-bit layout (tiny-gemma3's D=48)
        for task in TASKS:
            graph = build_graph(config, task)
            stored = expected_shapes(config, task, num_labels=3)
            assert set(graph.params) == set(stored), (task, quant)
            shapes = {n: s for n, s, _ in iter_params(config, task, num_labels=3)}
            fused, groups = fuse_projections(graph, shapes)
            assert isinstance(fused, Graph) and fused.outputs == graph.outputs
            products = sum(op.kind in ("linear", "qlinear") for op in fused)
            assert groups and products < sum(op.kind in ("linear", "qlinear") for op in graph)
            names = set(stored)
            for target, sources in groups.items():
                quantised = sources[0] + SCALE_SUFFIX in names
                for suffix in ("", SCALE_SUFFIX) if quantised else ("",):
                    names -= {s + suffix for s in sources}
                    names.add(target + suffix)
            assert set(fused.params) == names, (task, quant)


def test_format_graph_lists_inputs_and_outputs() -> None:
    lines = format_graph(get_preset("gemma-3-270m")).splitlines()
    assert lines[1] == ("# inputs: ids, positions, query_slots, logit_index, mask[window=512], "
                        "mask[global], cache.{0..17}")
    assert lines[2] == "# outputs: logits, cache.{0..17}"
    assert lines[3] == "input"
    base = format_graph(get_preset("tiny-gemma"), task="base").splitlines()
    assert base[2] == "# outputs: hidden, x{0..1}, cache.{0..1}"
