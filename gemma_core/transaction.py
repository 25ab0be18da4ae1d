"""Writes as transactions: an output appears whole or not at all, and never touches its source.

`check_destination(src, dst, overwrite)` refuses a destination that is, contains or lies inside
the source (symlinks resolved). `write_transaction(dst, overwrite)` yields a temporary path
beside `dst` named `.{stem}.partial-{pid}-{host}-{hex}{suffix}` (`writer_tag`); when the block
ends it is renamed into place in one step:

- new destination: `renameat2(RENAME_NOREPLACE)`, so of two writers racing for one new path
  exactly one succeeds (the other gets a clear error, not a silent lost update);
- replaced destination (`overwrite=True`): `renameat2(RENAME_EXCHANGE)` swaps old and new in one
  step, then the old copy is removed. Where the kernel or filesystem lacks renameat2 the
  fallbacks are `link` (files) / an exclusive `mkdir` (folders) and rename-aside with the old
  copy restored on any failure.

SIGTERM and SIGHUP during the block remove the partial output and end the process with
128 + signal (the `Interrupted` exception carries it). Leftovers of a process killed outright
(SIGKILL, power loss) are found by the next write to the same destination: partial outputs of
dead processes are removed, and a previous output moved aside is put back. A process is judged
dead only by the machine it ran on (the name's host): a folder shared between machines (NFS, a
volume of several containers) keeps another machine's partial outputs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from gemma_core.errors import CheckpointError

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)


class Interrupted(BaseException):
    """A write was stopped by a signal (SIGTERM, SIGHUP); its partial output has been removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.signum = signum


class LeftoverWarning(UserWarning):
    """A partial output of an earlier, killed write was found beside the destination."""


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_source(path: str | os.PathLike[str]) -> Path:
    """`path` once it is known to exist as a regular file or a folder: a FIFO, socket or
    device is refused before anything opens it (reading a FIFO would block)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if not (path.is_file() or path.is_dir()):
        raise CheckpointError(f"{path}: not a regular file or folder (a FIFO, socket or device?)")
    return path


def check_destination(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                      overwrite: bool) -> tuple[Path, Path]:
    """(src, dst) as paths once `dst` may be written: it is not, does not contain and does not
    lie inside `src` (symlinks resolved, hard links found by `samefile`), and it is new unless
    `overwrite`. `src` must be a regular file or a folder (a FIFO or device is refused)."""
    src, dst = check_source(src), Path(dst)
    real_src, real_dst = src.resolve(), dst.resolve()
    same = dst.exists() and os.path.samefile(src, dst)
    if same or real_dst == real_src:
        raise CheckpointError(f"{dst}: the destination is the source")
    if _is_within(real_src, real_dst):
        raise CheckpointError(f"{dst}: the destination contains the source {src}; "
                              "writing it would delete the source")
    if _is_within(real_dst, real_src):
        raise CheckpointError(f"{dst}: the destination lies inside the source {src}")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise CheckpointError(f"{dst}: already exists (pass --overwrite to replace it)")
    return src, dst


def remove(path: Path) -> None:
    """Remove a file, link or folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False where the kernel or filesystem does not offer it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), os.fspath(dst))


def _place_new(tmp: Path, dst: Path) -> None:
    """Rename `tmp` to `dst`, failing with EEXIST if `dst` appeared meanwhile."""
    if _renameat2(tmp, dst, _RENAME_NOREPLACE):
        return
    if tmp.is_dir():
        os.mkdir(dst)  # exclusive: EEXIST if another writer got there first
        os.rename(tmp, dst)  # replaces the empty folder this call made
    else:
        os.link(tmp, dst)
        tmp.unlink()


def _replace(tmp: Path, dst: Path) -> None:
    """Put `tmp` in place of the existing `dst` in one step (or restore `dst` on failure)."""
    if _renameat2(tmp, dst, _RENAME_EXCHANGE):
        remove(tmp)  # now the old output
        return
    if not tmp.is_dir() and not dst.is_dir():
        os.replace(tmp, dst)
        return
    old = dst.parent / f".{dst.stem}.old-{writer_tag()}-{secrets.token_hex(4)}{dst.suffix}"
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    remove(old)


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def writer_tag(pid: int | None = None) -> str:
    """`<pid>-<host>`, the writer's part of a partial output's name: this process (or `pid`) on
    this machine (8 hex digits of its name)."""
    return f"{os.getpid() if pid is None else pid}-{_HOST}"


def writer_gone(tag: str) -> bool:
    """Whether the writer named at the start of `tag` (`<pid>-<host>-...`, `writer_tag`) is known
    to have ended: a process of this machine that no longer runs. Another machine's writer, or a
    name of another form, is not judged."""
    pid, _, rest = tag.partition("-")
    return pid.isdigit() and rest.split("-", 1)[0] == _HOST and not _pid_alive(int(pid))


TEMPORARY_KINDS = ("partial", "old")  # `.{stem}.{kind}-<writer>-<hex>{suffix}`, this module's
BUILD_PREFIX = ".build-"  # `.build-<writer>-<random>`: a folder a long build writes into
_TEMPORARY = re.compile(rf"\..+\.(?:{'|'.join(TEMPORARY_KINDS)})-(.*)", re.DOTALL)


def build_prefix() -> str:
    """The name prefix of a build folder of this process (`.build-<pid>-<host>-`)."""
    return f"{BUILD_PREFIX}{writer_tag()}-"


def temporary_writer(name: str) -> str | None:
    """The writer part (`<pid>-<host>-...`) of a temporary name this project makes: a build
    folder (`build_prefix`), a partial output or a previous output moved aside
    (`write_transaction`); None for any other name."""
    if name.startswith(BUILD_PREFIX):
        return name[len(BUILD_PREFIX):]
    match = _TEMPORARY.match(name)  # (the last `.partial-`/`.old-`: a stem may hold one too)
    return match.group(1) if match else None


def writing(name: str) -> bool:
    """Whether `name` is a temporary name of a write that may still run (`temporary_writer`,
    its writer not known to be gone: another machine's, or a name of another form, e.g. an
    older version's, counts as running): another process's trim or cleanup leaves it alone."""
    writer = temporary_writer(name)
    return writer is not None and not writer_gone(writer)


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (a pid beyond the kernel's range runs nowhere)
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(dst: Path) -> list[Path]:
    """Remove partial outputs of dead writers to `dst` and restore an output they moved aside;
    returns what was found. Live writers' partial outputs are left alone."""
    found: list[Path] = []
    parent = dst.parent if dst.parent.is_dir() else None
    if parent is None:
        return found
    for kind in TEMPORARY_KINDS:
        for path in sorted(parent.glob(f".{dst.stem}.{kind}-*{dst.suffix}")):
            if writing(path.name):
                continue
            found.append(path)
            if kind == "old" and not (dst.exists() or dst.is_symlink()):
                os.rename(path, dst)
                warnings.warn(f"{dst}: restored the previous output that an interrupted write "
                              f"had moved aside ({path.name})", LeftoverWarning, stacklevel=3)
            else:
                remove(path)
                warnings.warn(f"{dst}: removed {path.name}, left by an interrupted write",
                              LeftoverWarning, stacklevel=3)
    return found


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP raise `Interrupted` inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def write_transaction(dst: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `dst` to; on success it becomes `dst` in one rename, on
    any failure (an exception, SIGTERM, SIGHUP) it is removed and `dst` is as it was. Errors of
    the filesystem (disk full, read-only, permissions) become one `CheckpointError` naming the
    destination and the cause."""
    dst = Path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot create the folder {dst.parent} ({e.strerror})") from None
    clean_leftovers(dst)
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise CheckpointError(f"{dst}: already exists (pass --overwrite to replace it)")
    tmp = dst.parent / f".{dst.stem}.partial-{writer_tag()}-{secrets.token_hex(4)}{dst.suffix}"
    try:
        with _signals_raise():
            try:
                yield tmp
                if dst.exists() or dst.is_symlink():
                    if not overwrite:
                        raise CheckpointError(f"{dst}: was created by another process while this "
                                              "one wrote it; nothing was replaced")
                    _replace(tmp, dst)
                else:
                    try:
                        _place_new(tmp, dst)
                    except FileExistsError:
                        if not overwrite:
                            raise CheckpointError(f"{dst}: was created by another process while "
                                                  "this one wrote it; nothing was replaced") from None
                        _replace(tmp, dst)
            except BaseException:
                remove(tmp)
                raise
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot write ({_cause(e)}); nothing was written") from None


def _cause(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}"
