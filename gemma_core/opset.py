"""The one registry of op names: the core kinds every backend implements and the optional groups
a backend may declare (`Backend.op_groups`).

The signature and contract of each kind are in the module docstring of `gemma_core.graph` (the
op vocabulary). Backends build their op tables from module-level functions by looking these
names up (`table_from`), so a table is checkable against the registry and each op importable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gemma_core.errors import BackendError

CORE = "core"
QUANTIZED = "quantized"
CLASSIFICATION = "classification"
LORA = "lora"

# group -> op kinds. "core" is required of every backend; the others are declared when implemented.
OP_GROUPS: dict[str, tuple[str, ...]] = {
    CORE: ("embed", "rms_norm", "linear", "split_heads", "merge_heads", "rope_table", "rope",
           "attention_bias", "kv_cache", "attention", "split", "gelu_tanh", "mul", "add", "softcap",
           "gather_positions"),
    QUANTIZED: ("qlinear", "qembed"),  # quantised checkpoints (gemma_core.quant)
    CLASSIFICATION: ("pool_last_token",),  # the sequence-classification head
    LORA: ("lora",),  # LoRA / QLoRA adapters (gemma_core.lora)
}
REQUIRED_GROUPS: tuple[str, ...] = (CORE,)

# Every op kind, in the vocabulary's order (gemma_core.graph re-exports this).
OP_KINDS: tuple[str, ...] = (
    "embed", "rms_norm", "linear", "split_heads", "merge_heads", "rope_table", "rope", "attention_bias",
    "kv_cache", "attention", "pool_last_token", "qlinear", "qembed", "lora", "split",
    "gelu_tanh", "mul", "add", "softcap", "gather_positions",
)
assert sorted(OP_KINDS) == sorted(k for kinds in OP_GROUPS.values() for k in kinds)

_GROUP_OF = {kind: group for group, kinds in OP_GROUPS.items() for kind in kinds}


def group_of(kind: str) -> str:
    """The group an op kind belongs to."""
    try:
        return _GROUP_OF[kind]
    except KeyError:
        raise BackendError(f"op kind: unknown kind {kind!r}") from None


def kinds_of(groups: Iterable[str]) -> tuple[str, ...]:
    """The op kinds of `groups` (plus the required ones), in vocabulary order."""
    wanted = set(REQUIRED_GROUPS) | set(groups)
    unknown = sorted(wanted - set(OP_GROUPS))
    if unknown:
        raise BackendError(f"op groups: unknown {unknown} (known: {', '.join(OP_GROUPS)})")
    return tuple(k for k in OP_KINDS if _GROUP_OF[k] in wanted)


def groups_needed(kinds: Iterable[str]) -> set[str]:
    """The groups whose ops a list of kinds uses (e.g. a graph's `{op.kind for op in ops}`)."""
    return {group_of(k) for k in kinds}


def table_from(namespace: Any, policy: Any, groups: Iterable[str] = tuple(OP_GROUPS)
               ) -> dict[str, Callable[..., Any]]:
    """The op table of `groups`: each kind's module-level function `namespace.<kind>(policy, ...)`
    with the dtype `policy` bound first (`functools.partial`). A missing function is an error
    naming the kind."""
    table = {}
    for kind in kinds_of(groups):
        fn = getattr(namespace, kind, None)
        if fn is None:
            raise BackendError(f"op table: {getattr(namespace, '__name__', namespace)} has no {kind!r}")
        table[kind] = functools.partial(fn, policy)
    return table


def check_table(table: Mapping[str, Any], groups: Iterable[str] = tuple(OP_GROUPS)
                ) -> tuple[list[str], list[str]]:
    """(missing, extra): kinds of the required and declared `groups` the table lacks, and names
    it has that are not op kinds at all."""
    kinds = set(table)
    return sorted(set(kinds_of(groups)) - kinds), sorted(kinds - set(OP_KINDS))
