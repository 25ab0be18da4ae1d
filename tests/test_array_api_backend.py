"""backends/array_api: one op table on the Array API standard, proven on array-api-strict (which
refuses anything non-standard) and run unchanged on the numpy, torch and jax namespaces."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("array_api_compat")
array_api_strict = pytest.importorskip("array_api_strict")

import gemma_core  # noqa: E402
from backends import array_api  # noqa: E402
from backends.array_api import ops as array_api_ops  # noqa: E402
from conformance import run_conformance  # noqa: E402
from gemma_core import backend as registry  # noqa: E402

NAMESPACES = [ns for ns in ("numpy", "torch", "jax") if importlib.util.find_spec(ns) is not None]
# each namespace's conformance run, in this test file's time budget; jax runs op by op (eager
# dispatch of every small op), ~20x slower than the others, so its full catalogue is slow
FAST_JAX_CASES = ("op-embed", "op-rms_norm", "op-linear", "op-heads", "op-rope", "op-kv_cache",
                  "op-attention", "op-elementwise", "op-quantized", "gemma1-mha")


def _check(results: list, min_passed: int) -> None:  # type: ignore[type-arg]
    failed = [r for r in results if r.status == "fail"]
    assert not failed, failed
    undeclared = [r for r in results if r.status == "skip" and not r.detail]
    assert not undeclared, undeclared  # every skip says why
    assert sum(r.status == "pass" for r in results) >= min_passed


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The namespace variants registered by name, as a plugin would ("array_api:torch")."""
    for ns in NAMESPACES:
        monkeypatch.setitem(registry.BUILTIN_BACKENDS, f"array_api:{ns}",
                            f"backends.array_api:{ns}_backend")
    yield


def test_registered_as_array_api_on_strict() -> None:
    be = gemma_core.get_backend("array_api")
    assert be is array_api.backend and be.namespace == "array_api_strict"
    assert be.dtypes == ("float32", "float64")  # the standard's floats; no bf16/fp16 on strict
    assert be.cache_in_place  # strict arrays take slice assignment
    assert not be.known_gaps()  # no float16 at all, so no rule-9 refusals to declare


def test_conformance_catalogue_on_strict() -> None:
    results = run_conformance(["array_api"], ["float32", "float64"])
    _check(results, min_passed=50)
    skipped = {(r.case, r.dtype) for r in results if r.status == "skip"}
    assert skipped == {("float16-policy", "float16")}  # declared: strict has no float16


@pytest.mark.parametrize("ns", [ns for ns in NAMESPACES if ns != "jax"])
def test_conformance_catalogue_on_namespace(ns: str, registered: None) -> None:
    _check(run_conformance([f"array_api:{ns}"], ["float32"]), min_passed=27)


@pytest.mark.skipif("jax" not in NAMESPACES, reason="jax is not installed")
def test_conformance_on_jax_functional_cache(registered: None) -> None:
    be = array_api.jax_backend
    assert not be.cache_in_place  # jax arrays are immutable: kv_cache rebuilds with xp.where
    _check(run_conformance(["array_api:jax"], ["float32"], cases=FAST_JAX_CASES), min_passed=11)


@pytest.mark.slow
@pytest.mark.parametrize("ns", NAMESPACES)
def test_full_catalogue_every_dtype_on_namespace(ns: str, registered: None) -> None:
    if ns == "jax" and not os.environ.get("GEMMA_EXHAUSTIVE"):
        pytest.skip("jax runs op by op: its full catalogue takes ~8 min (GEMMA_EXHAUSTIVE=1 runs it; "
                    "test_conformance_on_jax_functional_cache covers its cache path)")
    be = getattr(array_api, f"{ns}_backend")
    # float16 runs Gemma 1 cases only (rule 9 gaps); bfloat16 where the namespace has it
    _check(run_conformance([f"array_api:{ns}"], be.dtypes), min_passed=20 * len(be.dtypes))


@pytest.mark.parametrize("ns", ["array_api_strict", *NAMESPACES])
def test_forward_and_generate_match_the_reference(ns: str) -> None:
    ours = gemma_core.load("tiny-gemma3", backend=array_api.for_namespace(ns))
    ref = gemma_core.load("tiny-gemma3")
    ids = np.array([[2, 10, 20, 30, 40]])
    logits = ours.to_numpy(ours.forward(ids).logits)
    np.testing.assert_allclose(logits, np.asarray(ref.forward(ids).logits), rtol=1e-4, atol=1e-4)
    kw = {"max_new_tokens": 3, "eos_token_ids": []}
    prompts = [[2, 10, 20, 30], [2, 11]]
    assert ours.generate(prompts, **kw).token_ids == ref.generate(prompts, **kw).token_ids


def test_strict_arrays_throughout_under_the_oldest_standard() -> None:
    """Every op's output is an array_api_strict array (nothing fell back to numpy), with strict
    set to the 2023.12 standard and no data-dependent shapes or boolean indexing allowed."""
    model = gemma_core.load("tiny-gemma2", backend="array_api")
    strict_array = type(array_api_strict.asarray(0))
    kinds: set[str] = set()

    def watch(kind: str, fn):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            out = fn(*args, **kwargs)
            leaves = out if isinstance(out, tuple) else (out,)
            for leaf in leaves:
                for x in leaf if isinstance(leaf, tuple) else (leaf,):
                    assert isinstance(x, strict_array), (kind, type(x))
            kinds.add(kind)
            return out
        return run

    model.ops = {kind: watch(kind, fn) for kind, fn in model.ops.items()}
    with array_api_strict.ArrayAPIStrictFlags(api_version="2023.12", boolean_indexing=False,
                                              data_dependent_shapes=False):
        out = model.forward(np.array([[2, 5, 6, 7]]), max_length=6)
        model.forward(np.array([[8]]), cache=out.cache, last_only=True)
    assert {"embed", "attention", "kv_cache", "softcap", "rope_table"} <= kinds


def test_op_table_uses_only_standard_functions() -> None:
    """Each `xp.<name>` in the op table is a function or constant of the standard (as strict
    exposes it), and no array library is imported besides numpy for host-side constants."""
    tree = ast.parse(inspect.getsource(array_api_ops))
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "xp"}
    assert used and all(hasattr(array_api_strict, name) for name in used), sorted(
        n for n in used if not hasattr(array_api_strict, n))
    imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported = {name.split(".")[0] for name in imported}
    # the spec itself (gemma_core.masks: the cache layout rule) besides the standard library
    assert imported <= {"__future__", "functools", "itertools", "math", "collections", "typing", "numpy",
                        "array_api_compat", "gemma_core"}, imported


def test_non_standard_use_is_refused_by_strict() -> None:
    """What the strict namespace is for: a numpy-ism that the op table avoids raises there."""
    x = array_api_strict.zeros((2, 3, 4, 5))
    with pytest.raises(IndexError):
        x[:, :, 1:2] = array_api_strict.ones((2, 3, 1, 5))  # needs the trailing `, :` or `...`
    x[:, :, 1:2, :] = array_api_strict.ones((2, 3, 1, 5))  # as kv_cache writes it
    with pytest.raises(AttributeError):
        array_api_strict.einsum  # noqa: B018 - not in the standard


def test_unknown_device_and_dtype_are_clear_errors() -> None:
    from gemma_core.errors import BackendError, ConfigError

    with pytest.raises(BackendError, match="device: 'tpu9' is not a device of array_api_strict"):
        gemma_core.load("tiny-gemma", backend="array_api", device="tpu9")
    with pytest.raises(ConfigError, match="does not support 'bfloat16'"):
        gemma_core.load("tiny-gemma", backend="array_api", dtype="bfloat16")
    model = gemma_core.load("tiny-gemma", backend="array_api", device="device1")
    assert model.weights["model.norm.weight"].device == array_api_strict.Device("device1")
