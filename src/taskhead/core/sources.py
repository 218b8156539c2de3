"""Where records come from: a Hub dataset's splits as ``(where, record)`` streams, like the local-file readers
(``core/readers.py``), so the DataModule parses and checks both the same way, one record at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from taskhead.core.pretrained import OFFLINE_HINT, hub_offline, hub_unreachable
from taskhead.errors import TaskheadError


def record_line(where: str) -> int | str:
    """``path:12`` → 12 (the line a record starts on); ``where`` itself when it names no line."""
    tail = str(where).rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else str(where)


def load_hub(name: str, config: str | None, streaming: bool = False):
    """``datasets.load_dataset(name, config)``, or one line saying why not (the Hub out of reach, no such dataset).
    A dataset that needs a loading script (``eriktks/conll2003``; ``datasets`` >= 4 runs none) loads from the Parquet
    export the Hub keeps of it. ``streaming``: an ``IterableDatasetDict`` whose splits are read as they are
    iterated (nothing downloaded ahead; ``--data.streaming``)."""
    import datasets

    if not hub_offline() and not Path(name).exists() and (why := hub_unreachable()):
        raise TaskheadError(f"dataset '{name}': the Hub is out of reach ({why}); {OFFLINE_HINT} "
                            "(a dataset already in the local cache loads with HF_HUB_OFFLINE=1)")
    try:
        try:
            return datasets.load_dataset(name, config, streaming=streaming)
        except RuntimeError as e:
            if "scripts are no longer supported" not in str(e):
                raise
            return datasets.load_dataset(name, config, revision="refs/convert/parquet", streaming=streaming)
    except Exception as e:  # the Hub client raises many types; the user needs the first line only
        raise TaskheadError(f"could not load dataset '{name}' ({config}): {str(e).splitlines()[0]}") from None


def class_label_columns(features) -> tuple[dict, dict]:
    """The ClassLabel columns of a Hub split: ``({column: ClassLabel}, {column: ClassLabel of its items})``, the second
    for sequences of labels (NER tags: ``Sequence(ClassLabel)``)."""
    import datasets

    features = features or {}  # a streamed split whose features are not known ahead (JSON)
    single = {c: f for c, f in features.items() if isinstance(f, datasets.ClassLabel)}
    inner = {c: getattr(f, "feature", None) for c, f in features.items() if c not in single}
    return single, {c: f for c, f in inner.items() if isinstance(f, datasets.ClassLabel)}


def hub_record(rec: dict, single: dict, sequences: dict) -> dict:
    """A Hub row with its ClassLabel ids turned into names (-1, no gold label: None), also inside sequences, so local
    and Hub labels are handled alike (``class_label_columns`` gives ``single`` and ``sequences``)."""
    for c, f in single.items():
        rec[c] = f.int2str(rec[c]) if rec[c] >= 0 else None
    for c, f in sequences.items():
        rec[c] = [f.int2str(t) if t >= 0 else None for t in rec[c]]
    return rec


def hub_streams(dd, name: str, split_names: dict[str, str] | None = None
                ) -> tuple[dict[str, Callable[[], Iterator[tuple[str, dict]]]], dict[str, list[str]]]:
    """Per split (``split_names``: ours → the dataset's, default train/validation/test): a function that yields
    ``("name[split] row i", record)`` with ClassLabel ids turned into names, also inside sequences (so local and Hub
    labels are handled alike), skipping test rows without gold labels (-1); plus the ClassLabel names per column."""
    split_names = split_names or {s: s for s in ("train", "validation", "test")}
    missing = [f"--data.{ours}_split {theirs}" for ours, theirs in split_names.items()
               if theirs not in dd and theirs != ours]
    if missing:  # a renamed split that is not there; the default names may be absent (held out, or no test)
        raise TaskheadError(f"dataset '{name}' has no split for {', '.join(missing)}; its splits: {', '.join(dd)}")
    streams, class_names = {}, {}
    for split, hub_split in split_names.items():
        if hub_split not in dd:
            continue
        ds = dd[hub_split]
        single, sequences = class_label_columns(ds.features)
        class_names.update({c: f.names for c, f in {**single, **sequences}.items()})

        def records(ds=ds, split=split, hub_split=hub_split, single=single, sequences=sequences) -> Iterator[tuple[str, dict]]:
            for i, rec in enumerate(ds):  # one row at a time from the Hub's own memory-mapped Arrow (or its stream)
                rec = hub_record(rec, single, sequences)
                if split == "test" and any(rec[c] is None for c in single):
                    continue  # Hub test splits without gold labels (label -1)
                yield f"{name}[{hub_split}] row {i}", rec

        streams[split] = records
    return streams, class_names
