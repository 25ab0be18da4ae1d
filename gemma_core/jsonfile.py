"""JSON read from untrusted files: one `CheckpointError` naming the file for every way it can be bad.

`json.loads` alone raises RecursionError on deep nesting (`[[[[...` 200,000 levels), keeps the
last of duplicate keys silently, accepts NaN/Infinity literals and reads a file of any size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gemma_core.errors import CheckpointError, GemmaError

MAX_BYTES = 64 * 1024 * 1024  # config, index and metadata files are kilobytes; a tokenizer.json ~30 MB


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(text: str | bytes, where: str, error: type[GemmaError] = CheckpointError) -> Any:
    """`text` parsed strictly (no duplicate keys, no NaN/Infinity); errors (of type `error`)
    name `where`."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and the hooks' errors
        raise error(f"{where}: not valid JSON ({e})") from None


def read_json(path: str | os.PathLike[str], error: type[GemmaError] = CheckpointError,
              max_bytes: int = MAX_BYTES) -> Any:
    """The JSON value of the file at `path`, refusing files over `max_bytes`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (or not a regular file)")
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{path}: {size} bytes is too large for a JSON file here (at most {max_bytes})")
    return parse_json(path.read_bytes(), str(path), error)
