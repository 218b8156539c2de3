"""Read local data files record by record, so every problem can name its file and line.

``datasets.load_dataset("json", ...)`` would read these too, but its errors are pyarrow tracebacks that name neither
the line nor the field. These readers are small on purpose: they yield ``(where, record)`` pairs and leave the
meaning of the fields to the task.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from taskhead.errors import TaskheadError

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}


def file_format(path: str | Path) -> str:
    """Return ``jsonl``, ``json``, ``csv`` or ``tsv`` from the file name (a trailing ``.gz`` is allowed)."""
    p = Path(path)
    suffix = Path(p.stem).suffix if p.suffix == ".gz" else p.suffix
    if suffix not in SUFFIXES:
        raise TaskheadError(f"{path}: unknown file type '{suffix}'; expected one of {', '.join(SUFFIXES)} (optionally .gz)")
    return SUFFIXES[suffix]


class Utf8Text(io.TextIOWrapper):
    """A file decoded as it is read, so no whole-file copy is ever held (a 33 MB JSONL of reviews would be held three
    times over: bytes, text, and a StringIO at up to 4 bytes a character). A byte that is not UTF-8 becomes an error
    naming its line, found by re-reading the raw bytes: only on that error path."""

    def __init__(self, path: Path, binary) -> None:
        super().__init__(binary, encoding="utf-8-sig", newline="")
        self.path = path

    def __next__(self) -> str:
        try:
            return super().__next__()
        except UnicodeDecodeError:
            raise self._error() from None

    def read(self, size: int | None = -1) -> str:
        try:
            return super().read(size)
        except UnicodeDecodeError:
            raise self._error() from None

    def _error(self) -> TaskheadError:
        with _open_binary(self.path) as f:
            data = f.read()
        try:
            data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            return TaskheadError(f"{self.path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})")
        return TaskheadError(f"{self.path}: not valid UTF-8")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def open_text(path: Path) -> io.TextIOBase:
    """The file (``.gz`` allowed) as text, decoded as it is read; a missing file or a byte that is not UTF-8 is an
    error naming the file (and the line)."""
    if not path.is_file():
        raise TaskheadError(f"{path}: file not found")
    return Utf8Text(path, _open_binary(path))


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ``("path:line", record)`` for each record of a JSONL, JSON (a list of objects), CSV or TSV file."""
    path = Path(path)
    fmt = file_format(path)
    f = open_text(path)
    try:
        yield from _records(f, path, fmt)
    finally:
        f.close()  # also when the caller stops early (an error in a later record's check)


def _records(f, path: Path, fmt: str) -> Iterator[tuple[str, dict]]:
    if fmt == "jsonl":
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                msg = e.msg.removesuffix(" at")  # "Invalid control character at"
                raise TaskheadError(f"{path}:{n}: malformed JSON ({msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise TaskheadError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}:{n}", rec
    elif fmt == "json":
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise TaskheadError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise TaskheadError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise TaskheadError(f"{path}: item {i}: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}: item {i}", rec
    else:
        reader = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
        header = next(reader, None)
        if header is None:
            return
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise TaskheadError(
                    f"{path}:{reader.line_num}: {len(row)} columns, but the header has {len(header)} ({', '.join(header)})"
                )
            yield f"{path}:{reader.line_num}", dict(zip(header, row))


def get_field(rec: dict, field: str, where: str) -> object:
    """``rec[field]``, or an error naming the place and the fields that do exist. Dots reach into nested objects."""
    value: object = rec
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            have = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
            raise TaskheadError(f"{where}: field '{field}' is missing (fields here: {have})")
        value = value[part]
    return value


def get_text(rec: dict, field: str, where: str) -> str:
    """A non-empty string field."""
    value = get_field(rec, field, where)
    if not isinstance(value, str):
        raise TaskheadError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise TaskheadError(f"{where}: field '{field}' is empty")
    return value
