"""A fast GGUF container reader: metadata and tensor byte ranges, memory-mapped.

gguf-py's `GGUFReader` builds a numpy view per metadata item and takes about 20 s on a Gemma
file (262144 vocabulary strings); parsing the header with `struct` takes well under a second.
Tensor bytes are handed to `gguf.quants.dequantize` unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from typing import Any

import numpy as np

from gemma_core.errors import CheckpointError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
          11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9
UINT32 = 4
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8  # metadata arrays of arrays; Gemma files have none


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor: its GGUF name, numpy shape (GGUF dims reversed), ggml type id and bytes."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    data: np.ndarray  # uint8 [..., bytes per row], memory-mapped


class _Cursor:
    def __init__(self, buf: memoryview, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.path}: truncated GGUF header (needs byte {self.pos + n} "
                                  f"of {len(self.buf)})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, type_id: int) -> Any:
        fmt = _SCALARS[type_id]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar(10)
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: malformed string at byte {self.pos}") from None

    def value(self, type_id: int, depth: int = 0) -> Any:
        if type_id == STRING:
            return self.string()
        if type_id == ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise CheckpointError(f"{self.path}: metadata arrays nested more than "
                                      f"{MAX_ARRAY_DEPTH} deep at byte {self.pos}")
            item, count = self.scalar(4), self.scalar(10)
            if item == STRING:
                return [self.string() for _ in range(count)]
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
            return [self.value(item, depth + 1) for _ in range(count)]
        if type_id not in _SCALARS:
            raise CheckpointError(f"{self.path}: unknown metadata value type {type_id}")
        return self.scalar(type_id)


def read_gguf(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """(metadata, tensors by name) of a GGUF file; raises CheckpointError on malformed bytes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size < 24:
        raise CheckpointError(f"{path}: not a GGUF file ({size} bytes)")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(raw), path)  # type: ignore[arg-type]
    if bytes(cur.take(4)) != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
    version = cur.scalar(4)
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2, 3)")
    n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
    if n_tensors > size or n_kv > size:
        raise CheckpointError(f"{path}: malformed GGUF header")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        if key in meta:  # as gguf-py's GGUFReader and llama.cpp refuse it
            raise CheckpointError(f"{path}: metadata key {key} appears twice")
        type_id = cur.scalar(4)
        meta[key] = cur.value(type_id)
        if key == "general.alignment" and (type_id != UINT32 or meta[key] <= 0
                                           or meta[key] & (meta[key] - 1)):
            raise CheckpointError(f"{path}: general.alignment must be a power of two (uint32), got "
                                  f"{meta[key]!r}")
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar(4)
        if n_dims > MAX_DIMS:
            raise CheckpointError(f"{path}: tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [cur.scalar(10) for _ in range(n_dims)]
        infos.append((name, tuple(reversed(dims)), cur.scalar(4), cur.scalar(10)))
    align = int(meta.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = {}
    expected = 0  # llama.cpp's rule: tensors lie in order, each padded to the alignment
    for name, shape, type_id, offset in infos:
        if name in tensors:  # as gguf-py's GGUFReader and llama.cpp refuse it
            raise CheckpointError(f"{path}: tensor {name} appears twice")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        except (ValueError, KeyError):
            raise CheckpointError(f"{path}: tensor {name} has unknown ggml type {type_id}") from None
        if not shape or shape[-1] % block:
            raise CheckpointError(f"{path}: tensor {name} shape {shape} is not whole {block}-blocks")
        row_bytes = shape[-1] // block * type_size
        nbytes = math.prod(shape[:-1]) * row_bytes
        if offset != expected:
            raise CheckpointError(f"{path}: tensor {name} has data offset {offset}, expected {expected} "
                                  "(tensor data must follow in order, each padded to the alignment)")
        expected = offset + -(-nbytes // align) * align
        begin = start + offset
        if begin + nbytes > size:
            raise CheckpointError(f"{path}: truncated: tensor {name} needs bytes up to {begin + nbytes} "
                                  f"of {size}")
        data = raw[begin:begin + nbytes].reshape(*shape[:-1], row_bytes)
        tensors[name] = TensorInfo(name, shape, type_id, data)
    return meta, tensors
