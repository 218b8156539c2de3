"""Arrow helpers for data at scale: records streamed into memory-mapped Arrow files, columns read as one array, cache
keys from a file's identity.

No split is ever held as Python objects: a parsed split is written chunk by chunk (``CHUNK`` records at a time) and
read back memory-mapped, so the resident memory of a run does not grow with the number of rows.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

CHUNK = 10_000  # records per Arrow record batch while writing: bounded Python memory, few batches
NUM_PROC_MIN_ROWS = 100_000  # below this, worker start-up (fork, pickling the tokenizer) costs more than it saves
ROWS_PER_PROC = 50_000


def write_arrow(rows: Iterable[dict], path: Path, drop: tuple[str, ...] = ()):
    """Write ``rows`` to an Arrow stream file in chunks and return it as a memory-mapped ``datasets.Dataset``
    (None when there were no rows). Keys in ``drop`` (e.g. ``where``, kept for error messages only) are left out."""
    import datasets

    out, chunk = ArrowStream(path), []
    try:
        for row in rows:
            chunk.append({k: v for k, v in row.items() if k not in drop})
            if len(chunk) >= CHUNK:
                out.write(chunk)
                chunk.clear()
        if chunk:
            out.write(chunk)
    finally:
        out.close()
    return datasets.Dataset.from_file(str(path)) if out.schema is not None else None


class ArrowStream:
    """Rows written to an Arrow stream file chunk by chunk, the schema inferred from the first chunk. A later chunk
    may need wider types: a field that was null or ``[]`` in every row so far (a multi-label column whose first 10k
    rows have no label reads as ``list<null>``), or integers that turn out to be floats. Then the rows written so far
    are rewritten once with the wider schema (``pyarrow.unify_schemas``, permissive promotion); types that do not
    unify (a string where numbers were) raise pyarrow's error."""

    def __init__(self, path: Path) -> None:
        self.path, self.schema, self._sink, self._writer = path, None, None, None

    def write(self, rows: list[dict]) -> None:
        import pyarrow as pa

        table = pa.Table.from_pylist(rows)  # inferred (given the schema so far, pyarrow would cut 1.5 to 1)
        if self.schema is None:
            self._open(table.schema)
        elif table.schema != self.schema:
            wider = pa.unify_schemas([self.schema, table.schema], promote_options="permissive")
            if wider != self.schema:
                self._widen(wider)
            table = pa.table({f.name: table[f.name].cast(f.type) if f.name in table.column_names
                              else pa.nulls(len(table), f.type) for f in wider}, schema=wider)  # a key missing: nulls
        self._writer.write_table(table)

    def _open(self, schema) -> None:
        import pyarrow as pa

        self.schema = schema
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)

    def _widen(self, schema) -> None:
        import pyarrow as pa

        self.close()
        narrow = self.path.with_suffix(".narrow.arrow")
        os.replace(self.path, narrow)
        try:
            self._open(schema)
            with pa.memory_map(str(narrow)) as source:
                for batch in pa.ipc.open_stream(source):
                    self._writer.write_table(pa.Table.from_batches([batch]).cast(schema))
        finally:
            narrow.unlink()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None


def column_to_ids(ds, column: str, names: list[str]):
    """``column`` of names (strings, or lists of strings) → their ids in ``names``, column-wise; the dataset is written
    beside its own file and returned memory-mapped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = arrow_column(ds, column).combine_chunks()
    lists = pa.types.is_list(col.type)
    ids = pc.index_in(pc.list_flatten(col) if lists else col, value_set=pa.array(names)).cast(pa.int64())
    if lists:
        ids = pa.ListArray.from_arrays(pc.subtract(col.offsets, col.offsets[0]), ids)
    table = ds.data.table.set_column(ds.column_names.index(column), column, ids)
    return write_arrow_table(table, Path(ds.cache_files[0]["filename"]).with_suffix(".ids.arrow"))


def write_arrow_table(table, path: Path):
    """Write a (memory-mapped) pyarrow table to ``path`` batch by batch; return it memory-mapped as a Dataset."""
    import datasets
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=CHUNK * 10):
            writer.write_batch(batch)
    return datasets.Dataset.from_file(str(path))


def arrow_column(ds, name: str):
    """One column of a ``datasets.Dataset`` as a pyarrow ``ChunkedArray``, through its indices mapping if it has one
    (after ``select``): one Arrow ``take``, not one Python call per row as ``ds[name]`` (a lazy ``Column``) would."""
    col = ds.data.column(name)
    indices = getattr(ds, "_indices", None)
    return col if indices is None else col.take(indices.column(0))


def numpy_column(ds, name: str) -> np.ndarray:
    """One column as a numpy array (numbers: zero-copy where Arrow allows)."""
    return arrow_column(ds, name).to_numpy()


def file_identity(path: str | Path) -> dict[str, Any]:
    """What names a file's content for a cache key without reading all of it: absolute path, size, mtime (ns) and the
    hash of its first and last MiB (catches a rewrite within the mtime resolution that keeps the size)."""
    p = Path(path).resolve()
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ends_sha256": h.hexdigest()}


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def num_proc(rows: int) -> int:
    """Tokeniser processes for a split of ``rows``: 1 for small splits, else one per ~50k rows up to the cores."""
    if rows < NUM_PROC_MIN_ROWS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, rows // ROWS_PER_PROC))


# Columns that tokenisation adds: what is left of a predict row is the input that predictions.jsonl repeats.
ENCODED = {"input_ids", "attention_mask", "token_type_ids", "special_tokens_mask", "length", "full_length", "idx", "_id"}


def tokenise(encoder: "Encoder", split: str, ds, file: Path):
    """``ds.map(encoder)`` into ``file`` (batched; ``num_proc`` processes for a large split), timed in one log line."""
    from lightning.pytorch.utilities import rank_zero_info

    procs = num_proc(len(ds))
    start = time.perf_counter()
    out = ds.map(encoder, batched=True, with_indices=True, num_proc=procs if procs > 1 else None,
                 cache_file_name=str(file), new_fingerprint=file.stem, load_from_cache_file=False,
                 desc=f"Tokenising {split}")
    took = time.perf_counter() - start
    rank_zero_info(f"[data] {split}: tokenised {len(out):,} examples in {took:.1f} s "
                   f"({len(out) / max(took, 1e-9):,.0f}/s, {procs} process{'es' if procs > 1 else ''})")
    return out


def load_cached(file: Path):
    """The tokenised split at ``file`` (or its ``num_proc`` shards, all of them), memory-mapped; None if absent."""
    import datasets

    if file.is_file():
        return datasets.Dataset.from_file(str(file))
    shards = sorted(file.parent.glob(f"{file.stem}_*_of_*.arrow"))  # written by a map with num_proc > 1
    if shards and len(shards) == int(shards[0].stem.rsplit("_of_", 1)[1]):
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(s)) for s in shards])
    return None


class InputRows:
    """The id and input fields of predict examples, by example index (``idx``), read from the memory-mapped tokenised
    predict split when asked: predictions.jsonl repeats them beside each prediction. Ids are stored JSON-encoded (a
    string or a line number). A task whose examples become several rows (QA windows) gives the first row of each;
    ``encoded`` names the task's own columns that tokenisation added."""

    def __init__(self, ds, model_input_names: list[str], encoded: tuple[str, ...] = ()) -> None:
        keep = [c for c in ds.column_names if c not in ENCODED and c not in model_input_names and c not in encoded]
        self.ds = ds.select_columns(keep + ["_id"])
        self.first = np.unique(numpy_column(ds, "idx"), return_index=True)[1]  # example i → its first row

    def __len__(self) -> int:
        return len(self.first)

    def __call__(self, idx) -> list[dict]:
        rows = self.ds.select(self.first[np.asarray(idx, dtype=np.int64)]).with_format("arrow")[:].to_pylist()
        return [{"id": json.loads(r.pop("_id")), **{k: v for k, v in r.items() if k != "id"}} for r in rows]


class Encoder:
    """``datamodule.encode`` plus the example index, as a picklable callable for ``datasets.map(num_proc=...)``: a
    shallow copy of the DataModule without its trainer, datasets or parsed splits (pickling the trainer would drag the
    whole run into every worker)."""

    def __init__(self, dm) -> None:
        self.dm = copy.copy(dm)
        self.dm.__dict__.update(trainer=None, datasets={}, parsed={}, predict_input_rows=None)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        # ``idx`` goes in with the batch: a task whose examples become several rows (QA windows) repeats it per row
        out = self.dm.encode({**batch, "idx": list(indices)})
        out.setdefault("idx", list(indices))
        return out


def hold_out_indices(n: int, labels: np.ndarray | None, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (and, with ``labels``, stratified) train/validation split of ``range(n)``, both sorted: the split
    ``datasets.Dataset.train_test_split(test_size=val_split, seed=seed, stratify_by_column=...)`` draws, computed on
    the label array itself (that method reads the stratify column through a lazy Column, one row at a time)."""
    from datasets.utils.stratify import stratified_shuffle_split_generate_indices

    n_test = math.ceil(val_split * n)
    n_train = n - n_test
    if n_train <= 0:
        raise ValueError(f"With n_samples={n}, test_size={val_split}, the resulting train set will be empty")
    rng = np.random.default_rng(seed)
    if labels is None:
        perm = rng.permutation(n)
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
    try:
        train, test = next(stratified_shuffle_split_generate_indices(np.asarray(labels), n_train, n_test, rng=rng))
    except ValueError as e:
        if str(e) == "Minimum class count error":
            raise ValueError("The least populated class in label column has only 1 member, which is too few. The "
                             "minimum number of groups for any class cannot be less than 2.") from None
        raise
    return np.sort(train), np.sort(test)


def scratch_dir() -> Path:
    """A new temporary directory for parsed splits, ``taskhead-parsed-<host>-<pid>-*`` in the system's temporary
    directory (``TMPDIR``): not under ``cache_dir``, so a run stopped by a bad record or option leaves no output. A
    process killed outright (SIGKILL, out of memory) cannot remove its own: the next run on the host removes those of
    processes that are gone."""
    host = socket.gethostname().replace("-", "_")
    for old in Path(tempfile.gettempdir()).glob(f"taskhead-parsed-{host}-*-*"):
        pid = old.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"taskhead-parsed-{host}-{os.getpid()}-"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
