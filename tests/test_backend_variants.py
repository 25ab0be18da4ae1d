"""`name:variant` backend names: `get_backend("array_api:torch")` is the Array-API backend on the
torch namespace (`Backend.variant`), unknown variants are one clear error, and the CLI's
`--backend` accepts the form."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("array_api_compat")
pytest.importorskip("array_api_strict")

import gemma_core
from backends import array_api
from gemma_core import backend as registry
from gemma_core.cli import main
from gemma_core.errors import BackendError
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights

Tiny = tuple[gemma_core.GemmaConfig, dict[str, np.ndarray], np.ndarray, np.ndarray]
NAMESPACES = [ns for ns in ("numpy", "torch") if importlib.util.find_spec(ns) is not None]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_LOADED", {})


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    """tiny-gemma3 with random weights, and a left-padded batch of two prompts."""
    config = get_preset("tiny-gemma3")
    ids, mask = gemma_core.batch_ids([[5, 9, 31, 7, 2, 44, 3, 18, 60, 11], [8, 21, 13, 4]])
    return config, random_weights(config, 5), ids, mask


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_variant_is_the_namespace_backend(namespace: str) -> None:
    be = registry.get_backend(f"array_api:{namespace}")
    assert be is array_api.for_namespace(namespace)  # the one instance per namespace
    assert be.name == f"array_api:{namespace}" and be.namespace == namespace
    assert registry.get_backend(f"array_api:{namespace}") is be  # kept under the whole name
    assert f"array_api:{namespace}" not in registry.known_backends()  # the registry is unchanged


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_variant_logits_equal_the_numpy_reference(namespace: str, tiny: Tiny) -> None:
    config, weights, ids, mask = tiny
    ref = gemma_core.Model(config, weights, backend="numpy")
    cand = gemma_core.Model(config, weights, backend=f"array_api:{namespace}")
    assert cand.backend.name == f"array_api:{namespace}"
    want = ref.to_numpy(ref.forward(ids, mask).logits)
    got = cand.to_numpy(cand.forward(ids, mask).logits)
    real = mask.astype(bool)  # logits of pad positions are implementation-defined
    assert got.shape == want.shape
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-4 * float(want[real].std()))
    step = cand.forward(np.array([[3], [3]]), None, cand.forward(ids, mask, max_length=12).cache)
    ref_step = ref.forward(np.array([[3], [3]]), None, ref.forward(ids, mask, max_length=12).cache)
    np.testing.assert_allclose(cand.to_numpy(step.logits), ref.to_numpy(ref_step.logits),
                               rtol=0, atol=1e-4 * float(want[real].std()))


def test_unknown_variant_lists_the_known_ones() -> None:
    with pytest.raises(BackendError, match=r"backend 'array_api' has no variant 'nosuchlib' "
                                           r"\(known: array_api_strict, numpy, torch, jax"):
        registry.get_backend("array_api:nosuchlib")
    with pytest.raises(BackendError, match=r"no variant 'math'.*has no attribute 'asarray'"):
        registry.get_backend("array_api:math")  # importable, but not an array library
    with pytest.raises(BackendError, match=r"backend 'numpy' has no variant 'fast' \(known: none\)"):
        registry.get_backend("numpy:fast")  # a backend without variants
    with pytest.raises(BackendError, match=r"unknown backend 'nope' \(known: .*numpy"):
        registry.get_backend("nope:torch")
    assert "array_api:nosuchlib" not in registry._LOADED


def test_missing_framework_of_a_known_variant_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(namespace: str) -> object:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(array_api, "for_namespace", fail)
    with pytest.raises(BackendError, match=r"backend 'array_api:torch' needs torch, which is not "
                                           r"installed: pip install 'gemma-core\[torch\]'"):
        registry.get_backend("array_api:torch")


def test_a_backend_registered_under_the_whole_name_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.BUILTIN_BACKENDS, "array_api:numpy", "backends.numpy:backend")
    assert registry.get_backend("array_api:numpy").name == "numpy"


def test_cli_choices_accept_name_variant() -> None:
    choices = registry.BackendChoices()
    assert list(choices) == registry.known_backends()
    assert "array_api:torch" in choices and "numpy" in choices and "numpy:x" in choices
    assert "nope" not in choices and "nope:x" not in choices and None not in choices


def test_generate_on_a_variant_from_the_cli(tiny_model_folder: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--model", str(tiny_model_folder), "--max-new-tokens", "6", "Hello world"]
    assert main([*args, "--backend", "array_api:numpy"]) == 0
    out = capsys.readouterr().out
    assert registry._LOADED["array_api:numpy"] is array_api.for_namespace("numpy")  # it ran there
    expected = gemma_core.load(tiny_model_folder).generate("Hello world", max_new_tokens=6).texts[0]
    assert out == expected + "\n" and out.strip()


def test_unknown_variant_from_the_cli_is_one_error_line(tiny_model_folder: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--model", str(tiny_model_folder), "--backend", "array_api:nosuchlib", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("gemma: error: backend 'array_api' has no variant 'nosuchlib'")
    assert len(err.strip().splitlines()) == 1
