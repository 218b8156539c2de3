"""Where records come from: a Hub dataset's splits as ``(where, record)`` streams, like the local-file readers
(``core/readers.py``), so the DataModule parses and checks both the same way, one record at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from taskhead.core.pretrained import OFFLINE_HINT, hub_offline, hub_unreachable
from taskhead.errors import TaskheadError

HUB_SPLITS = ("train", "validation", "test")


def record_line(where: str) -> int | str:
    """``path:12`` → 12 (the line a record starts on); ``where`` itself when it names no line."""
    tail = str(where).rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else str(where)


def load_hub(name: str, config: str | None):
    """``datasets.load_dataset(name, config)``, or one line saying why not (the Hub out of reach, no such dataset)."""
    import datasets

    if not hub_offline() and not Path(name).exists() and (why := hub_unreachable()):
        raise TaskheadError(f"dataset '{name}': the Hub is out of reach ({why}); {OFFLINE_HINT} "
                            "(a dataset already in the local cache loads with HF_HUB_OFFLINE=1)")
    try:
        return datasets.load_dataset(name, config)
    except Exception as e:  # the Hub client raises many types; the user needs the first line only
        raise TaskheadError(f"could not load dataset '{name}' ({config}): {str(e).splitlines()[0]}") from None


def hub_streams(dd, name: str) -> tuple[dict[str, Callable[[], Iterator[tuple[str, dict]]]], dict[str, list[str]]]:
    """Per split of ``dd``: a function that yields ``("name[split] row i", record)`` with ClassLabel ids turned into
    names (so local and Hub labels are handled alike), skipping test rows without gold labels (-1); plus the
    ClassLabel names per column."""
    import datasets

    streams, class_names = {}, {}
    for split in HUB_SPLITS:
        if split not in dd:
            continue
        ds = dd[split]
        class_labels = {c: f for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
        class_names.update({c: f.names for c, f in class_labels.items()})

        def records(ds=ds, split=split, class_labels=class_labels) -> Iterator[tuple[str, dict]]:
            for i, rec in enumerate(ds):  # one row at a time from the Hub's own memory-mapped Arrow
                for c, f in class_labels.items():
                    rec[c] = f.int2str(rec[c]) if rec[c] >= 0 else None
                if split == "test" and any(rec[c] is None for c in class_labels):
                    continue  # Hub test splits without gold labels (label -1)
                yield f"{name}[{split}] row {i}", rec

        streams[split] = records
    return streams, class_names
