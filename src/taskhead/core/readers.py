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
import re
from collections.abc import Iterator
from pathlib import Path

from taskhead.errors import TaskheadError

NOT_SPACE = re.compile(r"[^ \t\r\n]")  # JSON's white space is these four
NUMBER_TAIL = re.compile(r"[0-9.eE+-]*")  # what may follow a number cut at the end of a read
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
        yield from _json_records(f, path)
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


def _json_records(f, path: Path) -> Iterator[tuple[str, dict]]:
    """A ``.json`` file: a list of objects or ``{"data": [...]}``, streamed item by item; or JSON Lines (as the
    Hugging Face ``json`` loader reads a ``.json`` file too), read as a ``.jsonl`` file with its line numbers."""
    items = json_items(f, path)
    try:
        for i, rec in items:
            if not isinstance(rec, dict):
                raise TaskheadError(f"{path}: item {i}: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}: item {i}", rec
    except JsonLines:
        with open_text(path) as again:
            yield from _records(again, path, "jsonl")


class JsonLines(Exception):
    """Raised by ``json_items``: the file holds one object per line, not one JSON document."""


def json_items(f, path: Path) -> Iterator[tuple[int, object]]:
    """``(index, item)`` of the list a JSON document holds (``[...]``, or the ``"data"`` list of an object), parsed one
    item at a time: memory holds one item and a read buffer, never the whole list (``json.load`` would hold every
    item as Python objects). A syntax error names its line; a first object followed by more raises ``JsonLines``."""
    scan = JsonScanner(f, path)
    first = scan.peek()
    if first == "[":
        yield from scan.array()
        if scan.peek():
            scan.fail("Extra data")
    elif first == "{":
        scan.take("{")
        found = False  # the "data" list, streamed
        if scan.peek() == "}":
            scan.take("}")
        else:
            while True:
                if scan.peek() != '"':
                    scan.fail("Expecting property name enclosed in double quotes")
                key = scan.value()
                scan.take(":")
                if key == "data" and scan.peek() == "[" and not found:
                    found = True
                    yield from scan.array()
                else:
                    scan.value()
                if scan.take(",}") == "}":
                    break
        if scan.peek():  # more after the first object: JSON Lines (or, after a "data" list, a syntax error)
            if not found:
                raise JsonLines
            scan.fail("Extra data")
        if not found:
            raise TaskheadError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    elif first:
        scan.value()
        raise TaskheadError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    else:
        scan.fail("Expecting value")


class JsonScanner:
    """Reads JSON values one at a time from a text stream with ``json.JSONDecoder.raw_decode`` (the standard library
    parser; what it lacks is an incremental mode, written here): a buffer grown while a value is incomplete, dropped
    once consumed; line numbers kept for errors."""

    READ = 1 << 20

    def __init__(self, f, path: Path) -> None:
        self.f, self.path = f, path
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False  # ``line``: the line of buf[0]
        self.decoder = json.JSONDecoder()

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.f.read(max(self.READ, len(self.buf) - self.pos))  # doubling: a large item costs O(size)
        if not chunk:
            self.eof = True
            return False
        self.line += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        return True

    def peek(self) -> str:
        """The next character that is not white space ("" at the end of the file)."""
        while True:
            found = NOT_SPACE.search(self.buf, self.pos)
            if found:
                self.pos = found.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if not self._more():
                return ""

    def take(self, allowed: str) -> str:
        c = self.peek()
        if not c or c not in allowed:
            self.fail(f"Expecting {' or '.join(repr(a) for a in allowed)}" if c else "Unexpected end of data")
        self.pos += 1
        return c

    def value(self) -> object:
        self.peek()
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self._more():
                    continue
                self.fail(e.msg, e.pos)
            if NUMBER_TAIL.fullmatch(self.buf, end) and self._more():  # "1." or "1.25e" may go on in the next read
                continue
            self.pos = end
            return obj

    def array(self) -> Iterator[tuple[int, object]]:
        self.take("[")
        if self.peek() == "]":
            self.pos += 1
            return
        i = 0
        while True:
            yield i, self.value()
            i += 1
            if self.take(",]") == "]":
                return

    def fail(self, msg: str, at: int | None = None):
        at = self.pos if at is None else at
        raise TaskheadError(f"{self.path}:{self.line + self.buf.count(chr(10), 0, at)}: malformed JSON ({msg})")


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
