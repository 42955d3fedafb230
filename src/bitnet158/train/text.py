"""Reading raw training text: plain / gzipped files, jsonl, parquet, and Project Gutenberg cleanup.

    for source, text in iter_documents(["books/", "extra.jsonl"]):   # one document at a time
        ...
    body = strip_gutenberg(raw)      # drop the PG licence header and footer

A ``.txt``/``.md`` file (optionally ``.gz``) is one document; a ``.jsonl`` file holds one document
per line (field ``text`` by default, or ``content``); a ``.parquet`` file (needs ``pyarrow``, the
``train`` extra) one per row of its text column; a directory expands to the files inside it,
sorted. Line endings become ``\\n`` and a UTF-8 BOM is dropped. Gutenberg licence text is removed
from any document that carries the ``*** START OF ... PROJECT GUTENBERG`` marker.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import BitNetError

TEXT_SUFFIXES = (".txt", ".md", ".text")
_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG[^\n]*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG[^\n]*$", re.IGNORECASE | re.MULTILINE)
# older files end with "End of the Project Gutenberg EBook of ..." before the *** END line
_END_OLD = re.compile(r"^\s*End of (the )?Project Gutenberg'?s? .*$", re.IGNORECASE | re.MULTILINE)


class DataError(BitNetError, ValueError):
    """An input data file is missing, unreadable, or not in a supported format."""


def normalize(text: str) -> str:
    """CRLF / CR -> LF, drop a leading BOM."""
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: what lies between the START and END marker lines.

    Text without the START marker is returned unchanged (stripped of surrounding whitespace).
    """
    text = normalize(text)
    m = _START.search(text)
    if not m:
        return text.strip()
    body = text[m.end():]
    e = _END.search(body)
    if e:
        body = body[:e.start()]
    e = _END_OLD.search(body)
    if e:
        body = body[:e.start()]
    return body.strip()


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # old PG files: Latin-1 never fails, and the text stays readable


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, with directories replaced by their supported files (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and _kind(f) is not None))
        elif p.is_file():
            if _kind(p) is None:
                raise DataError(f"{p}: unsupported file type (expected .txt/.md/.jsonl/.parquet, "
                                "optionally .gz)")
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    if not out:
        raise DataError(f"no input files found in {', '.join(map(str, paths))}")
    return out


def _kind(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(".jsonl") or name.endswith(".json"):
        return "jsonl"
    if name.endswith(".parquet") and not path.name.lower().endswith(".gz"):
        return "parquet"
    return None


def _jsonl_text(obj, path: Path, lineno: int, key: str | None) -> str:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object or string per line")
    for k in ([key] if key else ["text", "content"]):
        if k in obj and isinstance(obj[k], str):
            return obj[k]
    raise DataError(f"{path}:{lineno}: no string field {key or 'text'!r} in this record")


def iter_documents(paths: Iterable[str | Path], text_key: str | None = None,
                   gutenberg: bool = True) -> Iterator[tuple[str, str]]:
    """Yield (source file, document text) for every document in ``paths``."""
    for path in expand(paths):
        kind = _kind(path)
        if kind == "text":
            text = normalize(_decode(_read_bytes(path), path))
            yield str(path), strip_gutenberg(text) if gutenberg else text
        elif kind == "jsonl":
            raw = _decode(_read_bytes(path), path)
            for i, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: invalid JSON ({e})") from None
                yield str(path), normalize(_jsonl_text(obj, path, i, text_key))
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'bitnet158[train]')") from None
            table = pq.read_table(path)
            col = text_key or ("text" if "text" in table.column_names else None)
            if col is None or col not in table.column_names:
                raise DataError(f"{path}: no column {text_key or 'text'!r} (columns: {table.column_names})")
            for value in table.column(col).to_pylist():
                if isinstance(value, str) and value:
                    yield str(path), normalize(value)
