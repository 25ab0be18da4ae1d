"""The load cache: a GGUF file decoded once (its tensors dequantised, its tokenizer rebuilt from
262k metadata strings) and kept in the user cache folder, memory-mapped by the next load.

An entry is one safetensors file in `gemma_core.compile_cache.cache_dir()/load/`, under that
folder's size bound (`GEMMA_CACHE_MAX_BYTES`) and removed by `gemma cache clear`. It holds the
weights exactly as `gemma_core.formats.gguf.read_weights` returned them (float32, or the
quantised values and their scales when quantised on load), the tokenizer's serialized
SentencePiece proto as a uint8 tensor, and in its metadata the config (its Hugging Face dict),
the tokenizer's settings and the key it was made for. It is written in one transaction
(`gemma_core.transaction`): a killed writer leaves no file a later run could take for an entry.

The key: the source's absolute path, size, mtime_ns, inode and a hash of its first MiB;
gemma-core's version, a hash of the source of the code that decodes GGUF and the gguf package's
version; and the load settings (quantisation, query_pre_attn_scalar, allow_nonfinite). The file
name comes from the path and the settings only, so a changed source rewrites its entry instead
of leaving a stale one beside it. An entry is used only when its stored key equals the expected
one, its header is a well-formed safetensors header covering the file exactly (a truncated
file is refused), its config reads back and its tensors are the layout's in the dtypes the
reader gives (`validate_weights`); anything else is a miss and the entry is rewritten. The
tensor bytes themselves are not hashed (hashing 1 GB would cost more than the warm load saves).

The arrays of a hit are copy-on-write views of the mapped file: a backend that keeps float32
reads the pages in place, and nothing written to an array reaches the file. Entries are only
ever replaced by rename and removed by unlink, which leave a mapping intact; truncating an entry
in place under a running process would fault it (SIGBUS), as for any mapped file.

`GEMMA_LOAD_CACHE=0` turns the cache off (as does `GEMMA_CACHE_MAX_BYTES=0`)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gemma_core.config import GemmaConfig
from gemma_core.errors import GemmaError

FORMAT = 2  # the entry's own layout; bump when what an entry holds changes
HEAD_BYTES = 2**20  # the source's bytes hashed into the key (a GGUF header lies there)
TOKENIZER_PROTO = "gemma_core.tokenizer_proto"  # the tensor holding the SentencePiece proto
_KEY, _CONFIG, _TOKENIZER = "gemma_core.load_key", "gemma_core.config", "gemma_core.tokenizer"
# the dtypes an entry may hold: float32 weights and scales, quantised values, the proto's bytes
_DTYPES: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "I8": np.dtype("i1"), "U8": np.dtype("u1")}
# the code whose output an entry holds: a change to it (in a development tree, under one
# version number) must not serve weights decoded by the old code
_READERS = ("formats/gguf.py", "formats/gguf_file.py", "load_cache.py", "tokenizer.py")


@dataclasses.dataclass(frozen=True)
class TokenizerState:
    """What `GemmaTokenizer` is built from: the serialized proto and the file's settings."""

    proto: bytes
    add_bos: bool
    chat_template: str | None
    special_pieces: dict[str, int] | None = None  # GemmaTokenizer.special_pieces, when known


class EntryWeights(dict):  # type: ignore[type-arg]
    """An entry's weights, carrying the entry's key: what derived caches key on
    (gemma_core.prepared_cache). A dict changed in any way carries no key any more (its arrays
    are copy-on-write views of the file: change them by replacing, not in place)."""

    def __init__(self, weights: Mapping[str, np.ndarray], entry_key: str) -> None:
        super().__init__(weights)
        self.entry_key: str | None = entry_key

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self.entry_key = None
        super().__setitem__(name, value)

    def __delitem__(self, name: str) -> None:
        self.entry_key = None
        super().__delitem__(name)

    def __ior__(self, other: Any) -> EntryWeights:  # type: ignore[override,misc]
        self.update(other)
        return self

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self.entry_key = None
        super().update(*args, **kwargs)

    def pop(self, *args: Any) -> Any:  # type: ignore[override]
        self.entry_key = None
        return super().pop(*args)

    def popitem(self) -> Any:
        self.entry_key = None
        return super().popitem()

    def setdefault(self, *args: Any) -> Any:  # type: ignore[override]
        self.entry_key = None
        return super().setdefault(*args)

    def clear(self) -> None:
        self.entry_key = None
        super().clear()


@dataclasses.dataclass(frozen=True)
class Entry:
    """A loaded entry: the config, the weights (mapped) and the tokenizer state, if any."""

    config: GemmaConfig
    weights: dict[str, np.ndarray]
    tokenizer: TokenizerState | None


def enabled() -> bool:
    """Whether loads use the cache: not under `GEMMA_LOAD_CACHE=0` nor a size bound of 0."""
    from gemma_core.compile_cache import max_bytes

    return os.environ.get("GEMMA_LOAD_CACHE", "1").strip() != "0" and max_bytes() > 0


def folder() -> Path:
    """The entries' folder (not created here)."""
    from gemma_core.compile_cache import cache_dir

    return cache_dir() / "load"


def _code_version() -> str:
    """gemma-core's version, the decoding code's hash and the gguf package's version."""
    from importlib.metadata import PackageNotFoundError, version

    from gemma_core import __version__
    from gemma_core.compile_cache import code_hash

    root = Path(__file__).parent
    try:
        gguf = version("gguf")
    except PackageNotFoundError:
        gguf = "none"
    return f"{__version__} {code_hash(root / name for name in _READERS)} gguf {gguf}"


def source_key(path: str | os.PathLike[str], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The key an entry of `path` loaded with `settings` (JSON values) must carry."""
    path = Path(path).resolve()
    st = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    return {"format": FORMAT, "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino, "head_sha256": head, "code": _code_version(),
            "settings": dict(settings)}


def entry_path(key: Mapping[str, Any]) -> Path:
    """Where the entry of `key` lives: named for the source's path and the settings only."""
    name = json.dumps([key["path"], key["settings"]], sort_keys=True)
    return folder() / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.safetensors"


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def lookup(path: str | os.PathLike[str], settings: Mapping[str, Any]) -> Entry | None:
    """The entry of `path` under `settings`, or None (disabled, absent, stale or damaged)."""
    if not enabled():
        return None
    try:
        key = source_key(path, settings)
    except OSError:  # the reader reports a missing or unreadable source
        return None
    where = entry_path(key)
    if not where.is_file():
        return None
    try:
        entry = _read(where, _dumps(key))
    except (GemmaError, OSError, ValueError, KeyError, TypeError):
        return None  # damaged or not ours: the cold load rewrites it
    if entry is not None:
        with contextlib.suppress(OSError):  # a use counts for the folder's LRU bound
            os.utime(where)
    return entry


def _read(where: Path, key: str) -> Entry | None:
    """The entry in `where` if it is whole, made for `key` and the layout's; else None."""
    from gemma_core.layout import validate_weights
    from gemma_core.safetensors_io import read_header

    with open(where, "rb") as f:
        header, offset = read_header(where)  # refuses a truncated or malformed file
        meta = header.get("__metadata__", {})
        if meta.get(_KEY) != key or os.stat(where).st_ino != os.fstat(f.fileno()).st_ino:
            return None  # not this key's, or replaced by another writer between the two opens
        raw = np.memmap(f, dtype=np.uint8, mode="c")  # copy-on-write: the file stays as written
    if raw.size != offset + sum(e - b for b, e in _spans(header)):
        return None  # changed since its header was read
    weights = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        begin, end = info["data_offsets"]
        if dtype is None or (offset + begin) % dtype.itemsize:
            return None  # not a dtype the reader gives, or not aligned for it
        weights[name] = np.asarray(raw[offset + begin:offset + end]).view(dtype).reshape(info["shape"])
    config = GemmaConfig.from_hf(json.loads(meta[_CONFIG]))
    tokenizer = None
    if _TOKENIZER in meta:
        settings = json.loads(meta[_TOKENIZER])
        proto, size = weights.pop(TOKENIZER_PROTO), settings["size"]
        template, special = settings["chat_template"], settings["special_pieces"]
        if (proto.ndim != 1 or not isinstance(size, int) or not 0 <= size <= proto.size
                or not isinstance(settings["add_bos"], bool)
                or not (template is None or isinstance(template, str))
                or not isinstance(special, dict)):
            return None  # (the special pieces' ids are checked against the proto's pieces)
        tokenizer = TokenizerState(proto[:size].tobytes(), settings["add_bos"], template, special)
    elif TOKENIZER_PROTO in weights:
        return None
    validate_weights(config, weights)  # names, shapes, quantised values' dtypes
    if any(w.dtype != np.float32 for name, w in weights.items() if not _quantised(config, name)):
        return None  # the reader gives float32: anything else was not written by it
    return Entry(config, EntryWeights(weights, key), tokenizer)


def _spans(header: Mapping[str, Any]) -> list[tuple[int, int]]:
    return [tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"]


def _quantised(config: GemmaConfig, name: str) -> bool:
    quant = config.quantization
    return quant is not None and quant.scheme_for(name) is not None


def _aligned(tensors: Mapping[str, np.ndarray]) -> bool:
    """Whether every tensor starts at a multiple of its item size when written in name order
    (as `write_safetensors` writes them, after a header padded to 8 bytes)."""
    at = 0
    for name in sorted(tensors):
        w = np.asarray(tensors[name])
        if at % w.dtype.itemsize:
            return False
        at += w.nbytes
    return True


def store(path: str | os.PathLike[str], settings: Mapping[str, Any], config: GemmaConfig,
          weights: Mapping[str, np.ndarray], tokenizer: TokenizerState | None) -> EntryWeights | None:
    """Write the entry of `path` under `settings` (replacing any); returns `weights` as the
    entry's, or None when the cache is off, the entry would not fit the size bound, or it
    cannot be written (a warning says why: the load itself goes on)."""
    from gemma_core.compile_cache import max_bytes, trim
    from gemma_core.safetensors_io import write_safetensors
    from gemma_core.transaction import write_transaction

    if not enabled():
        return None
    if GemmaConfig.from_hf(json.loads(_dumps(config.to_hf()))) != config:
        return None  # a config its Hugging Face dict does not carry whole is not cached
    size = sum(np.asarray(w).nbytes for w in weights.values())
    size += len(tokenizer.proto) if tokenizer is not None else 0
    if size > max_bytes():
        return None
    try:
        key = source_key(path, settings)
        where = entry_path(key)
        tensors = dict(weights)
        meta = {_KEY: _dumps(key), _CONFIG: _dumps(config.to_hf())}
        if tokenizer is not None:
            # padded to whole 64 bytes: the float32 tensors after it stay aligned
            proto = tokenizer.proto + b"\0" * (-len(tokenizer.proto) % 64)
            tensors[TOKENIZER_PROTO] = np.frombuffer(proto, np.uint8)
            meta[_TOKENIZER] = _dumps({"add_bos": tokenizer.add_bos, "size": len(tokenizer.proto),
                                       "chat_template": tokenizer.chat_template,
                                       "special_pieces": tokenizer.special_pieces})
        if not _aligned(tensors):
            return None
        with write_transaction(where, overwrite=True) as tmp:
            write_safetensors(tmp, tensors, meta)
    except (GemmaError, OSError) as e:
        warnings.warn(f"load cache: not kept ({e})", stacklevel=2)
        return None
    trim()
    return EntryWeights(weights, _dumps(key))
