"""The model as an ordered op list, built once from a config, bound to any op table (`bind`) and run
in order (`run_bound`). `build_graph` returns a `Graph`: the ops with their inputs, outputs,
registers and params, verified when built (a misspelt name fails there, naming the op).

Op vocabulary (every backend's op table implements exactly these, with these signatures;
arrays are in the compute dtype unless noted, axis letters as in `gemma_core.config`; the backward
of each kind, the float64 training oracle, is in `backends/numpy/vjp.py`):

- embed(ids[B,T] int, table[V,D]; scale) -> [B,T,D]: rows times sqrt(D) rounded to the compute dtype.
- rms_norm(x[...,E], w[E]; eps) -> [...,E]: in float32, x * rsqrt(mean(x^2) + eps) * (1 + w), one cast back.
- linear(x[...,I], w[O,I]) -> [...,O]: x @ w^T, no bias.
- split_heads(x[B,T,N*H]; heads, head_dim) -> [B,N,T,H].
- merge_heads(x[B,N,T,H]) -> [B,T,N*H].
- rope_table(positions[B,T] int; head_dim, theta, scaling) -> (cos, sin) [B,1,T,H]: angles in
  float32 (float32 inverse frequencies, positions divided by the linear `scaling`), halves
  duplicated, cos/sin cast to the compute dtype. One table per distinct (theta, scaling).
- rope(x[B,N,T,H], cos, sin) -> [B,N,T,H]: rotate-half (NeoX), x * cos + rotate_half(x) * sin.
- attention_bias(mask[B,1,T,S] bool) -> [B,1,T,S]: 0 where the mask is True, the compute dtype's
  finite minimum elsewhere. One per layer kind (global, or a sliding window) per step: the
  masks are step inputs (`gemma_core.masks`: the mask rule, evaluated by
  `gemma_core.step.step_inputs`), named `mask[global]` / `mask[window=W]`.
- kv_cache(k[B,K,T,H], v[B,K,T,H], layer_cache, query_slots[T] int; window) -> (keys[B,K,S,H],
  values, layer_cache'): writes the new keys/values (keys post-RoPE) at ring positions
  `query_slots % capacity` and returns the keys this step attends over, laid out as
  `gemma_core.masks.reads_after_write` says: the buffer after the write (S = capacity), or the
  buffer before it followed by the new keys (S = capacity + T). Key j's slot is
  `masks.key_slots(...)[j]`, which the layer kind's mask was computed from.
- attention(q[B,N,T,H], keys[B,K,S,H], values, bias[B,1,T,S]; scale, softcap) -> [B,N,T,H]: q head
  h reads kv head h // (N/K); scores scaled, soft-capped (if set) before the bias is added;
  softmax in float32. Graphs without a cache (`build_graph(..., cache=False)`) pass the new
  keys and values straight to it.
- qlinear(x[...,I], values, scale; scheme, group_size) -> [...,O]: `linear` on the weight that a
  quantised (values, scale) pair stands for (gemma_core.quant): dequantised in float32, rounded to
  the compute dtype. Backends may fuse the dequantisation into the product.
- qembed(ids[B,T] int, values, scale; scheme, group_size, scale_by) -> [B,T,D]: `embed` on the
  dequantised rows of a quantised table.
- lora(x[...,I], a[r,I], b[O,r]; scale) -> [...,O]: a LoRA adapter's delta (gemma_core.lora),
  `(x @ a^T) @ b^T * scale` in the compute dtype, one rounding per product and one for the scale
  (as PEFT evaluates it); `add` then sums it with the projection's output.
- split(x[...,S]; sizes) -> tuple of [...,sizes[i]]: consecutive slices of the last axis (the
  outputs of projections fused by `fuse_projections`).
- gelu_tanh(x) -> x: the tanh approximation of GELU.
- mul(a, b), add(a, b) -> elementwise.
- softcap(x; cap) -> tanh(x / cap) * cap.
- gather_positions(x[B,T,D], index[P] int) -> [B,P,D]: the positions whose logits are wanted.
- pool_last_token(x[B,T,C], ids[B,T] int; pad_id) -> [B,C]: each row at its rightmost token that is
  not `pad_id` (position 0 if all are), right for left and right padding alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from gemma_core.config import Architecture, GemmaConfig
from gemma_core.errors import ConfigError
from gemma_core.layout import EMBED, FINAL_NORM, LM_HEAD, SCORE, SCORE_BIAS, fused_name, has_role, param_name
from gemma_core.masks import bias_name, layer_kinds, mask_name
from gemma_core.opset import OP_KINDS
from gemma_core.quant import SCALE_SUFFIX, QuantConfig

# Names the executor provides before the first op runs (`gemma_core.step.step_inputs`), with
# one attention mask per layer kind (`gemma_core.masks.mask_name`) and each layer's cache.
GRAPH_INPUTS: tuple[str, ...] = ("ids", "positions", "query_slots", "logit_index")


@dataclasses.dataclass(frozen=True)
class Op:
    """One step: `outputs = kind(*inputs, *params, **attrs)`."""

    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: tuple[str, ...] = ()
    # a private plain dict (read-only by convention): compilers trace dicts, not mapping proxies
    attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            raise ValueError(f"kind: unknown op kind {self.kind!r}")
        object.__setattr__(self, "attrs", dict(self.attrs))


class GraphError(ConfigError):
    """An op list that cannot run: a name read before anything writes it, a value written and
    never read, an op kind outside the vocabulary. Raised when the graph is built."""


def _where(index: int, op: Op) -> str:
    layer = "" if op.layer is None else f", layer {op.layer}"
    return f"graph: op {index} ({op.kind}{layer})"


def _verify(ops: Sequence[Op], inputs: Sequence[str],
            outputs: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Check that `ops` run from `inputs` to `outputs`; returns (registers, params), each in
    order of first use. Every op input is a graph input or written by an earlier op; every value
    written is read by a later op before it is overwritten, or is a graph output."""
    defined = set(inputs)
    unread: dict[str, int] = {}  # name -> index of the op whose value of it nobody read yet
    registers: dict[str, None] = {}
    params: dict[str, None] = {}
    for index, op in enumerate(ops):
        if op.kind not in OP_KINDS:
            raise GraphError(f"{_where(index, op)}: unknown op kind {op.kind!r} "
                             f"(known: {', '.join(OP_KINDS)})")
        for name in op.inputs:
            if name not in defined:
                raise GraphError(f"{_where(index, op)}: reads {name!r}, which is neither a graph "
                                 "input nor written by an earlier op")
            unread.pop(name, None)
        for name in op.outputs:
            if name in unread:
                first = unread[name]
                raise GraphError(f"{_where(first, ops[first])}: writes {name!r}, which op {index} "
                                 "overwrites before any op reads it")
            unread[name] = index
            defined.add(name)
            registers[name] = None
        params.update(dict.fromkeys(op.params))
    for name, index in unread.items():
        if name not in outputs:
            raise GraphError(f"{_where(index, ops[index])}: writes {name!r}, which no later op "
                             "reads and is not a graph output")
    for name in outputs:
        if name not in registers:
            raise GraphError(f"graph: output {name!r} is written by no op")
    return tuple(registers), tuple(params)


@dataclasses.dataclass(frozen=True)
class Graph:
    """An op list checked when it is built (`_verify`): `ops` run in order from `inputs` (the
    step inputs `GRAPH_INPUTS` and each layer's cache) to `outputs`. `registers` are every name
    an op writes and `params` every weight name an op reads, each in order of first use.
    Iterating a graph iterates its ops."""

    ops: tuple[Op, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    registers: tuple[str, ...] = dataclasses.field(init=False)
    params: tuple[str, ...] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        for field in ("ops", "inputs", "outputs"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        registers, params = _verify(self.ops, self.inputs, self.outputs)
        object.__setattr__(self, "registers", registers)
        object.__setattr__(self, "params", params)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def replace(self, ops: Sequence[Op]) -> Graph:
        """The same inputs and outputs over other ops (a rewrite), verified again."""
        return Graph(tuple(ops), self.inputs, self.outputs)


def cache_name(layer: int) -> str:
    """Environment name of a layer's cache state."""
    return f"cache.{layer}"


def rope_names(theta: float, scaling: float) -> tuple[str, str]:
    """Environment names of the (cos, sin) table for one RoPE theta and scaling."""
    tag = f"{theta:g}" + (f"/{scaling:g}" if scaling != 1.0 else "")
    return f"cos[{tag}]", f"sin[{tag}]"


class _Builder:
    def __init__(self, quant: QuantConfig | None = None) -> None:
        self.ops: list[Op] = []
        self.layer: int | None = None
        self.quant = quant

    def add(self, kind: str, inputs: Sequence[str], outputs: str | Sequence[str],
            params: Sequence[str] = (), **attrs: Any) -> None:
        outs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        self.ops.append(Op(kind, tuple(inputs), outs, tuple(params), attrs, self.layer))

    def _scheme(self, weight: str) -> dict[str, Any] | None:
        """The qlinear/qembed attributes of `weight`, or None when it is stored in float."""
        scheme = self.quant.scheme_for(weight) if self.quant is not None else None
        if scheme is None or self.quant is None:
            return None
        return {"scheme": scheme, "group_size": self.quant.group_for(scheme)}

    def linear(self, x: str, out: str, weight: str) -> None:
        """`linear`, or `qlinear` reading (values, scale) where the weight is quantised."""
        quant = self._scheme(weight)
        if quant is None:
            self.add("linear", [x], out, [weight])
        else:
            self.add("qlinear", [x], out, [weight, weight + SCALE_SUFFIX], **quant)

    def embed(self, ids: str, out: str, weight: str, scale: float) -> None:
        """`embed`, or `qembed` where the table is quantised."""
        quant = self._scheme(weight)
        if quant is None:
            self.add("embed", [ids], out, [weight], scale=scale)
        else:
            self.add("qembed", [ids], out, [weight, weight + SCALE_SUFFIX], scale_by=scale, **quant)


def _attention_block(b: _Builder, c: GemmaConfig, i: int, cached: bool) -> None:
    b.linear("h", "q", param_name(c, "q", i))
    b.linear("h", "k", param_name(c, "k", i))
    b.linear("h", "v", param_name(c, "v", i))
    b.add("split_heads", ["q"], "q", heads=c.num_heads, head_dim=c.head_dim)  # [B,N,T,H]
    b.add("split_heads", ["k"], "k", heads=c.num_kv_heads, head_dim=c.head_dim)  # [B,K,T,H]
    b.add("split_heads", ["v"], "v", heads=c.num_kv_heads, head_dim=c.head_dim)
    if c.has_qk_norm:
        b.add("rms_norm", ["q"], "q", [param_name(c, "q_norm", i)], eps=c.rms_norm_eps)
        b.add("rms_norm", ["k"], "k", [param_name(c, "k_norm", i)], eps=c.rms_norm_eps)
    cos, sin = rope_names(*c.rope(i))  # this layer's RoPE table (theta, scaling)
    b.add("rope", ["q", cos, sin], "q")
    b.add("rope", ["k", cos, sin], "k")
    window = c.window(i)
    kv = ("k", "v")
    if cached:
        b.add("kv_cache", ["k", "v", cache_name(i), "query_slots"], ["keys", "values", cache_name(i)],
              window=window)
        kv = ("keys", "values")
    softcap = c.attn_logit_softcap if c.architecture is Architecture.GEMMA2 else None
    b.add("attention", ["q", *kv, bias_name(window)], "a", scale=c.query_scale, softcap=softcap)
    b.add("merge_heads", ["a"], "a")  # [B,T,N*H]
    b.linear("a", "a", param_name(c, "o", i))


def _layer(b: _Builder, c: GemmaConfig, i: int, cached: bool) -> None:
    """Layer i reads the residual stream `x{i}` and writes `x{i+1}`. Weights by role
    (gemma_core.layout_table): Gemma 2/3 add the post-attention and post-MLP norms."""
    eps = c.rms_norm_eps
    x, out = f"x{i}", f"x{i + 1}"
    b.add("rms_norm", [x], "h", [param_name(c, "pre_attn_norm", i)], eps=eps)
    _attention_block(b, c, i, cached)
    if has_role(c, "post_attn_norm"):
        b.add("rms_norm", ["a"], "a", [param_name(c, "post_attn_norm", i)], eps=eps)
    b.add("add", [x, "a"], "r")
    b.add("rms_norm", ["r"], "h", [param_name(c, "pre_mlp_norm", i)], eps=eps)
    b.linear("h", "gate", param_name(c, "gate", i))  # [B,T,F]
    b.linear("h", "up", param_name(c, "up", i))
    b.add("gelu_tanh", ["gate"], "gate")
    b.add("mul", ["gate", "up"], "m")
    b.linear("m", "m", param_name(c, "down", i))  # [B,T,D]
    if has_role(c, "post_mlp_norm"):
        b.add("rms_norm", ["m"], "m", [param_name(c, "post_mlp_norm", i)], eps=eps)
    b.add("add", ["r", "m"], out)


TASKS = ("causal-lm", "base", "sequence-classification", "token-classification")


def build_graph(config: GemmaConfig, task: str = "causal-lm", *, cache: bool = True) -> Graph:
    """The verified op list of `config` for `task`; reads `GRAPH_INPUTS`, the attention mask of
    each layer kind and (`cache`, the default) each layer's cache, outputs `logits` (causal-lm:
    [B,P,V]; sequence-classification: [B,labels], pooled at the rightmost non-pad token;
    token-classification: [B,T,labels]) or `hidden` [B,T,D] and the residual stream
    `x0..x{L-1}` (base: `x{i+1}` is the stream after layer i, `x0` the scaled embeddings), then
    the updated caches. `cache=False` is the step without a cache (training, one-shot scoring):
    each layer attends over its new keys only. A malformed list raises `GraphError` naming the op."""
    if task not in TASKS:
        raise ConfigError(f"task: unknown value {task!r} (known: {', '.join(TASKS)})")
    b = _Builder(config.quantization)
    b.embed("ids", "x0", EMBED, config.embed_scale)  # [B,T,D]
    for theta, scaling in dict.fromkeys(config.rope(i) for i in range(config.num_layers)):
        b.add("rope_table", ["positions"], rope_names(theta, scaling), head_dim=config.head_dim,
              theta=theta, scaling=scaling)  # [B,1,T,H] each
    kinds = layer_kinds(config)
    for window in kinds:
        b.add("attention_bias", [mask_name(window)], bias_name(window))  # [B,1,T,S] each
    for i in range(config.num_layers):
        b.layer = i
        _layer(b, config, i, cache)
    b.layer = None
    last, eps = f"x{config.num_layers}", config.rms_norm_eps
    caches = tuple(cache_name(i) for i in range(config.num_layers)) if cache else ()
    inputs = (*GRAPH_INPUTS, *(mask_name(w) for w in kinds), *caches)
    head = ("hidden", *(f"x{i}" for i in range(config.num_layers))) if task == "base" else ("logits",)
    if task == "causal-lm":
        b.add("gather_positions", [last, "logit_index"], "h")  # [B,P,D]
        b.add("rms_norm", ["h"], "h", [FINAL_NORM], eps=eps)
        b.linear("h", "logits", EMBED if config.tie_word_embeddings else LM_HEAD)  # [B,P,V]
        if config.final_logit_softcap is not None:
            b.add("softcap", ["logits"], "logits", cap=config.final_logit_softcap)
        return Graph(tuple(b.ops), inputs, (*head, *caches))
    b.add("rms_norm", [last], "hidden", [FINAL_NORM], eps=eps)  # [B,T,D]
    if task == "sequence-classification":
        b.add("linear", ["hidden"], "logits", [SCORE])  # [B,T,labels], no bias
        b.add("pool_last_token", ["logits", "ids"], "logits", pad_id=config.pad_token_id)  # [B,labels]
    elif task == "token-classification":
        b.add("linear", ["hidden"], "logits", [SCORE])  # [B,T,labels]
        b.add("add", ["logits"], "logits", [SCORE_BIAS])
    return Graph(tuple(b.ops), inputs, (*head, *caches))


def fuse_projections(graph: Graph, shapes: Mapping[str, tuple[int, ...]],
                     ) -> tuple[Graph, dict[str, tuple[str, ...]]]:
    """Consecutive `linear` (or `qlinear`, alike in attributes) ops reading the same input, such
    as q/k/v and gate/up, as one product over their stacked weights and a `split`. Returns the
    new graph (verified again) and {fused weight name: its source weight names, stacked along the
    output axis} (a quantised weight's `_scale` is stacked the same way). `shapes` gives each
    weight's logical `[out, in]` shape. Fewer, larger products: one kernel launch instead of three."""
    ops = graph.ops
    out: list[Op] = []
    fused: dict[str, tuple[str, ...]] = {}
    i = 0
    while i < len(ops):
        op, j = ops[i], i + 1
        if op.kind in ("linear", "qlinear"):
            while (j < len(ops) and ops[j].kind == op.kind and ops[j].inputs == op.inputs
                   and ops[j].attrs == op.attrs and op.inputs[0] not in ops[j - 1].outputs):
                j += 1
        if j - i < 2:
            out.append(op)
            i += 1
            continue
        group = ops[i:j]
        sources = tuple(g.params[0] for g in group)
        name = fused_name(sources)  # e.g. model.layers.0.self_attn.{q,k,v}_proj.weight
        fused[name] = sources
        params = (name,) if op.kind == "linear" else (name, name + SCALE_SUFFIX)
        tmp = "+".join(o for g in group for o in g.outputs)
        out.append(Op(op.kind, op.inputs, (tmp,), params, op.attrs, op.layer))
        sizes = tuple(shapes[src][0] for src in sources)
        out.append(Op("split", (tmp,), tuple(o for g in group for o in g.outputs), (),
                      {"sizes": sizes}, op.layer))
        i = j
    return graph.replace(out), fused


BoundOp = tuple[Callable[..., Any], tuple[str, ...], tuple[Any, ...], Mapping[str, Any], tuple[str, ...]]


def bind(ops: Graph | Sequence[Op], table: Mapping[str, Callable[..., Any]],
         weights: Mapping[str, Any]) -> list[BoundOp]:
    """Resolve each op's function and weights once: (fn, input names, weights, attrs, outputs)."""
    return [(table[op.kind], op.inputs, tuple(weights[p] for p in op.params), op.attrs, op.outputs)
            for op in ops]


def run_bound(plan: Sequence[BoundOp], env: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Run a bound op list in order, reading and writing `env`."""
    for fn, inputs, params, attrs, outputs in plan:
        result = fn(*[env[name] for name in inputs], *params, **attrs)
        if len(outputs) == 1:
            env[outputs[0]] = result
        else:
            env.update(zip(outputs, result, strict=True))
    return env


def _fmt_attr(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_op(op: Op) -> str:
    """One op as `kind  inputs -> outputs  [params]  attrs`."""
    text = f"{op.kind:<16} {', '.join(op.inputs)} -> {', '.join(op.outputs)}"
    if op.params:
        text += f"  [{', '.join(op.params)}]"
    if op.attrs:
        text += "  " + " ".join(f"{k}={_fmt_attr(v)}" for k, v in op.attrs.items())
    return text


def _compact(names: Sequence[str]) -> str:
    """Names joined by commas, a run such as cache.0, cache.1, ... cache.17 as `cache.{0..17}`."""
    parts: list[str] = []
    run: tuple[str, int, int] | None = None  # (prefix, first, last)
    for name in (*names, ""):
        stem = name.rstrip("0123456789")
        number = int(name[len(stem):]) if stem != name else None
        if run is not None and number is not None and stem == run[0] and number == run[2] + 1:
            run = (run[0], run[1], number)
            continue
        if run is not None:
            prefix, first, last = run
            parts.append(f"{prefix}{first}" if first == last else f"{prefix}{{{first}..{last}}}")
            run = None
        if number is not None:
            run = (stem, number, number)
        elif name:
            parts.append(name)
    return ", ".join(parts)


def format_graph(config: GemmaConfig, ops: Graph | None = None, task: str = "causal-lm") -> str:
    """The graph as text: its inputs and outputs, then the ops, a header per layer (its
    attention kind and RoPE)."""
    ops = build_graph(config, task) if ops is None else ops
    c = config
    lines = [
        f"# {c.architecture.value}: {c.num_layers} layers, D={c.hidden_size}, F={c.intermediate_size}, "
        f"heads {c.num_heads}/{c.num_kv_heads}x{c.head_dim}, V={c.vocab_size}, {len(ops)} ops",
        f"# inputs: {_compact(ops.inputs)}",
        f"# outputs: {_compact(ops.outputs)}",
    ]
    header = len(lines)
    current: int | None = -1
    for op in ops:
        if op.layer != current:
            current = op.layer
            if current is None:
                lines.append("output" if len(lines) > header else "input")
            else:
                theta, scaling = c.rope(current)
                window = c.window(current)
                kind = f"local window={window}" if window else "global"
                lines.append(f"layer {current} ({kind}, rope theta={theta:g} scaling={scaling:g})")
        lines.append("  " + format_op(op))
    return "\n".join(lines)
