"""The layering rules of DESIGN.md, read from the source (imports at any depth, except those under
`if TYPE_CHECKING:`): the spec never imports a backend, the conformance suite or a framework;
backends know no CLI; gemma_core's modules import each other without a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "jax", "jaxlib", "tensorflow", "keras", "flax")
# optional readers the formats may import inside the function that needs them (never at the top)
FORMAT_LIBRARIES = ("gguf", "h5py", "orbax", "sentencepiece", "ml_dtypes", "safetensors", "jax", "torch")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module top level) for every import outside `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    package = _module_name(path).rpartition(".")[0] if path.name != "__init__.py" else _module_name(path)
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    name = f"{base}.{child.module}" if child.module else base
                else:
                    name = child.module or ""
                found.append((name, top))
                found.extend((f"{name}.{alias.name}", top) for alias in child.names)
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                         ast.ClassDef)))

    visit(tree, True)
    return found


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _root(name: str) -> str:
    return name.split(".")[0]


def test_the_spec_never_imports_a_backend_the_conformance_suite_or_a_framework() -> None:
    bad = [f"{p.relative_to(ROOT)} imports {name}" for p in _sources("gemma_core")
           if p.name != "cli.py" for name, _ in _imports(p)
           if _root(name) in ("backends", "conformance")]
    # the CLI runs the conformance suite on request (lazily, inside `gemma conformance`)
    bad += [f"gemma_core/cli.py imports {name} at the top" for name, top in
            _imports(ROOT / "gemma_core" / "cli.py") if top and _root(name) in ("backends", "conformance")]
    bad += [f"{p.relative_to(ROOT)} imports {name} at the top" for p in _sources("gemma_core")
            for name, top in _imports(p) if top and _root(name) in FRAMEWORKS]
    assert not bad, bad


def test_formats_import_only_numpy_at_the_top() -> None:
    bad = [f"{p.relative_to(ROOT)} imports {name}" for p in _sources("gemma_core/formats")
           for name, top in _imports(p)
           if top and _root(name) in FORMAT_LIBRARIES and _root(name) != "ml_dtypes"]
    assert not bad, bad


def test_backends_know_no_cli_and_no_conformance() -> None:
    bad = [f"{p.relative_to(ROOT)} imports {name}" for p in _sources("backends")
           for name, _ in _imports(p)
           if name.startswith("gemma_core.cli") or _root(name) == "conformance"]
    assert not bad, bad


def test_gemma_core_has_no_import_cycle() -> None:
    modules = {_module_name(p): p for p in _sources("gemma_core")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported, _ in _imports(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and imported != "gemma_core":
                targets.add(imported)
        edges[name] = targets
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(modules):
        if module not in state and (cycle := walk(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_importing_gemma_core_loads_no_framework() -> None:
    code = ("import sys, gemma_core, gemma_core.loading, gemma_core.formats.convert; "
            f"print([m for m in {FRAMEWORKS!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
