"""The prepared-weights cache: a backend's own form of a load-cache entry's weights (fused
projections stacked, cast to the compute dtype), saved once and mapped by the next load.

A warm `gemma generate` on the embedded model spent ~0.45 s making that form from the load
cache's float32 weights (stacking q/k/v and gate/up: 0.16 s; casting 268M floats to bf16: 0.3 s)
and held both copies (2.1 GB resident). A backend that can save and map its arrays
(`Backend.save_prepared` / `load_prepared`: torch) keeps the form in
`gemma_core.compile_cache.cache_dir()/prepared/`, under that folder's size bound; `gemma cache
clear` removes it and `GEMMA_LOAD_CACHE=0` turns it off with the load cache.

Only float weights of a causal LM or base model, without an adapter, are kept (what the default
engine loads): quantised kernels' layouts change between framework releases. The key: the load
cache entry's own key (the source file's identity, the reading code, the load settings), the
backend's name and its framework's version, a hash of the code that prepares weights (the
backend's package and gemma-core's model, graph, backend and weights modules), the dtype,
device and task. An entry is used only when its stored key equals that key and its arrays have
the names, shapes and dtype its weights would be prepared with; anything else is a miss, and
the entry is written again (in one transaction).
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gemma_core.backend import Backend
from gemma_core.errors import GemmaError

FORMAT = 1
# gemma-core's code that decides what a prepared weight holds (besides the backend's own package)
_PREPARING = ("model.py", "graph.py", "backend.py", "weights.py", "prepared_cache.py")


def _code_hash(backend: Backend) -> str:
    from gemma_core.compile_cache import code_hash

    root = Path(__file__).parent
    package = Path(sys.modules[type(backend).__module__].__file__ or "").parent
    return code_hash([*(root / name for name in _PREPARING), *sorted(package.glob("*.py"))])


def entry_key(source: str, backend: Backend, dtype: str, device: str | None, task: str) -> str | None:
    """The key of the prepared form of the weights of the load-cache entry whose key is
    `source`, or None where none is kept: a backend that cannot save its arrays, a device other
    than the host, or the cache turned off."""
    from gemma_core import load_cache

    if not backend.saves_prepared or device not in (None, "cpu") or not load_cache.enabled():
        return None  # (kept for the host only: a mapped file is host memory)
    return json.dumps({"format": FORMAT, "source": source, "backend": backend.name,
                       "framework": backend.framework_version(), "code": _code_hash(backend),
                       "dtype": dtype, "device": "cpu", "task": task}, sort_keys=True)


def _source_path(key: str) -> Path:
    """The load-cache entry file the prepared entry of `key` derives from."""
    from gemma_core import load_cache

    return load_cache.entry_path(json.loads(json.loads(key)["source"]))


def entry_name(key: str) -> str:
    """What names the entry of `key`, and anything else kept of these weights (torch's decode
    programs): the source file's path and load settings, the backend, dtype and task; not the
    code or framework versions, so a changed key replaces a file rather than adding another."""
    k = json.loads(key)
    source = json.loads(k["source"])
    return json.dumps([source["path"], source["settings"], k["backend"], k["dtype"], k["task"]],
                      sort_keys=True)


def entry_path(key: str) -> Path:
    """Where the entry of `key` lives: a hash of `entry_name(key)`."""
    from gemma_core.compile_cache import cache_dir

    return cache_dir() / "prepared" / f"{hashlib.sha256(entry_name(key).encode()).hexdigest()[:32]}.bin"


def lookup(key: str, backend: Backend, expected: Mapping[str, tuple[tuple[int, ...], str]]
           ) -> dict[str, Any] | None:
    """The prepared weights kept for `key`, if they are whole and each has the (shape, dtype)
    `expected` gives its name; else None."""
    import contextlib
    import os

    path = entry_path(key)
    if not path.is_file():
        return None
    try:
        stored_key, weights = backend.load_prepared(path)
    except Exception:  # damaged or foreign: whatever the framework's reader raises
        return None
    if stored_key != key or not isinstance(weights, dict) or set(weights) != set(expected):
        return None
    if any(backend.array_signature(weights[name]) != want for name, want in expected.items()):
        return None
    with contextlib.suppress(OSError):  # a use counts for the folder's LRU bound
        os.utime(path)
    return weights


def store(key: str, backend: Backend, weights: Mapping[str, Any], nbytes: int) -> Path | None:
    """Keep `weights` (`nbytes` in all) for `key`, then trim the cache folder to its bound,
    least recently used files first (the source entry was just used: it goes last); None when
    the entry would not fit the bound beside its source entry, or cannot be written (a warning
    says why: the load itself goes on)."""
    from gemma_core.compile_cache import max_bytes, trim
    from gemma_core.transaction import write_transaction

    source = _source_path(key)
    if nbytes + (source.stat().st_size if source.is_file() else 0) > max_bytes():
        return None
    path = entry_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with write_transaction(path, overwrite=True) as tmp:
            backend.save_prepared(tmp, key, dict(weights))
    except (GemmaError, OSError) as e:
        warnings.warn(f"prepared-weights cache: not kept ({e})", stacklevel=2)
        return None
    trim()
    return path
