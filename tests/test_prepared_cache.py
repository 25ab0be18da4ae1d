"""The prepared-weights cache (gemma_core.prepared_cache): torch's fused, cast weights of a
load-cache entry, mapped by the next load; the same logits bit for bit as preparing them anew;
damaged, foreign or stale entries are misses and are rewritten; what it does not keep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf_writer import write_gguf

import gemma_core
from gemma_core import prepared_cache
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights

pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

SCALAR = 16  # tiny-gemma3's query_pre_attn_scalar (GGUF does not record it)
IDS = np.array([[2, 7, 9, 11, 13, 17]])


@pytest.fixture(autouse=True)
def cache(fresh_cache: Path) -> Path:
    return fresh_cache


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    config = get_preset("tiny-gemma3")
    return write_gguf(tmp_path / "m.gguf", config, random_weights(config, 5), qtype="F16")


def _prepares(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each time the torch backend prepares weights itself (a prepared-cache miss)."""
    from backends.torch import TorchBackend

    calls: list[str] = []
    real = TorchBackend.prepare_weights

    def counted(self, weights, dtype, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(dtype)
        return real(self, weights, dtype, *args, **kwargs)

    monkeypatch.setattr(TorchBackend, "prepare_weights", counted)
    return calls


def _load(path: Path, dtype: str = "bfloat16", **kw: object) -> gemma_core.Model:
    return gemma_core.load(path, backend="torch", dtype=dtype, query_pre_attn_scalar=SCALAR, **kw)


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "prepared").glob("*.bin")) if (cache / "prepared").is_dir() else []


def _logits(model: gemma_core.Model) -> bytes:
    return model.to_numpy(model.forward(IDS).logits).tobytes()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_mapped_entry_gives_the_logits_of_weights_prepared_anew(
        gguf_file: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    monkeypatch.setenv("GEMMA_LOAD_CACHE", "0")
    fresh = _logits(_load(gguf_file, dtype))
    monkeypatch.delenv("GEMMA_LOAD_CACHE")
    assert not _entries(cache)
    prepares = _prepares(monkeypatch)
    assert _logits(_load(gguf_file, dtype)) == fresh  # the GGUF read, its entries written
    assert len(_entries(cache)) == 1 and prepares == [dtype]
    warm = _load(gguf_file, dtype)
    assert prepares == [dtype]  # mapped, not prepared again
    assert _logits(warm) == fresh
    emb = warm.weights["model.embed_tokens.weight"]
    assert emb.dtype == getattr(torch, dtype) and not emb.untyped_storage().resizable()  # mapped
    emb.add_(1)  # copy-on-write: the file keeps what was written
    assert _logits(_load(gguf_file, dtype)) == fresh


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00" * 64)


def _other_key(path: Path) -> None:
    saved = torch.load(path, weights_only=True)
    torch.save({"key": saved["key"].replace('"task": "causal-lm"', '"task": "base"'),
                "weights": saved["weights"]}, path)


def _short_tensor(path: Path) -> None:
    saved = torch.load(path, weights_only=True)
    name = "model.norm.weight"
    saved["weights"][name] = saved["weights"][name][:-1].clone()
    torch.save(saved, path)


def _other_dtype(path: Path) -> None:
    saved = torch.load(path, weights_only=True)
    name = "model.norm.weight"
    saved["weights"][name] = saved["weights"][name].half()
    torch.save(saved, path)


def _missing_tensor(path: Path) -> None:
    saved = torch.load(path, weights_only=True)
    del saved["weights"]["model.norm.weight"]
    torch.save(saved, path)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _other_key, _short_tensor, _other_dtype,
                                    _missing_tensor])
def test_a_damaged_entry_is_a_miss_and_is_rewritten(gguf_file: Path, cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     damage) -> None:  # type: ignore[no-untyped-def]
    fresh = _logits(_load(gguf_file))
    (entry,) = _entries(cache)
    damage(entry)
    prepares = _prepares(monkeypatch)
    assert _logits(_load(gguf_file)) == fresh and prepares == ["bfloat16"]  # prepared anew
    assert _logits(_load(gguf_file)) == fresh and prepares == ["bfloat16"]  # and kept again


def test_what_is_not_kept(gguf_file: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantised weights (kernel layouts), a preset's random weights, the numpy reference and
    GEMMA_LOAD_CACHE=0 keep no prepared entry; one entry a dtype."""
    _load(gguf_file, quantize="int8")
    gemma_core.load("tiny-gemma3", backend="torch", dtype="bfloat16")
    gemma_core.load(gguf_file, query_pre_attn_scalar=SCALAR)  # numpy
    monkeypatch.setenv("GEMMA_LOAD_CACHE", "0")
    _load(gguf_file)
    assert not _entries(cache)
    monkeypatch.delenv("GEMMA_LOAD_CACHE")
    _load(gguf_file)
    _load(gguf_file, "float32")
    assert len(_entries(cache)) == 2  # one per dtype


def test_an_entry_past_the_size_bound_is_not_written(gguf_file: Path, cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _load(gguf_file)
    load_entry = sum(p.stat().st_size for p in (cache / "load").iterdir())
    for p in _entries(cache):
        p.unlink()
    monkeypatch.setenv("GEMMA_CACHE_MAX_BYTES", str(load_entry + 1000))  # the load entry fits
    _load(gguf_file)
    assert not _entries(cache) and any((cache / "load").iterdir())


def test_a_new_entry_evicts_the_least_recently_used_files_not_its_source(
        gguf_file: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    _load(gguf_file)
    held = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    (entry,) = _entries(cache)
    entry.unlink()
    stale = cache / "jax" / "old-executable"
    stale.parent.mkdir()
    stale.write_bytes(b"x" * 4096)
    os.utime(stale, (1_700_000_000, 1_700_000_000))
    monkeypatch.setenv("GEMMA_CACHE_MAX_BYTES", str(held + 1024))  # all three do not fit
    prepares = _prepares(monkeypatch)
    _load(gguf_file)
    assert prepares == ["bfloat16"] and len(_entries(cache)) == 1
    assert not stale.exists() and any((cache / "load").iterdir())
    _load(gguf_file)
    assert prepares == ["bfloat16"]


def test_the_key_holds_the_backend_framework_and_code() -> None:
    from backends.torch import backend

    key = prepared_cache.entry_key("source-key", backend, "bfloat16", None, "causal-lm")
    assert key is not None
    for part in ('"backend": "torch"', f'"framework": "torch {torch.__version__}"', '"dtype": "bfloat16"',
                 '"source": "source-key"', '"code": "'):
        assert part in key
    assert prepared_cache.entry_key("source-key", backend, "bfloat16", "cuda", "causal-lm") is None
    numpy = gemma_core.backend.get_backend("numpy")
    assert prepared_cache.entry_key("source-key", numpy, "float32", None, "causal-lm") is None


def test_a_failed_write_warns_and_the_load_goes_on(gguf_file: Path, cache: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos")

    monkeypatch.setattr(torch, "save", full)  # how torch reports a full disk
    with pytest.warns(UserWarning, match="prepared-weights cache: not kept"):
        model = _load(gguf_file)
    assert model.forward(IDS).logits is not None and not _entries(cache)


def test_weights_changed_after_the_load_are_prepared_anew(gguf_file: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from gemma_core.formats.gguf import load_gguf

    cached = _logits(_load(gguf_file))  # its entry written
    config, weights, _ = load_gguf(gguf_file, query_pre_attn_scalar=SCALAR)
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1.0
    prepares = _prepares(monkeypatch)
    changed = gemma_core.Model(config, weights, backend="torch", dtype="bfloat16")
    assert prepares == ["bfloat16"] and _logits(changed) != cached


def test_a_new_key_rewrites_the_entry_of_the_same_source(gguf_file: Path, cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Another torch, code or source state: the same file is replaced, not joined by another."""
    _load(gguf_file)
    (before,) = _entries(cache)
    monkeypatch.setattr(prepared_cache, "_code_hash", lambda backend: "changed")
    prepares = _prepares(monkeypatch)
    _load(gguf_file)
    assert prepares == ["bfloat16"] and _entries(cache) == [before]
    _load(gguf_file, device="cpu")  # the default device by name: the same entry
    assert prepares == ["bfloat16"]
