"""The user cache of compiled steps, shared across processes: torch inductor's on-disk caches and
JAX's persistent compilation cache, in one folder with a size bound (`gemma cache info|clear`).

The folder is `$GEMMA_CACHE_DIR`, else `$XDG_CACHE_HOME/gemma-core`, else `~/.cache/gemma-core`;
`torch/` and `jax/` below it, `load/`, the decoded GGUF files of `gemma_core.load_cache`
(which trims the folder after writing an entry), `prepared/` (`gemma_core.prepared_cache`) and
`torch-aot/`, torch's kept decode programs (`backends/torch/aot.py`). The bound is
`$GEMMA_CACHE_MAX_BYTES` (default 4 GiB: the real 270M's load entry, prepared weights and decode
program take 2.2 GB together): when a compiling process starts and when it exits, the least
recently written files go until the folder fits (a write still running is left alone). Nothing
here runs at import of gemma_core: a backend calls `enable_torch`/`enable_jax` when it is asked
to compile, and a cache location the user set (TORCHINDUCTOR_CACHE_DIR,
jax_compilation_cache_dir) is left as it is.

What each engine gets from it on the CPU: JAX reads its compiled executables back, so a warm
process skips XLA's compile (a tiny preset's process: 31 s cold, 10 s warm, on a loaded 2-core
VM). Unfrozen torch graphs (float32, dequantised 4-bit) hit inductor's FX graph cache whole in
the next process. Torch's frozen bf16 step under `torch.compile` is not reusable on torch
2.13 (its decode step is kept as an AOTInductor program instead, `backends/torch/aot.py`):
inductor bypasses the
FX graph cache for graphs holding oneDNN-packed weights ("mkldnn tensors unpickleable"),
AOTAutograd's cache refuses frozen graphs, and the C++ it generates differs between processes
(a second process on the real 270M compiled for as long as the first: 252 s of inductor
lowering, 145 s of it in the C++ compiler, on the loaded VM)"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_BYTES = 4 * 2**30
# XLA programs that compiled faster than this are not written (JAX's default is 1 s: the decode
# step of a tiny preset compiles in less, the real 270M's in ~10 s)
JAX_MIN_COMPILE_SECS = 0.2

_enabled: set[str] = set()


def code_hash(paths: Iterable[Path]) -> str:
    """16 hex digits of the SHA-256 of `paths`' bytes, in the order given: the code a cache
    entry's key depends on (the load cache's readers, the prepared weights' code, torch's
    decode programs)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """The user cache folder (not created here)."""
    if os.environ.get("GEMMA_CACHE_DIR"):
        return Path(os.environ["GEMMA_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gemma-core"


def max_bytes() -> int:
    """The size bound: `$GEMMA_CACHE_MAX_BYTES` (a byte count; 0 keeps nothing), else 4 GiB."""
    value = os.environ.get("GEMMA_CACHE_MAX_BYTES")
    if not value:
        return DEFAULT_MAX_BYTES
    try:
        n = int(value)
    except ValueError:
        from gemma_core.errors import ConfigError

        raise ConfigError(f"GEMMA_CACHE_MAX_BYTES: not a byte count: {value!r}") from None
    return max(n, 0)


def _used(st: os.stat_result) -> float:
    """A file's last use: the later of its access and modification times (access times are
    coarse or off on many mounts); the order in which `trim` removes files."""
    return max(st.st_atime, st.st_mtime)


def last_use(path: Path) -> float:
    """`path`'s last use (`_used`), 0 where it cannot be read (removed meanwhile)."""
    try:
        return _used(path.stat())
    except OSError:
        return 0.0


def _files(root: Path) -> list[tuple[float, int, Path]]:
    """(last use, size, path) of every regular file below `root`."""
    out = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            try:
                st = path.lstat()
            except OSError:  # removed by another process meanwhile
                continue
            if not path.is_symlink():
                out.append((_used(st), st.st_size, path))
    return out


def _in_flight(rel: Path) -> bool:
    """Whether `rel` (below the cache folder) is, or lies in, the output of a write still running:
    a decode program's build folder (empty for most of its compile), a partial output or a
    previous output moved aside for a moment (`gemma_core.transaction`) whose writer has not
    ended. `trim` leaves those alone."""
    from gemma_core.transaction import writing

    return any(writing(part) for part in rel.parts)


@dataclass(frozen=True)
class CacheInfo:
    """What `gemma cache info` prints: the folder, its bytes and files, per engine, and the bound."""

    path: Path
    size: int
    files: int
    parts: dict[str, int]
    limit: int


def info() -> CacheInfo:
    """The cache folder's size, in all and per engine subfolder."""
    root = cache_dir()
    files = _files(root) if root.is_dir() else []
    parts: dict[str, int] = {}
    for _, size, path in files:
        part = path.relative_to(root).parts[0]
        parts[part] = parts.get(part, 0) + size
    return CacheInfo(root, sum(s for _, s, _ in files), len(files), parts, max_bytes())


def trim(limit: int | None = None) -> int:
    """Remove the least recently used files until the folder holds at most `limit` bytes
    (default `max_bytes()`); returns the bytes removed. Emptied folders are removed too."""
    root = cache_dir()
    if not root.is_dir():
        return 0
    limit = max_bytes() if limit is None else limit
    files = sorted(_files(root), key=lambda f: f[0])
    total = sum(s for _, s, _ in files)
    removed = 0
    for _, size, path in files:
        if total - removed <= limit:
            break
        if _in_flight(path.relative_to(root)):
            continue
        try:
            path.unlink()
        except OSError:
            continue
        removed += size
    for folder, _, _ in os.walk(root, topdown=False):  # children first; a full folder stays
        if folder != str(root) and not _in_flight(Path(folder).relative_to(root)):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return removed


def clear() -> int:
    """Remove the whole cache folder; returns the bytes it held."""
    root = cache_dir()
    size = info().size
    if root.is_dir():
        shutil.rmtree(root, ignore_errors=True)
    return size


def _start(engine: str) -> Path | None:
    """The engine's subfolder, created, the folder trimmed to its bound (now and at exit), or
    None when this process already set the engine up or the bound keeps nothing."""
    if engine in _enabled:
        return None
    _enabled.add(engine)
    if max_bytes() == 0:
        return None
    path = cache_dir() / engine
    path.mkdir(parents=True, exist_ok=True)
    trim()
    atexit.register(trim)
    return path


def enable_torch() -> None:
    """Point torch inductor's on-disk caches (FX graphs, AOTAutograd, C++ kernels) at `torch/`,
    unless TORCHINDUCTOR_CACHE_DIR is set; call before the first compile of the process."""
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # inductor writes its default into the variable when it first looks: that is not the user's
    user_set = os.environ.get("TORCHINDUCTOR_CACHE_DIR") not in (None, default_cache_dir())
    if user_set and "torch" not in _enabled:
        _enabled.add("torch")  # the user's location wins (and is not ours to trim)
        return
    path = _start("torch")
    if path is None:
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # read by inductor at each cache access

    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True


def enable_jax() -> None:
    """Turn on JAX's persistent compilation cache in `jax/`, unless the user configured one
    (JAX_COMPILATION_CACHE_DIR or jax_compilation_cache_dir)."""
    import jax

    if jax.config.jax_compilation_cache_dir and "jax" not in _enabled:
        _enabled.add("jax")
        return
    path = _start("jax")
    if path is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", JAX_MIN_COMPILE_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:  # JAX decides once per process whether the cache is on, at its first compile (the
        # weights' dtype conversions ran before this): ask again
        from jax._src import compilation_cache

        if compilation_cache._cache_checked and not compilation_cache._cache_used:
            compilation_cache.reset_cache()
    except (ImportError, AttributeError):  # another JAX: the cache applies from the next process
        pass


def format_info(cache: CacheInfo) -> str:
    """`gemma cache info`'s lines."""
    lines = [f"path      {cache.path}", f"size      {_mb(cache.size)} in {cache.files} files "
             f"(bound {_mb(cache.limit)}, GEMMA_CACHE_MAX_BYTES)"]
    lines += [f"  {name:<8}{_mb(size)}" for name, size in sorted(cache.parts.items())]
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
