"""Shared fixtures. Expensive objects (transformers models) are built once per session."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
# The CLI's default engine is the fastest installed one (gemma_core.engine_choice); the suite's
# CLI runs compare against the API's reference (numpy float32) unless a test names another
# (tests/test_compile_cache.py clears this to test the choice). Compiled steps cache into a
# folder of this run, not the user's home.
os.environ.setdefault("GEMMA_BACKEND", "numpy")
# (each xdist worker its own: the variable is inherited from the controlling process)
if "GEMMA_CACHE_DIR" not in os.environ or os.environ.get("GEMMA_TEST_CACHE") == os.environ["GEMMA_CACHE_DIR"]:
    import atexit
    import shutil
    import tempfile

    os.environ["GEMMA_CACHE_DIR"] = os.environ["GEMMA_TEST_CACHE"] = tempfile.mkdtemp(
        prefix="gemma-test-cache-")
    atexit.register(shutil.rmtree, os.environ["GEMMA_CACHE_DIR"], ignore_errors=True)  # ~1 GB


def _release_memory() -> None:
    """Return freed heap memory to the OS. glibc keeps what large models and logits freed
    (its mmap threshold grows as they are freed), so without this the suite's process grew to
    ~21 GB by the end of the real-weight tests and CI's 24 GB machine killed it soon after;
    trimmed, the real-weight conformance tests hold ~6 GB instead of ~15."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(autouse=True, scope="module")
def _trim_after_module() -> Iterator[None]:
    yield
    _release_memory()


@pytest.hookimpl(trylast=True)  # after pytest's own grouping of tests by fixture params
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-weight tests first (each module's in its own order): they need ~5 GB over the
    process's resident set, and the suite's other modules leave ~6 GB of framework state behind
    (XLA and tf.function executables, allocator pools), so run last they peaked at 18.3 GB on
    CI's 24 GB machine. A stable sort: everything else keeps its order."""
    items.sort(key=lambda item: item.get_closest_marker("real_weights") is None)
    for item in items:  # under xdist (-n 2) the real-weight tests run on one worker
        if item.get_closest_marker("real_weights") is not None:
            item.add_marker(pytest.mark.xdist_group("real-weights"))


@pytest.fixture(autouse=True)
def _trim_after_real_weight_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if request.node.get_closest_marker("real_weights") is not None:
        _release_memory()


# The exhaustive sweeps (every case of a long sweep, where the default run keeps a representative
# subset proving the same rules) run only with GEMMA_EXHAUSTIVE=1; they are also marked slow.
EXHAUSTIVE = os.environ.get("GEMMA_EXHAUSTIVE", "") not in ("", "0")


def exhaustive(*values: object, id: str | None = None) -> object:
    """A `pytest.param` of an exhaustive sweep: marked slow, skipped unless GEMMA_EXHAUSTIVE=1."""
    return pytest.param(*values, id=id, marks=[
        pytest.mark.slow,
        pytest.mark.skipif(not EXHAUSTIVE, reason="exhaustive sweep: set GEMMA_EXHAUSTIVE=1")])


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty user cache folder (GEMMA_CACHE_DIR) with the load cache on and the default bound."""
    monkeypatch.setenv("GEMMA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GEMMA_LOAD_CACHE", raising=False)
    monkeypatch.delenv("GEMMA_CACHE_MAX_BYTES", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# A mixed corpus: code, digits, repeated spaces/newlines, tabs, emoji, CJK, accented text.
CORPUS = [
    "def f(x):\n    return x * 2  # double it\n",
    "for i in range(10):\n\tprint(i, i ** 2)\n",
    "The year 2024 had 366 days; 12345 + 678 = 13023.",
    "a  b   c\t\td\n\n\ne    f",
    "Emoji 😀🎉👍 and CJK 你好世界, 日本語のテキスト, 한국어",
    "Café naïve résumé Ångström façade São Paulo Zürich",
    "Hello world, hello World! HELLO?",
    "<html><body class=\"x\">Text &amp; more</body></html>",
]


@pytest.fixture(scope="session")
def spm_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SentencePiece model trained at test time with Gemma's settings (BPE, byte
    fallback, split digits, whitespace pieces, no dummy prefix, identity normalisation) and
    Gemma 3's special-token layout for the first ids."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(CORPUS * 40))
    control = ["<mask>", *[f"<unused{i}>" for i in range(100)], "<start_of_turn>", "<end_of_turn>"]
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=512,
        model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, add_dummy_prefix=False, normalization_rule_name="identity",
        split_by_whitespace=False, character_coverage=1.0, minloglevel=2,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", control_symbols=control,
        user_defined_symbols=["\n", "\n\n", "\u2581\u2581", "\u2581\u2581\u2581\u2581", "\t"],
    )
    return folder / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory: pytest.TempPathFactory, spm_file: Path) -> Path:
    """A tiny Gemma 3 Hugging Face folder (random weights, seed 3) with the test tokenizer."""
    import shutil

    from gemma_core.checkpoint import save_checkpoint
    from gemma_core.presets import get_preset
    from gemma_core.weights import random_weights

    config = get_preset("tiny-gemma3")
    path = save_checkpoint(tmp_path_factory.mktemp("tiny") / "model", config, random_weights(config, 3))
    shutil.copy(spm_file, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def hf(face):  # type: ignore[no-untyped-def]
    """transformers' loss and gradients (float32 autograd) on a test module's `face` (its
    config, `random_weights(config, 0)` and batch)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_reference import hf_loss_and_grads

    return hf_loss_and_grads(face.config, 0, face.ids, face.mask, face.labels)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """With GEMMA_RSS_LOG=FILE, append each test's resident memory after it (VmRSS, VmHWM in
    MiB) to FILE: where the suite's peak comes from."""
    log = os.environ.get("GEMMA_RSS_LOG")
    if not log:
        return
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    mib = {k: int(v.split()[0]) // 1024 for k, v in fields.items()}
    with open(log, "a") as f:
        f.write(f"{mib.get('VmRSS', 0)}\t{mib.get('VmHWM', 0)}\t{item.nodeid}\n")
