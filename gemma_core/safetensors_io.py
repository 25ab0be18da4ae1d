"""A small safetensors reader/writer on numpy: strict reads into private memory, bfloat16
through ml_dtypes.

The format: an 8-byte little-endian header length, a JSON header mapping names to
`{dtype, shape, data_offsets}` (plus an optional `__metadata__` of strings), then the raw data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gemma_core.errors import CheckpointError
from gemma_core.jsonfile import parse_json

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _dtype(name: str) -> np.dtype:
    """A safetensors dtype name's numpy dtype; BF16 through ml_dtypes, imported only for it."""
    if name == "BF16" and name not in _DTYPES:
        import ml_dtypes

        _DTYPES["BF16"] = np.dtype(ml_dtypes.bfloat16)
        _NAMES[_DTYPES["BF16"]] = "BF16"
    return _DTYPES[name]
_MAX_HEADER = 100 * 1024 * 1024


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0  # not bool, not float, not a numeric string


def read_header(path: str | os.PathLike[str]) -> tuple[dict, int]:
    """(header dict, byte offset of the data) of a safetensors file, checked as the reference
    reader (the Rust `safetensors` crate) checks it, and stricter where it is silent.

    The header must be a JSON object of tensor entries `{dtype, shape, data_offsets}` (plus a
    `__metadata__` object of strings), with no name twice; each entry's byte length must match
    its shape and dtype; and the entries must cover the data exactly: sorted by offset, each
    begins where the previous one ends, the first at 0 and the last at the end of the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        header = parse_json(f.read(n), f"{path}: malformed safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (not an object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: malformed safetensors header (__metadata__ must map names to "
                              f"strings, got {meta!r:.200})")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            if not isinstance(info, dict):
                raise TypeError(info)
            dtype = _dtype(info["dtype"])
            shape, offsets = info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and all(_is_count(d) for d in shape)
                    and isinstance(offsets, list) and len(offsets) == 2
                    and all(_is_count(x) for x in offsets) and offsets[0] <= offsets[1]):
                raise ValueError(info)
            begin, end = offsets
            count = math.prod(shape)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed or unsupported entry "
                                  f"{info!r:.200}") from None
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of "
                                  f"{data_size} data bytes")
        if end - begin != count * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} holds {end - begin} bytes for shape "
                                  f"{info['shape']} {info['dtype']}")
        spans.append((begin, end, name))
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            what = "overlaps the previous tensor" if begin < covered else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {name!r} at bytes [{begin}, {end}) {what} "
                                  f"(expected it to begin at byte {covered})")
        covered = end
    if covered != data_size:
        raise CheckpointError(f"{path}: {data_size - covered} trailing bytes after the last tensor "
                              f"(the data is {data_size} bytes, the tensors cover {covered})")
    return header, 8 + n


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of the file as a read-only numpy array in private memory (read, not mapped:
    a later change to the file, or its truncation, cannot reach the arrays)."""
    header, offset = read_header(path)
    tensors = {}
    with open(path, "rb", buffering=0) as f:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            buf = np.empty(end - begin, np.uint8)
            f.seek(offset + begin)
            _read_into(f, buf.data, path, name)
            array = buf.view(_dtype(info["dtype"])).reshape(info["shape"])
            array.flags.writeable = False
            tensors[name] = array
    return tensors


def _read_into(f: Any, view: memoryview, path: str | os.PathLike[str], name: str) -> None:
    """Fill `view` from `f` (reads may return less than asked), or raise if the file ends first."""
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{path}: truncated while reading tensor {name!r} (the file "
                                  "changed after its header was read)")
        done += got


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (C order, little-endian) in name order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype.name == "bfloat16":
            _dtype("BF16")
        if a.dtype not in _NAMES:
            raise CheckpointError(f"{name}: dtype {a.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
