"""The conformance runner passes the reference and catches broken backends precisely."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from backends.numpy import NumpyBackend
from backends.numpy.ops import make_op_table
from conformance import MODEL_CASES, OP_CASES, run_conformance
from conformance.runner import Result
from gemma_core import backend as registry
from gemma_core.cli import main


@pytest.fixture(scope="module")
def numpy_results() -> list[Result]:
    return run_conformance(["numpy"], ("float32", "bfloat16", "float16"))


def test_reference_passes_every_case(numpy_results: list[Result]) -> None:
    failed = [r for r in numpy_results if r.status == "fail"]
    assert not failed, failed
    cases = {r.case for r in numpy_results if r.status == "pass"}
    assert {c.name for c in MODEL_CASES} <= cases
    assert {c.name for c in OP_CASES} <= cases
    skipped = {(r.case, r.dtype) for r in numpy_results if r.status == "skip"}
    assert ("gemma2-binding-softcaps", "float16") in skipped  # rule 9


class _Broken(NumpyBackend):
    """The reference with one op replaced."""

    def __init__(self, name: str, patch: Callable[[dict[str, Any]], None]) -> None:
        self.name, self._patch = name, patch

    def make_op_table(self, dtype: str) -> dict[str, Any]:
        table = dict(make_op_table(dtype))
        self._patch(table)
        return table


def _run_broken(monkeypatch: pytest.MonkeyPatch, patch: Callable[[dict[str, Any]], None],
                cases: list[str]) -> dict[str, Result]:
    broken = _Broken("broken", patch)
    monkeypatch.setattr(registry, "_LOADED", {"broken": broken})
    results = run_conformance(["broken"], ("float32",), cases)
    return {r.case: r for r in results if r.dtype == "float32"}


def test_interleaved_rope_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def patch(t: dict[str, Any]) -> None:
        rope = t["rope"]

        def interleaved(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
            h = x.shape[-1]  # pair (2i, 2i + 1) instead of (i, i + H/2)
            perm = np.concatenate([np.arange(0, h, 2), np.arange(1, h, 2)])
            return rope(x[..., perm], cos, sin)[..., np.argsort(perm)]
        t["rope"] = interleaved

    res = _run_broken(monkeypatch, patch, ["op-rope", "gemma1-mha"])
    assert res["op-rope"].status == "fail"
    assert res["gemma1-mha"].status == "fail"
    assert "prefill logits" in res["gemma1-mha"].detail


def test_dropped_softcap_fails_only_where_it_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    def patch(t: dict[str, Any]) -> None:
        attention = t["attention"]
        t["attention"] = lambda *a, softcap=None, **kw: attention(*a, softcap=None, **kw)

    res = _run_broken(monkeypatch, patch, ["gemma2-binding-softcaps", "gemma1-mqa-padded"])
    assert res["gemma2-binding-softcaps"].status == "fail"
    assert res["gemma1-mqa-padded"].status == "pass"


def test_kv_cache_ignoring_its_window_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def patch(t: dict[str, Any]) -> None:
        kv_cache = t["kv_cache"]
        t["kv_cache"] = lambda *a, window=None, **kw: kv_cache(*a, window=None, **kw)

    res = _run_broken(monkeypatch, patch, ["op-kv_cache", "gemma2-window-shorter-than-sequence"])
    assert res["op-kv_cache"].status == "fail"
    assert "window=4" in res["op-kv_cache"].detail
    assert res["gemma2-window-shorter-than-sequence"].status == "fail"


def test_bias_ignoring_the_mask_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def patch(t: dict[str, Any]) -> None:
        bias = t["attention_bias"]
        t["attention_bias"] = lambda mask: bias(np.ones_like(mask))

    res = _run_broken(monkeypatch, patch, ["op-attention_bias", "op-attention", "gemma1-mqa-padded"])
    assert [r.case for r in res.values() if r.status == "fail"] == [
        "op-attention_bias", "op-attention", "gemma1-mqa-padded"], res


def test_missing_op_kind_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    res = _run_broken(monkeypatch, lambda t: t.pop("softcap"), ["op-linear"])
    assert res["op-table"].status == "fail"
    assert "missing ['softcap']" in res["op-table"].detail


def test_uninstalled_backend_skipped_by_default_failed_when_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.BUILTIN_BACKENDS, "ghost", "backends.ghost_not_here:backend")
    monkeypatch.setattr(registry, "_LOADED", {})

    def missing(name: str | None = None) -> Any:
        if name == "ghost":
            raise registry.BackendError("backend 'ghost' needs torch, which is not installed")
        return NumpyBackend()

    monkeypatch.setattr("conformance.runner.get_backend", missing)
    default = run_conformance(None, ("float32",), ["op-linear"])
    assert [r.status for r in default if r.backend == "ghost"] == ["skip"]
    named = run_conformance(["ghost"], ("float32",), ["op-linear"])
    assert [r.status for r in named] == ["fail"]


def test_cli_conformance_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["conformance", "--backends", "numpy", "--dtypes", "float32", "--json",
                 "--cases", "op-rope,gemma1-mha"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["failed"] == 0
    assert {r["case"] for r in out["results"]} >= {"op-rope", "gemma1-mha", "op-table"}


# ---- reports, user checkpoints, plugins --------------------------------------------------------

def test_junit_and_markdown_reports(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import xml.etree.ElementTree as ET

    junit, md = tmp_path / "r.xml", tmp_path / "r.md"
    code = main(["conformance", "--backends", "numpy", "--dtypes", "float32,float16", "--cases",
                 "op-linear,gemma1-mha,gemma3-local-global-rope", "--junit", str(junit),
                 "--markdown", str(md)])
    assert code == 0
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("failures") == "0"
    skipped = [c for c in suite if c.find("skipped") is not None]
    assert [(c.get("classname"), c.get("name")) for c in skipped] == [
        ("numpy.float16", "gemma3-local-global-rope")]
    text = md.read_text()
    assert "| gemma1-mha | pass | pass |" in text
    assert "known gap: refused: Gemma 3 activations exceed float16's range" in text


def test_known_gaps_are_data() -> None:
    from conformance.runner import known_gaps

    for backend in ("numpy", "torch", "jax", "tensorflow"):
        assert ("arch:gemma2", "float16") in {(p, d) for p, d, _ in known_gaps(backend)}
    assert known_gaps("no-such-backend") == []


def test_user_checkpoint_is_compared_across_backends(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gemma_core.checkpoint import save_checkpoint
    from gemma_core.presets import get_preset
    from gemma_core.weights import random_weights

    config = get_preset("tiny-gemma2")
    folder = save_checkpoint(tmp_path / "m", config, random_weights(config, 9))
    results = run_conformance(["numpy"], ("float32",), model=str(folder))
    cells = {r.case: r for r in results}
    assert cells["model:m"].status == "pass", cells["model:m"]
    assert "op-rope" not in cells  # the checkpoint's comparisons, not the op catalogue


def test_plugin_backend_from_an_entry_point(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A plugin installed as a distribution (a dist-info with entry points on the path) is found
    by name and checked; one that lacks an op kind is reported precisely."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    info = tmp_path / "gemma_plugin_example-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gemma-plugin-example\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[gemma_core.backends]\nexample = gemma_plugin_example:backend\n"
        "incomplete = gemma_plugin_example:incomplete\n")
    plugin_dir = Path(__file__).parent / "plugin_backend"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(plugin_dir),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "gemma_core.cli", "conformance", "--backends", "example,incomplete",
           "--dtypes", "float32", "--cases", "op-linear,gemma1-mha", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 1, out.stderr
    results = {(r["backend"], r["case"]): r for r in json.loads(out.stdout)["results"]}
    assert results[("example", "gemma1-mha")]["status"] == "pass"
    assert results[("example", "op-table")]["status"] == "pass"
    assert results[("incomplete", "op-table")]["status"] == "fail"
    assert "missing ['softcap']" in results[("incomplete", "op-table")]["detail"]


def test_golden_transformers_values_pass_without_transformers() -> None:
    """The committed transformers outputs are checked in a process where transformers (and
    torch) cannot be imported."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['torch'] = None\n"
        "from conformance import run_conformance\n"
        "from conformance.golden import GOLDEN_CASES\n"
        "names = [c.name for c in GOLDEN_CASES]\n"
        "res = run_conformance(['numpy'], ('float32',), names)\n"
        "golden = [r for r in res if r.case in names]\n"
        "assert len(golden) == len(names) and all(r.status == 'pass' for r in golden), golden\n"
        "print('ok', golden[0].detail)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok transformers 5.")


def test_golden_catches_a_wrong_model() -> None:
    from conformance.golden import GOLDEN_CASES
    from conformance.runner import run_golden_case
    from conformance.tolerances import TOLERANCES

    # the same weights with one RoPE theta for every layer: transformers' values disagree
    wrong = dataclasses.replace(GOLDEN_CASES[2], changes={"rope_local_theta": 1e6})
    with pytest.raises(Exception, match="logits vs transformers"):
        run_golden_case(wrong, NumpyBackend(), "float32", TOLERANCES["float32"])


# ---- the cache is a value: fork cases ------------------------------------------------------------

def test_fork_case_runs_from_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["conformance", "--backends", "numpy", "--dtypes", "float32", "--json",
                 "--cases", "fork-prefix-cache"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    cells = {r["case"]: r for r in out["results"]}
    assert cells["fork-prefix-cache"]["status"] == "pass"
    assert "2 forks of one prefix cache" in cells["fork-prefix-cache"]["detail"]


def test_fork_case_catches_a_step_that_changes_the_cache_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that writes its cache in place but declares a functional step (so forward
    skips the copy): plain decode cannot tell, the fork case fails."""

    class Lying(NumpyBackend):
        name = "lying"
        cache_in_place = False

    monkeypatch.setattr(registry, "_LOADED", {"lying": Lying()})
    results = run_conformance(["lying"], ("float32",), ["fork-prefix-cache", "gemma3-decode-past-ring"])
    cells = {r.case: r for r in results}
    assert cells["gemma3-decode-past-ring"].status == "pass"
    assert cells["fork-prefix-cache"].status == "fail"
    assert "fork 1" in cells["fork-prefix-cache"].detail


def test_unknown_case_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["conformance", "--backends", "numpy", "--dtypes", "float32",
                 "--cases", "op-rope,no-such-case"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""  # refused before anything ran
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("gemma: error: cases: unknown case 'no-such-case' (known: ")
    assert "fork-prefix-cache" in lines[0] and "op-rope" in lines[0]


# ---- what a backend declares: op groups, dtypes, devices, known gaps ---------------------------

def _plugin(monkeypatch: pytest.MonkeyPatch, **backends: Any) -> None:
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugin_backend"))
    sys.modules.pop("gemma_plugin_example", None)
    monkeypatch.setattr(registry, "_LOADED", dict(backends))


def test_plugin_declaring_gaps_and_groups_passes(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The example plugin has no float16 and no quantised ops, and here one known gap: `gemma
    conformance` skips exactly those cells, as declared by the backend, and exits 0."""
    _plugin(monkeypatch)
    import gemma_plugin_example

    example = gemma_plugin_example.backend
    assert example.known_gaps() == []  # it passes every case it declares (from-scratch op table)
    monkeypatch.setattr(example, "gaps", (("gemma3-decode-past-ring", "*",
                                           "example: decode past the sliding ring is not done yet"),))
    monkeypatch.setitem(registry._LOADED, "example", example)
    code = main(["conformance", "--backends", "example", "--dtypes", "float32,float16", "--json",
                 "--cases", "float16-policy,op-linear,op-quantized,gemma1-mha,gemma2-int8,"
                 "gemma2-sequence-classification,gemma3-decode-past-ring"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    cells = {(r["case"], r["dtype"]): r for r in out["results"]}
    for key in (("op-table", "float32"), ("op-linear", "float32"), ("gemma1-mha", "float32"),
                ("gemma2-sequence-classification", "float32")):
        assert cells[key]["status"] == "pass", cells[key]
    for key, why in ((("float16-policy", "float16"), "float16"), (("*", "float16"), "float16"),
                     (("op-quantized", "float32"), "needs op group 'quantized'"),
                     (("gemma2-int8", "float32"), "needs op group 'quantized'")):
        assert cells[key]["status"] == "skip"
        assert cells[key]["detail"] == f"not supported (declared by the backend): {why}"
    gap = cells[("gemma3-decode-past-ring", "float32")]
    assert gap["status"] == "skip" and gap["detail"].startswith("known gap: example: decode past")


def test_declared_group_or_core_op_missing_still_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from gemma_core.opset import kinds_of

    class NoQuant(NumpyBackend):
        name = "noquant"
        op_groups = ("core", "classification")

        def __init__(self, drop: str) -> None:
            self.drop = drop

        def make_op_table(self, dtype: str) -> dict[str, Any]:
            table = {k: v for k, v in make_op_table(dtype).items() if k in kinds_of(self.op_groups)}
            table.pop(self.drop)
            return table

    for drop in ("rope", "pool_last_token"):  # a required core op, an op of a declared group
        monkeypatch.setattr(registry, "_LOADED", {"noquant": NoQuant(drop)})
        cells = {r.case: r for r in run_conformance(["noquant"], ("float32",), ["op-linear"])}
        assert cells["op-table"].status == "fail"
        assert f"missing [{drop!r}]" in cells["op-table"].detail


def test_known_gaps_are_declared_by_the_backend_object() -> None:
    from backends.numpy import backend as numpy_backend
    from conformance.runner import known_gaps

    assert known_gaps(numpy_backend) == numpy_backend.known_gaps()
    assert ("arch:gemma3", "float16") in {(p, d) for p, d, _ in numpy_backend.known_gaps()}
    assert NumpyBackend.supported_groups(numpy_backend) == ("core", "quantized", "classification", "lora")


def test_device_is_passed_to_every_load_and_undeclared_devices_skip(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: set[str | None] = set()

    class Recording(NumpyBackend):
        name = "recording"
        devices = ("cpu", "fake")

        def convert_weight(self, w: np.ndarray, dtype: str, device: str | None) -> Any:
            seen.add(device)
            return super().convert_weight(w, dtype, "cpu")

        def new_cache_layer(self, *args: Any) -> Any:
            seen.add(args[-1])
            return super().new_cache_layer(*args[:-1], None)

    monkeypatch.setattr(registry, "_LOADED", {"recording": Recording(), "numpy": NumpyBackend()})
    code = main(["conformance", "--backends", "recording,numpy", "--dtypes", "float32", "--json",
                 "--device", "fake:1", "--cases", "op-linear,op-kv_cache,gemma1-mha"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert seen == {"fake:1"}
    cells = {(r["backend"], r["case"]): r for r in out["results"]}
    assert cells[("recording", "gemma1-mha")]["status"] == "pass"
    assert cells[("numpy", "*")] == {
        "case": "*", "backend": "numpy", "dtype": "-", "status": "skip",
        "detail": "not supported (declared by the backend): device 'fake:1' (devices: cpu)"}


def test_progress_sees_every_result_as_it_is_made() -> None:
    seen: list[Result] = []
    results = run_conformance(["numpy"], ("float32",), ["op-rope", "gemma1-mha"], progress=seen.append)
    assert seen == results
    assert [r.case for r in seen] == ["float16-policy", "op-table", "op-rope", "gemma1-mha"]


def test_cache_operation_cases_catch_a_wrong_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each cache-operation case fails, naming the operation, where that operation is wrong: a
    backend hook (a copy sharing its buffers, a gather of the wrong rows, a shift that does not
    roll), a dynamic cache grown to another size, a crop of a wrapped ring not refused."""
    from gemma_core.errors import InputError
    from gemma_core.model import Model

    def reversed_rows(self: NumpyBackend, state: Any, rows: np.ndarray) -> Any:
        return NumpyBackend.reorder_cache_layer(self, state, rows[::-1].copy())

    hooks: list[tuple[str, str, Callable[..., Any], str]] = [
        ("cache-crop-donate-reorder", "copy_cache_layer", lambda self, state: state, "donate"),
        ("cache-crop-donate-reorder", "reorder_cache_layer", reversed_rows, "reorder"),
        ("cache-splice-shift", "write_cache_row", lambda self, state, *source: state, "splice"),
        ("cache-splice-shift", "shift_cache_layer", lambda self, state, shift: state, "shift"),
    ]
    for case, hook, fn, named in hooks:
        monkeypatch.setattr(registry, "_LOADED", {"broken": type("B", (NumpyBackend,), {hook: fn})()})
        cell = {r.case: r for r in run_conformance(["broken"], ("float32",), [case])}[case]
        assert cell.status == "fail" and named in cell.detail, (case, cell)
    monkeypatch.setattr(registry, "_LOADED", {})
    with monkeypatch.context() as m:
        m.setattr("gemma_core.model.grown_length", lambda size, needed, most: needed)
        cell = {r.case: r for r in run_conformance(["numpy"], ("float32",), ["cache-dynamic-grows"])}
        assert cell["cache-dynamic-grows"].status == "fail"
        assert "grown_length" in cell["cache-dynamic-grows"].detail
    crop = Model.crop_cache

    def never_refused(self: Model, cache: Any, n: int, **kw: Any) -> Any:
        try:
            return crop(self, cache, n, **kw)
        except InputError:
            return cache

    monkeypatch.setattr(Model, "crop_cache", never_refused)
    case = "cache-crop-donate-reorder"
    cell = {r.case: r for r in run_conformance(["numpy"], ("float32",), [case])}[case]
    assert cell.status == "fail" and "crop-refused" in cell.detail and "not refused" in cell.detail
