"""JSON-lines files, plain or gzipped, read with file:line positions for every error."""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path


class DataError(ValueError):
    """A malformed record; the message starts with ``file:line:``."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


def open_text(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gzipped else open(path, encoding="utf-8")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield ``("file:line", record)`` for each non-blank line; a line that is not a JSON object
    raises :class:`DataError` naming the file and line."""
    with open_text(path) as fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(where, f"invalid JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(where, f"expected a JSON object, got {type(record).__name__}")
                yield where, record
        except (UnicodeDecodeError, EOFError, OSError) as err:  # a truncated gzip stream or bad bytes
            raise DataError(f"{path}:{lineno + 1}", f"unreadable data ({err})") from None
