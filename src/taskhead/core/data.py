"""TaskDataModule: load splits (Hub or local files), tokenise once into an on-disk cache, serve padded batches.

A task subclasses it and fills in four things, in the order data flows through them:

1. ``parse_record(rec, where, split)``: validate one raw record and return the fields the task keeps
   (errors name ``where``, the file and line).
2. ``encode(batch)``: tokenise a batch of parsed records (``datasets.map``, batched). Must return ``length``
   (tokens kept) and ``full_length`` (tokens before truncation) per example, for batching and the data report.
3. ``collate(features)``: pad one batch dynamically; returns ``{"inputs": {...}, "stats": {...}, ...}``. ``stats`` is
   part of the contract: ``{"samples", "tokens", "padded"}`` (examples, real tokens, tokens after padding; plain
   ints counted on CPU), read by ``TaskModule`` (the batch size of logged losses) and by the ``Throughput`` callback
   (tokens/s, padding share). ``pad_inputs`` returns both ``inputs`` and ``stats``.
4. ``report_extra(split, ds)``: task lines for the data report (label balance, ...).
5. ``model_args()``: what only the data knows and the model is built from (label names and counts, choices per
   example), by the model's argument names; the CLI passes it to the model's constructor.

No split is ever held as Python records. Each split is streamed record by record through ``read_file`` →
``parse_record`` → ``check_stream`` (cross-record and cross-split checks, e.g. a label train never saw) into a
memory-mapped Arrow file; ``finish_split`` does column-wise work on it (label ids), and what the pass learnt
(``facts``: label names, counts, number of choices) is cached, so a warm start reads no record at all.

A stage reads only the splits it needs (``STAGE_SPLITS``), plus train when the label set has to come from it. The
CLI ``connect``s the DataModule to its stage before it builds the model, so every split the stage reads is checked
before any output exists; evaluating a checkpoint, the model's own label set stands in for train (which may be gone).
Cache keys come from each file's identity (path, size, mtime, first/last MiB) and the options, never from the rows.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref
from collections.abc import Iterator
from functools import cached_property
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from taskhead.core.arrow import (Encoder, cache_key, file_identity, hold_out_indices, input_rows, load_cached, numpy_column,
                                 scratch_dir, tokenise, write_arrow)
from taskhead.core.pretrained import load_pretrained, load_tokenizer
from taskhead.core.readers import read_records
from taskhead.core.sources import hub_streams, load_hub, record_line
from taskhead.core.sampling import LengthGroupedBatchSampler, SortedBatchSampler
from taskhead.errors import TaskheadError, is_out_of_memory

SPLITS = ("train", "validation", "test", "predict")
STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ("predict",)}
# Options that change how batches are drawn, not what the tokenised data is: left out of the cache key (a streamed
# train split is never cached; validation and test are the same rows either way).
LOADER_OPTIONS = {"batch_size", "eval_batch_size", "num_workers", "group_by_length", "cache_dir", "streaming"}
STREAMING_NEEDS_MAX_STEPS = ("--data.streaming needs --trainer.max_steps: a stream has no length to end an epoch or "
                             "size the learning-rate schedule by")


def package_version() -> str:
    """taskhead's installed version (part of every cache key), read from the package metadata: importing it from the
    package's ``__init__`` would import the whole package from inside it."""
    try:
        return version("taskhead")
    except PackageNotFoundError:  # a source tree on PYTHONPATH without an install
        return "0+unknown"


class TaskDataModule(L.LightningDataModule):
    load_tokenizer = staticmethod(load_tokenizer)  # how ``tokenizer`` loads; generator tasks load theirs with a pad token
    stratify_column: str | None = None  # set by tasks whose held-out validation split should be stratified
    encoded_columns: tuple[str, ...] = ()  # columns the task's ``encode`` adds beside the model inputs (not inputs)

    def __init__(
        self,
        model_name_or_path: str | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        train_split: str = "train",
        validation_split: str = "validation",
        test_split: str = "test",
        val_split: float = 0.1,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        max_length: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        group_by_length: bool = True,
        num_workers: int = 0,
        seed: int = 42,
        cache_dir: str = ".cache/taskhead",
        streaming: bool = False,
    ) -> None:
        """
        Args:
            model_name_or_path: Tokenizer source; linked from ``model.model_name_or_path`` by the CLI.
            dataset_name: Hugging Face Hub dataset id (e.g. ``stanfordnlp/imdb``). Local files, when given, win.
            dataset_config: Hub dataset configuration name.
            train_file: Local training file (JSONL, JSON, CSV or TSV; ``.gz`` allowed).
            validation_file: Local validation file. Without one, ``val_split`` of train is held out.
            test_file: Local test file.
            predict_file: Local file to predict on (labels not needed).
            train_split: The Hub dataset's split used for training.
            validation_split: The Hub dataset's split used for validation (MNLI: ``validation_matched``).
            test_split: The Hub dataset's split used for testing (MNLI: ``test_matched``, which has no gold labels).
            val_split: Fraction of train held out for validation when no validation split exists (seeded).
            max_train_samples: Use a seeded random subset of this many training examples.
            max_eval_samples: Use a seeded random subset of this many validation and test examples.
            max_length: Truncate inputs to this many tokens (special tokens included).
            batch_size: Training batch size per device.
            eval_batch_size: Validation/test/predict batch size per device (default: ``2 * batch_size``).
            group_by_length: Draw training batches of similar length (less padding); off means plain shuffling.
            num_workers: DataLoader worker processes.
            seed: Seed for the validation hold-out, subsets and batch order.
            cache_dir: Where tokenised splits are cached (keyed by content, tokenizer and options).
            streaming: Stream the Hub dataset's train split instead of downloading it (larger than the disk): read
                per rank with ``split_dataset_by_node``, shuffled in a 10,000-row buffer, tokenised on the fly and
                length-grouped within mega-batches (``core/streaming.py``); validation and test are read as usual.
                Needs ``--data.dataset_name`` (local files are memory-mapped without it), ``--trainer.max_steps``
                (the stream repeats, reshuffled, until then), a validation split of the dataset (none is held out),
                ``num_workers 0`` and the label set from the Hub's ClassLabel or ``--data.label_names`` (label counts
                stay unknown: no ``class_weights: balanced``). ``max_train_samples`` takes the stream's first rows.
                A resumed run continues exactly: it skips the batches it trained on, reading them again. A bad record
                is named by its row in the stream its rank reads (the dataset's row on one rank of a one-shard
                dataset).
        """
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < val_split < 1.0:
            raise TaskheadError(f"--data.val_split must be in (0, 1), got {val_split}")
        if streaming and (not dataset_name or train_file):
            raise TaskheadError("--data.streaming streams a Hub dataset's train split: set --data.dataset_name and no "
                                "--data.train_file (local files are memory-mapped without streaming)")
        if streaming and num_workers:
            raise TaskheadError(f"--data.streaming reads and tokenises in the training process: set --data.num_workers 0, "
                                f"not {num_workers}")
        self._tokenizer = None
        self.datasets: dict[str, Any] = {}
        self._reported: set[str] = set()
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done in it), from a checkpoint
        self.predict_inputs: list[dict] = []  # per predict example: {"id", input fields}, for predictions.jsonl
        self.parsed: dict[str, Any] = {}  # validated splits, memory-mapped from a temporary directory
        self._tmp: Path | None = None
        self._held_out: tuple[np.ndarray, np.ndarray] | None = None  # (train rows, validation rows) of the train split
        self.stage: str | None = None  # set by ``connect``; None reads every split given
        self.model_facts: dict = {}  # the evaluated checkpoint's label names and counts, set by ``connect``

    # ---- task hooks -------------------------------------------------------------------------------------------------
    def parse_record(self, rec: dict, where: str, split: str) -> dict:
        raise NotImplementedError

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        raise NotImplementedError

    def collate(self, features: list[dict]) -> dict:
        raise NotImplementedError

    def report_extra(self, split: str, ds) -> list[str]:
        return []

    # Cross-record and cross-split checks run in the streaming pass: splits arrive train first, each record through
    # ``check_stream`` (raise with its ``where``), each written split through ``finish_split`` (column-wise work).
    def check_stream(self, split: str, records: Iterator[dict]) -> Iterator[dict]:
        """Check (and may rewrite) each parsed record of ``split`` as it streams past."""
        return records

    def finish_split(self, split: str, ds):
        """A split's parsed Arrow dataset, once written; return it (or a rewritten one)."""
        return ds

    def facts(self) -> dict:
        """What the streaming pass learnt (label names, counts), JSON-able: cached so a warm start skips the pass. A
        task with a label set has ``label_names`` in it, None until a split (train) fixes them."""
        return {}

    def restore_facts(self, facts: dict) -> None:
        """Take back what ``facts`` returned (a warm start: the same files passed the streaming pass before; or the
        label names and counts of the checkpoint being evaluated, which stand in for its training split)."""

    def read_file(self, path: str) -> Iterator[tuple[str, dict]]:
        """Yield ``(where, record)`` from a local file. Override for formats that are not JSONL/JSON/CSV/TSV
        (CoNLL columns, SQuAD JSON, parallel text files)."""
        return read_records(path)

    def model_args(self) -> dict:
        """What only the data knows and the model is built from, by the model's argument names (label names and
        counts, choices per example; nothing for tasks without a label set): the CLI passes it to the model's
        constructor, the one link from data to model. Reading it reads and checks every split this stage needs, so a
        bad file or option stops the run before any output is written. Tasks with such facts extend it."""
        _ = self.data_facts
        return {}

    def connect(self, stage: str, model_facts: dict | None = None) -> None:
        """The CLI, before it builds the model: the stage this run is for (only its splits are read, and train when
        the label set must come from it) and, evaluating a checkpoint, the facts its model was trained with
        (``label_names``, ``label_counts``), which then stand in for the training split."""
        if "data_facts" in self.__dict__ and (stage, model_facts or {}) != (self.stage, self.model_facts):
            del self.__dict__["data_facts"]
        self.stage, self.model_facts = stage, dict(model_facts or {})

    # ---- loading ------------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.hparams.model_name_or_path:
                raise TaskheadError("data.model_name_or_path is not set (the CLI links it from model.model_name_or_path)")
            self._tokenizer = self.load_tokenizer(self.hparams.model_name_or_path)
        return self._tokenizer

    def data_files(self) -> dict[str, str]:
        return {s: self.hparams[f"{s}_file"] for s in SPLITS if self.hparams[f"{s}_file"]}

    def check_model(self) -> None:
        """Options that the model cannot honour, found from its tokenizer and config before any weights are loaded:
        ``max_length`` beyond its positions, or a tokenizer with more tokens than its embedding table has rows."""
        from transformers import AutoConfig

        name, tok, max_length = self.hparams.model_name_or_path, self.tokenizer, self.hparams.max_length
        if tok.model_max_length < 1_000_000 and max_length > tok.model_max_length:  # no limit reads as ~1e30
            raise TaskheadError(f"--data.max_length {max_length} exceeds the model's limit of {tok.model_max_length} tokens")
        try:
            config = load_pretrained(AutoConfig, tok.name_or_path)  # the tokenizer's path: GGUF already resolved
        except (TaskheadError, ValueError):
            return  # no readable config: loading the model will say why
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        where = f"in the config of '{name}'"
        positions = getattr(text, "max_position_embeddings", None)
        if isinstance(positions, int) and max_length > positions:
            raise TaskheadError(f"--data.max_length {max_length} exceeds the model's limit of {positions} tokens "
                                f"(max_position_embeddings {where})")
        rows = getattr(text, "vocab_size", None)
        if isinstance(rows, int) and len(tok) > rows:
            raise TaskheadError(f"--model.model_name_or_path {name}: the tokenizer has {len(tok):,} tokens but the model's "
                                f"embedding table has {rows:,} (vocab_size {where}); use the tokenizer it was trained with")

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
        limit = self.hparams.max_train_samples if split == "train" else self.hparams.max_eval_samples
        if limit is not None and limit < len(ds):
            ds = ds.select(np.sort(np.random.default_rng(self.hparams.seed).permutation(len(ds))[:limit]))
        return ds

    # ---- setup: split, subset, tokenise (cached) ----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Under DDP, local rank 0 of each node tokenises what this stage needs into the cache while the other ranks
        wait at Lightning's barrier; their ``setup`` then reads the cache instead of tokenising the same data again."""
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            self.setup(trainer.state.fn.value)

    def setup(self, stage: str) -> None:
        wanted = [s for s in STAGE_SPLITS[stage] if s not in self.datasets]  # built already (prepare_data on this rank)
        if not wanted:
            return
        if self.stage != stage:
            self.connect(stage, self.model_facts)  # read what this stage needs (used without the CLI, or a new stage)
        facts = self.data_facts  # every split the stage reads, checked; a missing one is an error there
        held_out = "validation" in wanted and "validation" not in self._sources()
        cache = Path(self.hparams.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        for split in wanted:
            if split == "train" and self.hparams.streaming:
                self.datasets["train"] = self._train_stream()
                continue
            source = "train" if held_out and split in ("train", "validation") else split
            key = cache_key(self._data_key(), self._tokenizer_key(), self._identity(source), facts.get("label_names"), split)
            file = cache / f"{split}-{key}.arrow"
            ds = load_cached(file)
            self.datasets[split] = ds if ds is not None else tokenise(Encoder(self), split, self._subset(split, held_out), file)
        if held_out:
            if self._held_out is not None:
                facts["held_out"] = [len(self._held_out[1]), len(self._held_out[0]) + len(self._held_out[1])]
            if "held_out" in facts:
                how = f", stratified by {self.stratify_column}" if self.stratify_column else ""
                rank_zero_info(f"No validation split given: held out {facts['held_out'][0]:,} of {facts['held_out'][1]:,} "
                               f"training examples ({self.hparams.val_split:.0%}{how}, seed {self.hparams.seed}).")
        facts_file = self._facts_file
        if not facts_file.is_file() or json.loads(facts_file.read_text()) != facts:
            tmp = facts_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(facts))
            os.replace(tmp, facts_file)
        if "predict" in wanted:  # what predictions.jsonl repeats of each input: its id and its fields
            self.predict_inputs = input_rows(self.datasets["predict"], self.tokenizer.model_input_names, self.encoded_columns)
        for split in wanted:
            self._report(split)

    def _report(self, split: str) -> None:
        if split in self._reported:
            return
        self._reported.add(split)
        ds = self.datasets[split]
        if split == "train" and self.hparams.streaming:
            rank_zero_info(f"[data] train: streamed from {self.hparams.dataset_name}[{self.hparams.train_split}] "
                           "(lengths, truncation and labels are not known ahead)")
            return
        full = numpy_column(ds, "full_length")  # one Arrow read, not a Python call per row
        p50, p90, p99 = np.percentile(full, [50, 90, 99]).astype(int)
        trunc = float((full > self.hparams.max_length).mean())
        lines = [
            f"[data] {split}: {len(ds):,} examples; tokens p50 {p50} / p90 {p90} / p99 {p99} / max {full.max()}; "
            f"{trunc:.1%} truncated at max_length {self.hparams.max_length}"
        ]
        lines += [f"[data] {split}: {line}" for line in self.report_extra(split, ds)]
        rank_zero_info("\n".join(lines))

    # ---- loaders ------------------------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, split: str, batch_sampler) -> DataLoader:
        import torch

        return DataLoader(
            self.datasets[split],
            batch_sampler=batch_sampler,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def on_exception(self, exception: BaseException) -> None:
        """Lightning calls this on any error in fit/validate/test/predict: an out-of-memory error gets the two
        options that set activation memory, with their values, for ``taskhead`` to print."""
        if is_out_of_memory(exception):
            bs, ml = self.hparams.batch_size, self.hparams.max_length
            exception.add_note(
                f"at --data.batch_size {bs} (eval: {self.hparams.eval_batch_size or 2 * bs}) and --data.max_length {ml}: "
                "lower one of them (and raise --trainer.accumulate_grad_batches to keep the effective batch size)"
            )

    # ---- mid-epoch resume -------------------------------------------------------------------------------------------
    # Checkpoints hold the training loader's position (epoch, batches of it done); a resumed run's sampler skips those
    # batches. Kept in the DataModule's state because Lightning restores it before the first train_dataloader() call;
    # a stateful DataLoader's own state would be restored too late here: configure_optimizers asks for
    # trainer.estimated_stepping_batches, which builds the training loader and its iterator before loop state loads.
    def state_dict(self) -> dict[str, int]:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        return {"train_epoch": trainer.current_epoch, "train_batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = (state["train_epoch"], state["train_batches_done"]) if state else None

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        world, rank = self._world()
        if self.hparams.streaming:
            return self._stream_loader(ds, world, rank)
        if self.hparams.group_by_length:
            sampler = LengthGroupedBatchSampler(numpy_column(ds, "length"), self.hparams.batch_size, self.hparams.seed, num_replicas=world, rank=rank)
        else:  # plain shuffling: a mega-batch of one batch sorts nothing across batches
            sampler = LengthGroupedBatchSampler(
                np.zeros(len(ds), dtype=np.int64), self.hparams.batch_size, self.hparams.seed, num_replicas=world, rank=rank
            )
        resume_at, self._resume_at = self._resume_at, None
        if resume_at is not None:
            epoch, done = resume_at
            if done >= len(sampler):  # saved at the epoch's end: the next epoch starts from its first batch
                sampler.set_epoch(epoch + 1)
            else:
                sampler.resume(epoch, done)
        return self._loader("train", sampler)

    def _eval_loader(self, split: str) -> DataLoader:
        world, rank = self._world()
        bs = self.hparams.eval_batch_size or 2 * self.hparams.batch_size
        n = len(self.datasets[split])
        if -(-n // bs) < world:  # the same test on every rank: all stop with this message, none waits in a collective
            raise TaskheadError(
                f"the {split} split has {n:,} examples: {-(-n // bs)} batch(es) of --data.eval_batch_size {bs} cannot "
                f"give each of the {world} ranks one; set --data.eval_batch_size {max(n // world, 1)} or less"
            )
        return self._loader(split, SortedBatchSampler(numpy_column(self.datasets[split], "length"), bs, num_replicas=world, rank=rank))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")

    # ---- shared collate helper ----------------------------------------------------------------------------------------
    def pad_inputs(self, features: list[dict]) -> dict:
        """Pad the tokenizer's model inputs to the longest in the batch; count real and padded tokens (on CPU)."""
        names = [n for n in self.tokenizer.model_input_names if n in features[0]]
        inputs = self.tokenizer.pad({n: [f[n] for f in features] for n in names}, return_tensors="pt")
        mask = inputs["attention_mask"]
        stats = {"samples": len(features), "tokens": int(mask.sum()), "padded": mask.numel()}
        return {"inputs": dict(inputs), "stats": stats}

    # ---- --data.streaming: the train split as a Hub stream (core/streaming.py) ----------------------------------------
    def _check_streaming(self, held_out: bool, needs_labels: bool) -> None:
        if held_out:
            raise TaskheadError(f"--data.streaming: dataset '{self.hparams.dataset_name}' has no validation split and "
                                "none is held out of a stream; set --data.validation_split or --data.validation_file")
        if needs_labels and getattr(self, "problem_type", None) != "regression":  # a regression score has no label set
            raise TaskheadError("--data.streaming: the label set cannot be read from a stream ahead of training; give "
                                "--data.label_names (or use a dataset whose label column is a ClassLabel)")
        trainer = self.trainer
        if trainer is not None and trainer.max_steps in (None, -1):
            raise TaskheadError(STREAMING_NEEDS_MAX_STEPS)

    def _train_stream(self):
        self._check_streaming(False, False)  # the trainer is known by now
        stream = self._hub[self.hparams.train_split]
        n = self.hparams.max_train_samples
        return stream.take(n) if n is not None else stream

    def _stream_loader(self, stream, world: int, rank: int) -> DataLoader:
        import torch

        from taskhead.core.streaming import StreamBatches

        resume_at, self._resume_at = self._resume_at, None  # the stream never ends its epoch: batches done count
        batches = StreamBatches(stream, f"{self.hparams.dataset_name}[{self.hparams.train_split}]", self,
                                self.hparams.batch_size, self.hparams.seed, self.hparams.group_by_length,
                                num_replicas=world, rank=rank, skip=resume_at[1] if resume_at else 0)
        return DataLoader(batches, batch_size=None, collate_fn=self.collate, pin_memory=torch.cuda.is_available())
