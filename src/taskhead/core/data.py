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
(``facts``: label names, counts, number of choices) is cached, so a warm start reads no record at all. That pass and
the cache keys live in core/splits.py (``SplitPass``); ``--data.streaming``'s train stream in core/streaming.py.

A stage reads only the splits it needs (``STAGE_SPLITS``), plus train when the label set has to come from it. The
CLI ``connect``s the DataModule to its stage before it builds the model, so every split the stage reads is checked
before any output exists; evaluating a checkpoint, the model's own label set stands in for train (which may be gone).
Cache keys come from each file's identity (path, size, mtime, first/last MiB) and the options, never from the rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from taskhead.core.arrow import Encoder, InputRows, cache_key, load_cached, numpy_column, tokenise
from taskhead.core.pretrained import load_pretrained, load_tokenizer
from taskhead.core.readers import read_records
from taskhead.core.sampling import LengthGroupedBatchSampler, SortedBatchSampler
from taskhead.core.splits import SPLITS, STAGE_SPLITS, SplitPass
from taskhead.core.streaming import StreamedTrain
from taskhead.errors import TaskheadError, is_out_of_memory

class TaskDataModule(SplitPass, StreamedTrain, L.LightningDataModule):
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
                (the stream repeats, reshuffled, until then), a validation split of the dataset (none is held out)
                and the label set from the Hub's ClassLabel or ``--data.label_names`` (label counts stay unknown: no
                ``class_weights: balanced``). ``max_train_samples`` takes the stream's first rows. ``num_workers``
                W: each worker reads, parses and tokenises a share of its own (whole shards when the dataset has a
                multiple of ranks x W of them, else every (ranks x W)-th row, all reading the whole stream). A
                resumed run continues exactly (with the same number of workers): it skips the batches it trained on,
                reading them again. A bad record is named by its row in the share that reads it (the dataset's row
                when shares take every n-th row).
        """
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < val_split < 1.0:
            raise TaskheadError(f"--data.val_split must be in (0, 1), got {val_split}")
        if streaming and (not dataset_name or train_file):
            raise TaskheadError("--data.streaming streams a Hub dataset's train split: set --data.dataset_name and no "
                                "--data.train_file (local files are memory-mapped without streaming)")
        self._tokenizer = None
        self.datasets: dict[str, Any] = {}
        self._reported: set[str] = set()
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done in it), from a checkpoint
        # predict example indices → their {"id", input fields}, read from the predict split for predictions.jsonl
        self.predict_input_rows: InputRows | None = None
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
            self.predict_input_rows = InputRows(self.datasets["predict"], self.tokenizer.model_input_names, self.encoded_columns)
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
