"""The layout table: one row per tensor, in the Hugging Face (canonical) names and `[out, in]` shapes,
each with its role; and the lookups between roles and names.

Shapes are written in config symbols (see `gemma_core.config`): V vocab, D hidden, F intermediate,
N query heads, K kv heads, H head_dim, L labels (classification heads). `{layer}` stands for the
layer index. `when` names the config property, or the task, a row exists for (`not ...` negates).

A role says what a tensor does, whatever a generation or a format calls it:

    embedding        the token embedding (also the tied LM head)
    pre_attn_norm    the norm before attention (`input_layernorm`)
    q, k, v, o       the attention projections
    q_norm, k_norm   the per-head query and key norms (Gemma 3)
    post_attn_norm   the norm of the attention output (Gemma 2/3)
    pre_mlp_norm     the norm before the MLP
    post_mlp_norm    the norm of the MLP output (Gemma 2/3)
    gate, up, down   the MLP projections (GELU branch, linear branch, back to D)
    final_norm       the norm before the head
    lm_head          an untied LM head
    score            the classification head; score_bias its bias (token classification)

One name holds two roles: Gemma 1's `post_attention_layernorm` is its pre-MLP norm (it has no
post-attention norm), Gemma 2/3's is the post-attention norm. The table says so with two rows of
that name, one per generation, so `role_of` needs the config to read that name, and
`param_name(config, "pre_mlp_norm", i)` is the one place that knows the quirk.

Code asks for names by role (`param_name`) and reads a name's role (`role_of`, `roles_of`)
instead of parsing names. This module imports no other part of gemma_core but its errors, so
that `gemma_core.quant` (which `config` and `layout` import) can use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

from gemma_core.errors import ConfigError

if TYPE_CHECKING:
    from gemma_core.config import GemmaConfig

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
SCORE = "score.weight"
SCORE_BIAS = "score.bias"
LAYER = "model.layers.{layer}."  # the prefix of every per-layer tensor


@dataclasses.dataclass(frozen=True)
class ParamRow:
    """One tensor of the layout: its name template, shape in config symbols, the condition it
    exists under (`when`), its role (see the module docstring) and a note for people."""

    name: str
    shape: tuple[str, ...]
    role: str
    when: str = "always"
    note: str = ""

    @property
    def per_layer(self) -> bool:
        """Whether the row stands for one tensor per layer (`{layer}` in its name)."""
        return "{layer}" in self.name


_L = LAYER
LAYOUT: tuple[ParamRow, ...] = (
    ParamRow(EMBED, ("V", "D"), "embedding", note="unscaled; also the tied LM head"),
    ParamRow(_L + "input_layernorm.weight", ("D",), "pre_attn_norm", note="stored as w, applied as 1+w"),
    ParamRow(_L + "self_attn.q_proj.weight", ("N*H", "D"), "q"),
    ParamRow(_L + "self_attn.k_proj.weight", ("K*H", "D"), "k"),
    ParamRow(_L + "self_attn.v_proj.weight", ("K*H", "D"), "v"),
    ParamRow(_L + "self_attn.q_norm.weight", ("H",), "q_norm", "has_qk_norm", "Gemma 3"),
    ParamRow(_L + "self_attn.k_norm.weight", ("H",), "k_norm", "has_qk_norm", "Gemma 3"),
    ParamRow(_L + "self_attn.o_proj.weight", ("D", "N*H"), "o"),
    # one name, two roles: the two rows never hold for the same config
    ParamRow(_L + "post_attention_layernorm.weight", ("D",), "pre_mlp_norm", "not has_sandwich_norms",
             "Gemma 1: the pre-MLP norm"),
    ParamRow(_L + "post_attention_layernorm.weight", ("D",), "post_attn_norm", "has_sandwich_norms",
             "Gemma 2/3: the post-attention norm"),
    ParamRow(_L + "pre_feedforward_layernorm.weight", ("D",), "pre_mlp_norm", "has_sandwich_norms"),
    ParamRow(_L + "post_feedforward_layernorm.weight", ("D",), "post_mlp_norm", "has_sandwich_norms"),
    ParamRow(_L + "mlp.gate_proj.weight", ("F", "D"), "gate", note="GELU branch"),
    ParamRow(_L + "mlp.up_proj.weight", ("F", "D"), "up", note="linear branch"),
    ParamRow(_L + "mlp.down_proj.weight", ("D", "F"), "down"),
    ParamRow(FINAL_NORM, ("D",), "final_norm"),
    ParamRow(LM_HEAD, ("V", "D"), "lm_head", "untied", "causal LM only; absent when tied to the embedding"),
    ParamRow(SCORE, ("L", "D"), "score", "classification", "sequence/token classification head"),
    ParamRow(SCORE_BIAS, ("L",), "score_bias", "token-classification", "token classification only"),
)

ROLES: tuple[str, ...] = tuple(dict.fromkeys(row.role for row in LAYOUT))
NORMS = frozenset(role for role in ROLES if role.endswith("_norm"))  # RMSNorm weights, stored as w

_BY_ROLE: dict[str, tuple[ParamRow, ...]] = {
    role: tuple(row for row in LAYOUT if row.role == role) for role in ROLES}
_BY_NAME: dict[str, tuple[ParamRow, ...]] = {
    name: tuple(row for row in LAYOUT if row.name == name) for name in dict.fromkeys(r.name for r in LAYOUT)}


def applies(row: ParamRow, config: GemmaConfig, task: str | None = None) -> bool:
    """Whether `row` holds for `config` and `task`; `task=None` counts every task's head (an
    untied config has its `lm_head`, any config a `score`)."""
    negate = row.when.startswith("not ")
    when = row.when.removeprefix("not ")
    if when == "always":
        value = True
    elif when == "untied":
        value = task in (None, "causal-lm") and not config.tie_word_embeddings
    elif when == "classification":
        value = task in (None, "sequence-classification", "token-classification")
    elif when == "token-classification":
        value = task in (None, when)
    else:
        value = bool(getattr(config, when))
    return value != negate


def _check_role(role: str) -> tuple[ParamRow, ...]:
    if role not in _BY_ROLE:
        raise ConfigError(f"weight role: unknown role {role!r} (known: {', '.join(ROLES)})")
    return _BY_ROLE[role]


def has_role(config: GemmaConfig, role: str, task: str | None = None) -> bool:
    """Whether `config` (with `task`'s head; None: any task) has a tensor holding `role`."""
    return any(applies(row, config, task) for row in _check_role(role))


def param_template(config: GemmaConfig, role: str, task: str | None = None) -> str:
    """The name template (`{layer}` for a per-layer role) of the tensor holding `role` in `config`.
    Raises ConfigError naming the role when the role is unknown or `config` has no such tensor."""
    rows = [row for row in _check_role(role) if applies(row, config, task)]
    if not rows:
        raise ConfigError(f"weight role {role!r}: {config.architecture.value} has no such tensor"
                          + (f" for task {task!r}" if task else ""))
    return rows[0].name


def param_name(config: GemmaConfig, role: str, layer: int | None = None, task: str | None = None) -> str:
    """The canonical name of the tensor holding `role` in `config` (of `layer`, for a per-layer
    role): `param_name(config, "v", 3)` is `model.layers.3.self_attn.v_proj.weight`. Raises
    ConfigError naming the role when `config` has none, or the layer is missing, out of range or
    given for a role that is not per layer."""
    template = param_template(config, role, task)
    if "{layer}" not in template:
        if layer is not None:
            raise ConfigError(f"weight role {role!r}: not per layer; got layer={layer!r}")
        return template
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < config.num_layers:
        raise ConfigError(f"weight role {role!r}: layer must be in 0..{config.num_layers - 1}, got {layer!r}")
    return template.format(layer=layer)


def _rows_of(name: str) -> tuple[tuple[ParamRow, ...], int | None] | None:
    """The rows whose template `name` fills, and its layer; None for a name outside the table."""
    if name in _BY_NAME:
        return _BY_NAME[name], None
    prefix = LAYER.removesuffix("{layer}.")
    if not name.startswith(prefix):
        return None
    index, dot, rest = name[len(prefix):].partition(".")
    # only the index as the layout writes it: ASCII digits, no sign or leading zero
    if not (dot and index.isascii() and index.isdigit() and index == str(int(index))):
        return None
    rows = _BY_NAME.get(LAYER + rest)
    return None if rows is None else (rows, int(index))


def role_of(name: str, config: GemmaConfig | None = None) -> tuple[str, int | None] | None:
    """(role, layer) of the canonical tensor `name` (layer None for a tensor outside the layers),
    or None for a name the table does not hold (a fused name included: see `fused_parts`). The
    layer index is not checked against a config. Given `config`, only its rows count (None for
    Gemma 1's `q_norm`); without one, a name whose role depends on the generation
    (`post_attention_layernorm`) raises ConfigError."""
    found = _rows_of(name)
    if found is None:
        return None
    rows, layer = found
    if config is not None:
        rows = tuple(row for row in rows if applies(row, config))
        return (rows[0].role, layer) if rows else None
    roles = sorted({row.role for row in rows})
    if len(roles) > 1:
        raise ConfigError(f"{name}: its role depends on the generation ({' or '.join(roles)}); "
                          "pass the config")
    return roles[0], layer


def roles_of(name: str) -> frozenset[str]:
    """Every role the tensor `name` (each part of a fused name) holds in some config: two for
    `post_attention_layernorm`, one for most names, none for a name outside the table (or a
    fused name with a part outside it)."""
    found = [_rows_of(part) for part in fused_parts(name)]
    if any(f is None for f in found):
        return frozenset()
    return frozenset(row.role for f in found if f is not None for row in f[0])


def _common_prefix(texts: Iterable[str]) -> str:
    """The longest string every one of `texts` starts with (character by character)."""
    texts = list(texts)
    first, last = min(texts), max(texts)  # the extremes differ first where any two do
    n = min(len(first), len(last))
    return first[:next((k for k in range(n) if first[k] != last[k]), n)]


def fused_name(names: Iterable[str]) -> str:
    """The name of one tensor stacking `names` (table names of one layer) along the output axis,
    their differing part in braces: `model.layers.0.self_attn.{q,k,v}_proj.weight`."""
    names = tuple(names)
    found = [_rows_of(n) for n in names]
    if len(names) < 2 or len(set(names)) != len(names) or any(f is None for f in found) or len(
            {f[1] for f in found if f is not None}) != 1:
        raise ValueError(f"fused_name: expected two or more distinct tensors of one layer, got {names}")
    prefix = _common_prefix(names)
    prefix = prefix[:prefix.rfind(".") + 1]  # braces around whole leading components
    rest = [n[len(prefix):] for n in names]
    common = _common_prefix([r[::-1] for r in rest])[::-1]
    suffix = common[len(common) - min(len(common), min(map(len, rest)) - 1):]  # no empty part
    parts = [r[:len(r) - len(suffix)] for r in rest]
    return f"{prefix}{{{','.join(parts)}}}{suffix}"


def fused_parts(name: str) -> tuple[str, ...]:
    """The tensor names a fused name (`fused_name`) stacks, in order; a plain name is itself."""
    head, brace, rest = name.partition("{")
    inner, close, tail = rest.partition("}")
    if not (brace and close and inner):
        return (name,)
    return tuple(head + part + tail for part in inner.split(","))
