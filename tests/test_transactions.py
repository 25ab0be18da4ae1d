"""Writes are transactions: convert/quantize never touch their source, never lose an update, clean
up after signals and report filesystem failures in one line (gemma_core.transaction)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import gemma_core
from gemma_core.checkpoint import save_checkpoint
from gemma_core.cli import main
from gemma_core.errors import CheckpointError
from gemma_core.formats.convert import convert, detect, quantize
from gemma_core.presets import PRESETS
from gemma_core.transaction import LeftoverWarning, write_transaction, writer_tag
from gemma_core.weights import random_weights

ROOT = Path(__file__).resolve().parents[1]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or the file itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny() -> tuple:
    config = PRESETS["tiny-gemma3"]
    return config, random_weights(config, 0)


@pytest.fixture
def models(tmp_path: Path, tiny) -> Path:
    """models/src (an HF folder) beside models/sibling.txt."""
    save_checkpoint(tmp_path / "models" / "src", *tiny)
    (tmp_path / "models" / "sibling.txt").write_text("keep me")
    return tmp_path / "models"


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("dst", ["models", "models/src", "models/./src/../src", "models/src/inner",
                                 "models/src/config.json", "."])
def test_destination_around_or_inside_the_source_is_refused(models: Path, dst: str,
                                                            overwrite: bool) -> None:
    before = snapshot(models)
    target = models.parent / dst
    with pytest.raises(CheckpointError, match=r"destination (is|contains|lies inside) the source"):
        convert(models / "src", target, "hf", overwrite=overwrite)
    assert snapshot(models) == before


def test_cli_convert_into_the_parent_with_overwrite_keeps_the_source(models: Path, capsys) -> None:
    before = snapshot(models)
    assert main(["convert", str(models / "src"), str(models), "--to", "hf", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gemma: error:") and "contains the source" in err and "\n" not in err
    assert snapshot(models) == before


def test_symlinked_destination_resolving_to_the_source_is_refused(models: Path) -> None:
    link = models.parent / "link"
    link.symlink_to(models / "src")
    before = snapshot(models)
    with pytest.raises(CheckpointError, match="the destination is the source"):
        convert(models / "src", link, "hf", overwrite=True)
    (models.parent / "parent-link").symlink_to(models)
    with pytest.raises(CheckpointError, match="contains the source"):
        convert(models / "src", models.parent / "parent-link", "hf", overwrite=True)
    assert snapshot(models) == before


def test_hard_link_of_a_source_file_is_refused(tmp_path: Path, models: Path) -> None:
    convert(models / "src", tmp_path / "m.gguf", "gguf")
    os.link(tmp_path / "m.gguf", tmp_path / "same.gguf")
    with pytest.raises(CheckpointError, match="the destination is the source"):
        convert(tmp_path / "m.gguf", tmp_path / "same.gguf", "gguf", overwrite=True)


def test_quantize_refuses_its_source_too(models: Path) -> None:
    before = snapshot(models)
    with pytest.raises(CheckpointError, match="contains the source"):
        quantize(models / "src", models, "int8", overwrite=True)
    assert snapshot(models) == before


def test_a_fifo_source_is_refused_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file or folder"):
        detect(fifo)  # would block forever on open() if it were read
    with pytest.raises(CheckpointError, match="not a regular file or folder"):
        convert(fifo, tmp_path / "out", "hf")
    with pytest.raises(CheckpointError, match="not a regular file"):
        gemma_core.load(fifo)


def test_two_writers_to_one_new_destination_cannot_both_succeed(tmp_path: Path) -> None:
    dst = tmp_path / "out.bin"
    barrier = threading.Barrier(2)
    results: list[str] = []

    def writer(tag: str) -> None:
        try:
            with write_transaction(dst) as tmp:
                tmp.write_text(tag)
                barrier.wait(timeout=10)  # both have written; both now try to put theirs in place
            results.append(f"ok {tag}")
        except CheckpointError as e:
            results.append(f"refused {e}")

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.split()[0] for r in results) == ["ok", "refused"], results
    winner = next(r.split()[1] for r in results if r.startswith("ok"))
    assert dst.read_text() == winner
    assert "created by another process" in next(r for r in results if r.startswith("refused"))
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_a_destination_appearing_during_the_write_is_not_replaced(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="created by another process"), \
            write_transaction(dst) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("mine")
        dst.mkdir()  # another writer got there first
        (dst / "y").write_text("theirs")
    assert snapshot(dst) == {"y": b"theirs"}
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_overwrite_replaces_in_one_step_and_restores_on_failure(tmp_path: Path, kind: str) -> None:
    dst = tmp_path / "out"

    def fill(path: Path, text: str) -> None:
        if kind == "file":
            path.write_text(text)
        else:
            path.mkdir()
            (path / "f").write_text(text)

    fill(dst, "old")
    before = snapshot(dst)
    with pytest.raises(RuntimeError, match="boom"), write_transaction(dst, overwrite=True) as tmp:
        fill(tmp, "new")
        raise RuntimeError("boom")
    assert snapshot(dst) == before
    with write_transaction(dst, overwrite=True) as tmp:
        fill(tmp, "new")
    assert list(snapshot(dst).values()) == [b"new"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _convert_script(src: Path, dst: Path, extra: str = "") -> str:
    """A child process running `gemma convert src dst --to gguf` that stops after writing its
    partial output (prints "written" and sleeps), so a signal can reach it mid-transaction."""
    return textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        {extra}
        from gemma_core import cli
        from gemma_core.formats import gguf_write
        real = gguf_write.write
        def slow(path, ckpt, kind, bar):
            real(path, ckpt, kind, bar)
            print("written", flush=True)
            time.sleep(120)
        gguf_write.write = slow
        sys.exit(cli.main(["convert", {str(src)!r}, {str(dst)!r}, "--to", "gguf"]))
    """)


def _start_and_wait(script: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "written", (line, proc.stderr.read() if proc.stderr else "")
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminating_signal_removes_the_partial_output(tmp_path: Path, models: Path, sig) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = _start_and_wait(_convert_script(models / "src", out / "m.gguf"))
    assert any(p.name.startswith(".m.partial-") for p in out.iterdir())
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "partial output was removed" in err and "Traceback" not in err
    assert os.listdir(out) == []


def test_leftovers_of_a_killed_write_are_removed_by_the_next_one(tmp_path: Path, models: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = _start_and_wait(_convert_script(models / "src", out / "m.gguf"))
    proc.kill()
    proc.communicate(timeout=60)
    leftovers = [p.name for p in out.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".m.partial-")
    with pytest.warns(LeftoverWarning, match="left by an interrupted write"):
        convert(models / "src", out / "m.gguf", "gguf")
    assert os.listdir(out) == ["m.gguf"]


def test_a_previous_output_moved_aside_by_a_killed_write_is_restored(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    aside = tmp_path / f".out.old-{writer_tag(999999999)}-abcd"  # a dead pid: its writer is gone
    aside.mkdir()
    (aside / "f").write_text("previous")
    with pytest.warns(LeftoverWarning, match="restored the previous output"), \
            write_transaction(dst, overwrite=True) as tmp:
        assert snapshot(dst) == {"f": b"previous"}
        tmp.mkdir()
        (tmp / "f").write_text("new")
    assert snapshot(dst) == {"f": b"new"}
    assert os.listdir(tmp_path) == ["out"]


def test_another_machines_partial_output_is_left_alone(tmp_path: Path) -> None:
    """In a folder shared between machines (NFS, containers' volume), a writer is judged only by
    the machine it runs on: another's partial output, or a name of another form, stays."""
    theirs = tmp_path / ".out.partial-999999999-0000beef-abcd"
    odd = tmp_path / ".out.partial-999999999-abcd"
    for path in (theirs, odd):
        path.write_bytes(b"half")
    with write_transaction(tmp_path / "out") as tmp:
        tmp.write_bytes(b"whole")
    assert sorted(os.listdir(tmp_path)) == sorted(["out", theirs.name, odd.name])


def test_a_pid_beyond_the_kernels_range_is_a_writer_gone(tmp_path: Path) -> None:
    """A hand-made name with a pid no process can have (os.kill raises OverflowError) must not
    break every later write to the folder: it is removed like a dead writer's."""
    huge = tmp_path / f".out.partial-{writer_tag(2**70)}-abcd"
    huge.write_bytes(b"half")
    with pytest.warns(LeftoverWarning, match="left by an interrupted write"), \
            write_transaction(tmp_path / "out") as tmp:
        tmp.write_bytes(b"whole")
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("to", ["hf", "gguf", "gemma-pytorch", "keras-hub", "flax"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, models: Path, to: str) -> None:
    """The file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) stands in for a full disk: every write
    past 64 KiB fails with EFBIG, as writes fail with ENOSPC on a full one."""
    pytest.importorskip({"gemma-pytorch": "torch", "keras-hub": "h5py", "flax": "orbax.checkpoint"}
                        .get(to, "numpy"))
    out = tmp_path / "out"
    out.mkdir()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from gemma_core import cli
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        sys.argv = ["gemma", "convert", {str(models / "src")!r}, {str(out / "m")!r}, "--to", {to!r}]
        sys.exit(cli.main())  # as the `gemma` program runs it
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("gemma: error:"), proc.stderr
    assert str(out / "m") in lines[0] and "nothing was written" in lines[0]
    assert os.listdir(out) == []


def test_an_unwritable_destination_is_one_line(tmp_path: Path, models: Path, capsys) -> None:
    if os.geteuid() == 0:  # root ignores permission bits: use a filesystem that refuses writes
        target = Path("/sys/gemma-core-test-output")
        if os.access("/sys", os.W_OK) and not Path("/sys").is_mount():
            pytest.skip("no unwritable folder to test with")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "out"
    assert main(["convert", str(models / "src"), str(target), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gemma: error: {target}: cannot write") and "\n" not in err
    assert not target.exists()


def test_a_temporary_names_writer_is_read_after_its_last_kind() -> None:
    """The writer of a partial output or an aside is read after the name's last `.partial-` or
    `.old-` (a destination stem may hold one); other names have none."""
    from gemma_core.transaction import build_prefix, temporary_writer

    tag = writer_tag(42)
    assert temporary_writer(f".a.partial-b.old-{tag}-ff.npz") == f"{tag}-ff.npz"
    assert temporary_writer(f".a.old-b.partial-{tag}-ff") == f"{tag}-ff"
    assert temporary_writer(f"{build_prefix()}x") == f"{writer_tag()}-x"
    assert temporary_writer("plain.npz") is None and temporary_writer(".old-x") is None
