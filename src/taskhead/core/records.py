"""The records path of ``TaskDataModule.setup``: for tasks whose cross-split checks (``check_splits``) still need
every split as a list of Python records (NER, QA, multiple choice, seq2seq). Classification is on the Arrow path
(``arrow_native``, see ``core/data.py``); this file goes when the last task moves there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from taskhead.core.arrow import cache_key, hold_out_indices
from taskhead.errors import TaskheadError


def setup_records(dm, stage: str, wanted: list[str]) -> None:
    """Hold out, subset and tokenise (cached) the ``wanted`` splits of ``dm.raw`` into ``dm.datasets``."""
    raw = dict(dm.raw)
    if "validation" in wanted and "validation" not in raw:
        if "train" not in raw:
            raise TaskheadError("validation needs --data.validation_file or a train split to hold out from")
        raw["train"], raw["validation"] = hold_out(dm, raw["train"])
    for split in wanted:
        if split not in raw:
            raise TaskheadError(f"stage '{stage}' needs a {split} split: set --data.{split}_file (or a Hub dataset that has one)")
        records = raw[split]
        limit = dm.hparams.max_train_samples if split == "train" else dm.hparams.max_eval_samples
        if limit is not None and limit < len(records):
            keep = np.random.default_rng(dm.hparams.seed).permutation(len(records))[:limit]
            records = [records[i] for i in sorted(keep)]
        if split == "predict":  # what predictions.jsonl repeats of each input: its id and its fields
            dm.predict_inputs = [{"id": r.get("_id", i), **{k: v for k, v in r.items() if k not in ("where", "_id", "id")}}
                                 for i, r in enumerate(records)]
        # "where" (file:line) serves error messages only: it stays out of the dataset and the cache key
        rows = [{**{k: v for k, v in r.items() if k not in ("where", "_id")}, "idx": i} for i, r in enumerate(records)]
        dm.datasets[split] = encode_cached(dm, split, rows)
        dm._report(split)


def hold_out(dm, train: list[dict]) -> tuple[list[dict], list[dict]]:
    col = dm.stratify_column
    tr, va = hold_out_indices(len(train), np.array([r[col] for r in train]) if col else None,
                              dm.hparams.val_split, dm.hparams.seed)
    how = f", stratified by {col}" if col else ""
    rank_zero_info(
        f"No validation split given: held out {len(va):,} of {len(train):,} training examples "
        f"({dm.hparams.val_split:.0%}{how}, seed {dm.hparams.seed})."
    )
    return [train[i] for i in tr], [train[i] for i in va]


def encode_cached(dm, split: str, rows: list[dict]):
    """Tokenise a split's rows once into the cache. The key is the files' identity and the options
    (``dm._data_key()``) and the label set; only Hub rows, which have no file, are hashed row by row."""
    import datasets

    hub_rows = None
    if dm.hparams.dataset_name:
        h = hashlib.sha256()
        for r in rows:
            h.update(json.dumps(r, sort_keys=True, default=str).encode())
        hub_rows = h.hexdigest()
    key = cache_key(dm._data_key(), dm._tokenizer_key(), split, hub_rows, dm.label_names)
    cache = Path(dm.hparams.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    return datasets.Dataset.from_list(rows).map(
        dm.encode,
        batched=True,
        cache_file_name=str(cache / f"{split}-{key}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=f"{split}-{key}",  # else datasets hashes dm.encode, i.e. pickles the DataModule and its rows
        desc=f"Tokenising {split}",
    )
