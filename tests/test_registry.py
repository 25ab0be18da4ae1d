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
