"""The streaming pass: every split a stage reads, record by record from its source, checked into a memory-mapped
Arrow file; what it learns (label names and counts) is cached, and every cache key starts from what names the data.

``SplitPass`` is the part of ``TaskDataModule`` (core/data.py) that reads data; it uses the task hooks declared there
(``parse_record``, ``check_stream``, ``finish_split``, ``facts``, ``restore_facts``, ``read_file``) and its options
(``self.hparams``). A split flows: source (a Hub split or a local file: ``(where, record)`` pairs) → ``parse_record``
→ ``check_stream`` (cross-record checks, e.g. a label train never saw) → ``write_arrow`` in chunks → ``finish_split``
(column-wise work); ``_subset`` then takes the seeded hold-out and subset the run uses.
"""

from __future__ import annotations

import json
import shutil
import weakref
from collections.abc import Iterator
from functools import cached_property
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from taskhead.core.arrow import cache_key, file_identity, hold_out_indices, numpy_column, scratch_dir, write_arrow
from taskhead.core.sources import hub_streams, load_hub, record_line
from taskhead.errors import TaskheadError

SPLITS = ("train", "validation", "test", "predict")
STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ("predict",)}
# Options that change how batches are drawn, not what the tokenised data is: left out of the cache key (a streamed
# train split is never cached; validation and test are the same rows either way).
LOADER_OPTIONS = {"batch_size", "eval_batch_size", "num_workers", "group_by_length", "cache_dir", "streaming"}


def package_version() -> str:
    """taskhead's installed version (part of every cache key), read from the package metadata: importing it from the
    package's ``__init__`` would import the whole package from inside it."""
    try:
        return version("taskhead")
    except PackageNotFoundError:  # a source tree on PYTHONPATH without an install
        return "0+unknown"


class SplitPass:
    """Reading and checking the splits a stage needs (mixed into ``TaskDataModule``)."""

    # ---- what names the data: every cache key starts here --------------------------------------------------------------
    def _data_key(self) -> str:
        """The options that shape the data, without reading the rows: the task class and version, the options (the Hub
        dataset among them, split files aside: each split's key adds its own file) and label names given in code (kept
        out of the hparams by the tasks). Computed once per DataModule."""
        if "_data_key_value" in self.__dict__:
            return self.__dict__["_data_key_value"]
        options = {k: v for k, v in self.hparams.items() if k not in LOADER_OPTIONS and not k.endswith("_file")}
        key = cache_key(type(self).__qualname__, package_version(), options, getattr(self, "given_label_names", None))
        self.__dict__["_data_key_value"] = key
        return key

    def _identity(self, split: str) -> Any:
        """What names one split's rows: its local file's identity (a file that is gone: its path), or its Hub split."""
        files = self.data_files()
        if split in files:
            parts = {k: p for k, p in files.items() if k == split or k.startswith(f"{split}+")}  # seq2seq's extra files
            return {"given": self.hparams.get(f"{split}_file"),  # as given: seq2seq's record slice is part of it
                    **{k: file_identity(p) if Path(p).is_file() else p for k, p in parts.items()}}
        return [self.hparams.dataset_name, self.hparams.dataset_config, self._hub_split_names().get(split)]

    def _tokenizer_key(self) -> list:
        tok = self.tokenizer
        return [tok.name_or_path, len(tok), type(tok).__name__]

    # ---- sources: (where, record) streams per split, Hub first, local files win ---------------------------------------
    @cached_property
    def _hub(self):
        return load_hub(self.hparams.dataset_name, self.hparams.dataset_config, streaming=self.hparams.streaming)

    def _hub_split_names(self) -> dict[str, str]:
        return {s: self.hparams[f"{s}_split"] for s in ("train", "validation", "test")}

    def _hub_sources(self) -> dict[str, Any]:
        streams, self.hub_class_names = hub_streams(self._hub, self.hparams.dataset_name, self._hub_split_names())
        return streams

    def _sources(self) -> dict[str, Any]:
        """Split → a function yielding ``(where, record)``: the Hub dataset's splits, then local files (which win).
        A task may override it (seq2seq: record slices, extra training files)."""
        out = self._hub_sources() if self.hparams.dataset_name else {}
        for split, path in self.data_files().items():
            out[split] = lambda path=path: self.read_file(path)
        return out

    def _parsed_records(self, split: str, source) -> Iterator[dict]:
        for where, rec in source():
            parsed = self.parse_record(rec, where, split)
            if split == "predict":  # each prediction line names its input: the record's id, else its line number
                parsed["_id"] = rec.get("id", record_line(where)) if isinstance(rec, dict) else record_line(where)
            yield parsed

    # ---- the streaming pass: each split the stage reads, checked into a memory-mapped file -----------------------------
    def _reads(self, sources: dict[str, Any]) -> list[str]:
        """The splits this stage reads, train first (it fixes the label set the others are checked against): the
        stage's own (every split given when not connected), train to hold validation out of, and train for the label
        set unless given, from the Hub's ClassLabel, or the evaluated checkpoint's. A missing split is an error here."""
        if self.stage is None:
            return [s for s in SPLITS if s in sources]
        wanted = STAGE_SPLITS[self.stage]
        held_out = "validation" in wanted and "validation" not in sources
        if held_out and "train" not in sources:
            raise TaskheadError("validation needs --data.validation_file or a train split to hold out from")
        for split in wanted:
            if split not in sources and not (split == "validation" and held_out):
                raise TaskheadError(f"stage '{self.stage}' needs a {split} split: set --data.{split}_file (or a Hub dataset that has one)")
        needs_labels = self._learns_labels and not self.model_facts.get("label_names")
        reads = [s for s in wanted if s in sources]
        if self.hparams.streaming and "train" in reads:
            self._check_streaming(held_out, needs_labels)
            return [s for s in reads if s != "train"]  # the stream is read as it trains
        if "train" in sources and "train" not in reads and (held_out or needs_labels):
            reads.insert(0, "train")
        return reads

    @cached_property
    def data_facts(self) -> dict:
        """What the data tells the model (label names and counts), from one streaming pass over the splits this stage
        reads that also validates every record. Restored from the cache instead when these exact files (and options)
        passed before."""
        if self.hparams.model_name_or_path:
            self.check_model()
        if not self.hparams.dataset_name and not self.data_files():
            raise TaskheadError("no data: set --data.dataset_name or at least one of --data.{train,validation,test,predict}_file")
        sources = self._sources()
        if "_learns_labels" not in self.__dict__:  # asked before anything is restored or parsed: the task has a label
            facts = self.facts()                    # set, and no option, Hub ClassLabel or checkpoint gives it
            self._learns_labels = "label_names" in facts and facts["label_names"] is None
        if self.model_facts:
            self.restore_facts(self.model_facts)
        reads = self._reads(sources)
        self._facts_file = Path(self.hparams.cache_dir) / "facts-{}.json".format(
            cache_key(self._data_key(), {s: self._identity(s) for s in reads}, self.model_facts))
        if self._facts_file.is_file():
            facts = json.loads(self._facts_file.read_text())
            self.restore_facts(facts)
            return facts
        for split in reads:
            if split not in self.parsed:  # parsed for an earlier stage of this DataModule already
                self._parse_split(split)
        facts = self.facts()
        # what the data read here cannot tell (train's label counts, train being gone) the checkpoint's model does
        return {**facts, **{k: v for k, v in self.model_facts.items() if facts.get(k) is None}}

    def _parse_split(self, split: str):
        if self._tmp is None:  # parsed splits live here until tokenised into the cache; gone with the DataModule
            self._tmp = scratch_dir()
            weakref.finalize(self, shutil.rmtree, str(self._tmp), ignore_errors=True)
        rows = self.check_stream(split, self._parsed_records(split, self._sources()[split]))
        if split == "predict":
            rows = ({**r, "_id": json.dumps(r["_id"])} for r in rows)  # a string or a line number: one Arrow type
        ds = write_arrow(rows, self._tmp / f"{split}.arrow", drop=("where",))
        if ds is None:
            if split in self.data_files():
                raise TaskheadError(f"{self.data_files()[split]}: no records (empty file)")
            return None  # a Hub split with no usable rows (a test split without gold labels)
        self.parsed[split] = ds = self.finish_split(split, ds)
        return ds

    def _subset(self, split: str, held_out: bool):
        """The parsed rows of ``split`` this run uses: the seeded hold-out of train, then the seeded subset."""
        source = "train" if held_out and split in ("train", "validation") else split
        ds = self.parsed[source] if source in self.parsed else self._parse_split(source)
        if ds is None:
            raise TaskheadError(f"the {source} split has no usable rows")
        if held_out and split in ("train", "validation"):
            if self._held_out is None:
                col = self.stratify_column
                self._held_out = hold_out_indices(len(ds), numpy_column(ds, col) if col else None,
                                                  self.hparams.val_split, self.hparams.seed)
            ds = ds.select(self._held_out[0 if split == "train" else 1])
        # predict reads every row: a prediction per input (max_eval_samples bounds validation and test only)
        limit = {"train": self.hparams.max_train_samples, "predict": None}.get(split, self.hparams.max_eval_samples)
        if limit is not None and limit < len(ds):
            ds = ds.select(np.sort(np.random.default_rng(self.hparams.seed).permutation(len(ds))[:limit]))
        return ds
