"""TaskDataModule: load splits (Hub or local files), tokenise once into an on-disk cache, serve padded batches.

A task subclasses it and fills in four things, in the order data flows through them:

1. ``parse_record(rec, where, split)``: validate one raw record and return the fields the task keeps
   (errors name ``where``, the file and line).
2. ``encode(batch)``: tokenise a batch of parsed records (``datasets.map``, batched). Must return ``length``
   (tokens kept) and ``full_length`` (tokens before truncation) per example, for batching and the data report.
3. ``collate(features)``: pad one batch dynamically; returns ``{"inputs": {...}, ...}``.
4. ``report_extra(split, ds)``: task lines for the data report (label balance, ...).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from taskhead import __version__
from taskhead.core.pretrained import OFFLINE_HINT, hub_offline, hub_unreachable, load_pretrained, load_tokenizer
from taskhead.core.readers import read_records
from taskhead.core.sampling import LengthGroupedBatchSampler, SortedBatchSampler
from taskhead.errors import TaskheadError, is_out_of_memory

SPLITS = ("train", "validation", "test", "predict")
# Options that change how batches are drawn, not what the tokenised data is: left out of the cache key.
LOADER_OPTIONS = {"batch_size", "eval_batch_size", "num_workers", "group_by_length", "cache_dir"}


def record_line(where: str) -> int | str:
    """``path:12`` → 12 (the line a record starts on); ``where`` itself when it names no line."""
    tail = str(where).rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else str(where)


class TaskDataModule(L.LightningDataModule):
    stratify_column: str | None = None  # set by tasks whose held-out validation split should be stratified

    def __init__(
        self,
        model_name_or_path: str | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
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
        """
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < val_split < 1.0:
            raise TaskheadError(f"--data.val_split must be in (0, 1), got {val_split}")
        self._tokenizer = None
        self.datasets: dict[str, Any] = {}
        self._reported: set[str] = set()
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done in it), from a checkpoint
        self.predict_inputs: list[dict] = []  # per predict example: {"id", input fields}, for predictions.jsonl

    # ---- task hooks -------------------------------------------------------------------------------------------------
    def parse_record(self, rec: dict, where: str, split: str) -> dict:
        raise NotImplementedError

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        raise NotImplementedError

    def collate(self, features: list[dict]) -> dict:
        raise NotImplementedError

    def report_extra(self, split: str, ds) -> list[str]:
        return []

    def check_splits(self, raw: dict[str, list[dict]]) -> None:
        """Cross-split checks (e.g. a label in test that train never saw). Raise TaskheadError."""

    def read_file(self, path: str) -> Iterator[tuple[str, dict]]:
        """Yield ``(where, record)`` from a local file. Override for formats that are not JSONL/JSON/CSV/TSV
        (CoNLL columns, SQuAD JSON, parallel text files)."""
        return read_records(path)

    # Data facts the CLI links into the model (``model.label_names``, ``model.label_counts``); None when the task
    # has no label set. Tasks with labels override them as properties.
    @property
    def label_names(self) -> list[str] | None:
        """None: no label set. The CLI reads it (linked to ``model.label_names``) before it builds the model or the
        trainer, so reading and checking every split here stops a bad file or option before any output is written."""
        _ = self.raw
        return None

    label_counts: list[int] | None = None

    # ---- loading ------------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.hparams.model_name_or_path:
                raise TaskheadError("data.model_name_or_path is not set (the CLI links it from model.model_name_or_path)")
            self._tokenizer = load_tokenizer(self.hparams.model_name_or_path)
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

    @cached_property
    def raw(self) -> dict[str, list[dict]]:
        """Parsed, validated records of every available split (loaded once, on first use), after ``check_model``."""
        if self.hparams.model_name_or_path:
            self.check_model()
        files = self.data_files()
        raw: dict[str, list[dict]] = {}
        if self.hparams.dataset_name:
            raw.update(self._load_hub())
        for split, path in files.items():
            raw[split] = []
            for where, rec in self.read_file(path):
                parsed = self.parse_record(rec, where, split)
                if split == "predict":  # each prediction line names its input: the record's id, else its line number
                    parsed["_id"] = rec.get("id", record_line(where)) if isinstance(rec, dict) else record_line(where)
                raw[split].append(parsed)
            if not raw[split]:
                raise TaskheadError(f"{path}: no records (empty file)")
        if not raw:
            raise TaskheadError("no data: set --data.dataset_name or at least one of --data.{train,validation,test,predict}_file")
        self.check_splits(raw)
        return raw

    def _load_hub(self) -> dict[str, list[dict]]:
        import datasets

        name, config = self.hparams.dataset_name, self.hparams.dataset_config
        if not hub_offline() and not Path(name).exists() and (why := hub_unreachable()):
            raise TaskheadError(f"dataset '{name}': the Hub is out of reach ({why}); {OFFLINE_HINT} "
                                "(a dataset already in the local cache loads with HF_HUB_OFFLINE=1)")
        try:
            dd = datasets.load_dataset(name, config)
        except Exception as e:  # the Hub client raises many types; the user needs the first line only
            raise TaskheadError(f"could not load dataset '{name}' ({config}): {str(e).splitlines()[0]}") from None
        out = {}
        for split in ("train", "validation", "test"):
            if split not in dd:
                continue
            ds = dd[split]
            class_labels = {c: f for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
            self.hub_class_names = {c: f.names for c, f in class_labels.items()}
            recs = []
            for i, rec in enumerate(ds):
                for c, f in class_labels.items():  # ints → names, so local and Hub labels are handled alike
                    rec[c] = f.int2str(rec[c]) if rec[c] >= 0 else None
                if split == "test" and any(rec[c] is None for c in class_labels):
                    continue  # Hub test splits without gold labels (label -1)
                recs.append(self.parse_record(rec, f"{name}[{split}] row {i}", split))
            out[split] = recs
        return out

    # ---- setup: split, subset, tokenise (cached) ----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Under DDP, local rank 0 of each node tokenises what this stage needs into the cache while the other ranks
        wait at Lightning's barrier; their ``setup`` then reads the cache instead of tokenising the same data again."""
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            self.setup(trainer.state.fn.value)

    def setup(self, stage: str) -> None:
        wanted = {"fit": ["train", "validation"], "validate": ["validation"], "test": ["test"], "predict": ["predict"]}[stage]
        wanted = [s for s in wanted if s not in self.datasets]  # built already (prepare_data on this rank)
        if not wanted:
            return
        raw = dict(self.raw)
        if "validation" in wanted and "validation" not in raw:
            if "train" not in raw:
                raise TaskheadError("validation needs --data.validation_file or a train split to hold out from")
            raw["train"], raw["validation"] = self._hold_out(raw["train"])
        for split in wanted:
            if split not in raw:
                raise TaskheadError(f"stage '{stage}' needs a {split} split: set --data.{split}_file (or a Hub dataset that has one)")
            records = raw[split]
            limit = self.hparams.max_train_samples if split == "train" else self.hparams.max_eval_samples
            if limit is not None and limit < len(records):
                keep = np.random.default_rng(self.hparams.seed).permutation(len(records))[:limit]
                records = [records[i] for i in sorted(keep)]
            if split == "predict":  # what predictions.jsonl repeats of each input: its id and its fields
                self.predict_inputs = [{"id": r.get("_id", i), **{k: v for k, v in r.items() if k not in ("where", "_id", "id")}}
                                       for i, r in enumerate(records)]
            # "where" (file:line) serves error messages only: it stays out of the dataset and the cache key
            rows = [{**{k: v for k, v in r.items() if k not in ("where", "_id")}, "idx": i} for i, r in enumerate(records)]
            self.datasets[split] = self._encode_cached(split, rows)
            self._report(split)

    def _hold_out(self, train: list[dict]) -> tuple[list[dict], list[dict]]:
        import datasets

        idx = datasets.Dataset.from_dict({"i": list(range(len(train)))})
        col = self.stratify_column
        if col:
            idx = idx.add_column(col, [r[col] for r in train])
            idx = idx.cast_column(col, datasets.ClassLabel(num_classes=max(idx[col]) + 1))
        parts = idx.train_test_split(test_size=self.hparams.val_split, seed=self.hparams.seed, stratify_by_column=col)
        tr, va = sorted(parts["train"]["i"]), sorted(parts["test"]["i"])
        how = f", stratified by {col}" if col else ""
        rank_zero_info(
            f"No validation split given: held out {len(va):,} of {len(train):,} training examples "
            f"({self.hparams.val_split:.0%}{how}, seed {self.hparams.seed})."
        )
        return [train[i] for i in tr], [train[i] for i in va]

    def _encode_cached(self, split: str, rows: list[dict]):
        import datasets

        tok = self.tokenizer
        options = {k: v for k, v in self.hparams.items() if k not in LOADER_OPTIONS and not k.endswith("_file")}
        key = hashlib.sha256()
        key.update(json.dumps([type(self).__qualname__, __version__, tok.name_or_path, len(tok), type(tok).__name__,
                               options], sort_keys=True, default=str).encode())
        for r in rows:
            key.update(json.dumps(r, sort_keys=True, default=str).encode())
        cache = Path(self.hparams.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        return datasets.Dataset.from_list(rows).map(
            self.encode,
            batched=True,
            cache_file_name=str(cache / f"{split}-{key.hexdigest()[:20]}.arrow"),
            load_from_cache_file=True,
            desc=f"Tokenising {split}",
        )

    def _report(self, split: str) -> None:
        if split in self._reported:
            return
        self._reported.add(split)
        ds = self.datasets[split]
        full = np.asarray(ds["full_length"])
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
        if self.hparams.group_by_length:
            sampler = LengthGroupedBatchSampler(ds["length"], self.hparams.batch_size, self.hparams.seed, num_replicas=world, rank=rank)
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
        return self._loader(split, SortedBatchSampler(self.datasets[split]["length"], bs, num_replicas=world, rank=rank))

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
