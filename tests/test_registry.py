"""The lazy backend registry: explicit names win over GEMMA_BACKEND, plugins, install hints."""

from __future__ import annotations

import importlib
from importlib import metadata

import pytest

from gemma_core import backend as registry
from gemma_core.errors import BackendError


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_LOADED", {})


def test_default_is_numpy_and_env_sets_default_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMMA_BACKEND", raising=False)
    assert registry.default_backend_name() == "numpy"
    monkeypatch.setenv("GEMMA_BACKEND", "plugin-x")
    assert registry.default_backend_name() == "plugin-x"
    assert registry.get_backend("numpy").name == "numpy"  # an explicit name wins
    with pytest.raises(BackendError, match="unknown backend 'plugin-x'"):
        registry.get_backend()


def test_unknown_backend_lists_known_ones() -> None:
    with pytest.raises(BackendError, match=r"known: .*numpy"):
        registry.get_backend("nope")


def test_entry_point_plugin_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = metadata.EntryPoint("fakenp", "backends.numpy:NumpyBackend", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: {"fakenp": ep})
    assert "fakenp" in registry.known_backends()
    backend = registry.get_backend("fakenp")
    assert isinstance(backend, registry.Backend)  # a class entry point is instantiated
    assert registry.get_backend("fakenp") is backend  # and kept


def test_missing_framework_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(name: str) -> object:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setitem(registry.BUILTIN_BACKENDS, "torch", "backends.torch:backend")
    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(BackendError, match=r"pip install 'gemma-core\[torch\]'"):
        registry.get_backend("torch")


def test_op_tables_are_named_functions_from_the_one_registry() -> None:
    import functools

    from backends.numpy import ops
    from gemma_core.graph import OP_KINDS
    from gemma_core.opset import OP_GROUPS, check_table, group_of, kinds_of

    assert set(OP_KINDS) == {k for kinds in OP_GROUPS.values() for k in kinds}
    assert group_of("qlinear") == "quantized" and group_of("rope") == "core"
    table = ops.make_op_table("bfloat16")
    assert check_table(table) == ([], [])
    for kind, op in table.items():  # each op is the module's function with the dtype policy bound
        assert isinstance(op, functools.partial) and op.func is getattr(ops, kind)
        assert op.args[0].dtype == "bfloat16"
    core = ops.make_op_table("float32", groups=())
    assert tuple(core) == kinds_of(()) and "qlinear" not in core and "rope" in core
    assert check_table(core, ("quantized",)) == (["qembed", "qlinear"], [])


def test_table_from_names_a_missing_op_function() -> None:
    import types

    from backends.numpy import ops
    from gemma_core.opset import table_from

    partial_module = types.SimpleNamespace(**{k: getattr(ops, k) for k in ("embed", "linear")})
    with pytest.raises(BackendError, match="has no 'rms_norm'"):
        table_from(partial_module, ops.Policy("float32"))
    with pytest.raises(BackendError, match=r"op groups: unknown \['fp8'\]"):
        table_from(ops, ops.Policy("float32"), ("fp8",))


def test_backend_declarations_and_their_defaults() -> None:
    from backends.numpy import NumpyBackend

    class Minimal(NumpyBackend):
        gaps = ()

    for cls in (registry.Backend, Minimal):
        assert cls.op_groups == ("core", "quantized", "classification", "lora")
    m = Minimal()
    m.op_groups = ("classification",)  # core is implied
    assert m.supported_groups() == ("core", "classification")
    assert m.known_gaps() == []
    assert m.supports_device(None) and m.supports_device("CPU") and not m.supports_device("cuda:0")
    assert registry.get_backend("numpy").known_gaps() == list(registry.FLOAT16_REFUSED)
