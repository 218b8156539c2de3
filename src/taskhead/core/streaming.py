"""``--data.streaming``: training batches from a Hub split read as a ``datasets.IterableDataset``, never written to disk.

The stream, per rank: ``split_dataset_by_node`` (whole shards per rank when their number
allows, else every ``world``-th row), ``shuffle`` (shard order and a ``SHUFFLE_BUFFER``-row buffer, seeded by
``seed`` + pass) → the task's ``parse_record`` and ``check_stream`` (a bad record stops the run naming its row) →
mega-batches of ``batch_size * MEGA_BATCH_MULT`` examples tokenised at once by the task's ``encode``, sorted by length,
cut into batches whose order is shuffled (``LengthGroupedBatchSampler``'s scheme, inside the buffer).

With ``--data.num_workers`` W, each DataLoader worker of a rank reads a share of its own (``split_dataset_by_node`` over
ranks x workers), so reading, parsing and tokenising run beside training. The stream repeats, a new shuffle each pass,
so training ends at ``--trainer.max_steps`` and every rank runs the same number of steps. Everything is seeded, so the
batches are a pure function of (seed, rank, world, workers): a resumed run skips the batches it had trained on
(re-reading and re-tokenising them, not training on them) and continues exactly, given the same number of workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from taskhead.core.arrow import Encoder
from taskhead.core.sources import class_label_columns, hub_record
from taskhead.errors import TaskheadError

STREAMING_NEEDS_MAX_STEPS = ("--data.streaming needs --trainer.max_steps: a stream has no length to end an epoch or "
                             "size the learning-rate schedule by")
SHUFFLE_BUFFER = 10_000  # rows in datasets' shuffle buffer (before length grouping)
MEGA_BATCH_MULT = 50  # batches per length-sorted mega-batch, as LengthGroupedBatchSampler


def length_grouped(examples: Iterable[dict], batch_size: int, mega_batch: int, rng: np.random.Generator
                   ) -> Iterator[list[dict]]:
    """Batches of similar length: each run of ``mega_batch`` examples sorted longest first, cut into batches of
    ``batch_size``, yielded in a shuffled order. ``mega_batch == batch_size`` sorts nothing across batches."""
    examples = iter(examples)
    while mega := list(itertools.islice(examples, mega_batch)):
        mega.sort(key=lambda e: -e["length"])  # stable: ties keep their (shuffled) order
        batches = [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
        for b in rng.permutation(len(batches)):
            yield batches[b]


class StreamBatches(torch.utils.data.IterableDataset):
    """The training batches of one rank from a streamed split: lists of encoded examples for the task's ``collate``
    (use with ``DataLoader(batch_size=None)``; with ``num_workers`` W each worker reads, parses and tokenises a 1/W
    share of the rank's stream). Endless: pass after pass over the stream, each shuffled anew.

    Args:
        stream: The split, a ``datasets.IterableDataset`` (rows as the Hub gives them).
        where: How rows are named in errors, e.g. ``name[train]``: ``f"{where} row {i}"``.
        dm: The task's DataModule (parse_record, check_stream, encode; a trainer-less copy is kept).
        skip: Batches to skip at the start (a resumed run: the ones this rank trained on before).
    """

    def __init__(self, stream, where: str, dm, batch_size: int, seed: int, group_by_length: bool = True,
                 num_replicas: int = 1, rank: int = 0, skip: int = 0) -> None:
        self.stream, self.where, self.encoder = stream, where, Encoder(dm)
        self.batch_size, self.seed, self.group_by_length = batch_size, seed, group_by_length
        self.num_replicas, self.rank, self.skip = num_replicas, rank, skip

    def _examples(self, part, epoch: int) -> Iterator[dict]:
        """One pass over ``part`` (this rank's, or this worker's, share): parsed, checked and encoded, one mega-batch at
        a time. Read through ``iter``: iterating the dataset itself inside a DataLoader worker would shard it again,
        by worker and by whole files only (datasets' own worker split: a one-file dataset would feed one worker)."""
        dm = self.encoder.dm
        single, sequences = class_label_columns(self.stream.features or {})
        part = part.shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER)
        part.set_epoch(epoch)
        records = (dm.parse_record(hub_record(rec, single, sequences), f"{self.where} row {rec.pop('_row')}", "train")
                   for batch in part.iter(batch_size=1_000) for rec in (dict(zip(batch, row)) for row in zip(*batch.values())))
        rows = dm.check_stream("train", records)
        chunk, seen = self.batch_size * MEGA_BATCH_MULT, 0
        while parsed := list(itertools.islice(rows, chunk)):
            columns = {k: [r[k] for r in parsed] for k in parsed[0] if k != "where"}
            out = self.encoder(columns, list(range(seen, seen + len(parsed))))  # idx: the example's place in the pass
            # a row per encoded example (QA: per window, each with its example's idx), beside its parsed fields
            yield from ({k: v[i] for k, v in out.items()} | {k: c[out["idx"][i] - seen] for k, c in columns.items() if k not in out}
                        for i in range(len(out["length"])))
            seen += len(parsed)

    def __iter__(self) -> Iterator[list[dict]]:
        from datasets.distributed import split_dataset_by_node

        # DataLoader workers each read a stream of their own: W workers on R ranks read R * W streams. The DataLoader
        # takes batches from its workers in turn (0, 1, ..., W-1, 0, ...), so batch k of a rank is batch k // W of its
        # stream k % W; a resumed run that skips S batches starts again at worker 0, so worker w serves stream
        # (S + w) % W from its batch (S + w) // W, and the run continues in the same order.
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        stream = (self.skip + worker) % workers
        # rows numbered before the split: the dataset's own row when streams take every n-th row (few shards), else
        # the row within this stream's shards
        rows = self.stream.map(lambda _, i: {"_row": i}, batched=True, with_indices=True)
        part = split_dataset_by_node(rows, rank=self.rank * workers + stream, world_size=self.num_replicas * workers)
        seed = [self.seed, self.rank] + ([stream] if workers > 1 else [])
        mega = self.batch_size * (MEGA_BATCH_MULT if self.group_by_length else 1)

        def passes() -> Iterator[list[dict]]:
            for epoch in itertools.count():
                empty = True
                for batch in length_grouped(self._examples(part, epoch), self.batch_size, mega,
                                            np.random.default_rng([*seed, epoch])):
                    empty = False
                    yield batch
                if empty:  # would loop forever on nothing
                    raise TaskheadError(f"{self.where}: share {self.rank * workers + stream} of {self.num_replicas * workers} "
                                        f"(ranks x --data.num_workers) has no rows: the stream has fewer rows than shares")

        return itertools.islice(passes(), (self.skip + worker) // workers, None)


class StreamedTrain:
    """``--data.streaming`` in ``TaskDataModule`` (mixed in): its checks, the train split as a stream, its loader."""

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

        resume_at, self._resume_at = self._resume_at, None  # the stream never ends its epoch: batches done count
        batches = StreamBatches(stream, f"{self.hparams.dataset_name}[{self.hparams.train_split}]", self,
                                self.hparams.batch_size, self.hparams.seed, self.hparams.group_by_length,
                                num_replicas=world, rank=rank, skip=resume_at[1] if resume_at else 0)
        workers = self.hparams.num_workers
        return DataLoader(batches, batch_size=None, collate_fn=self.collate, pin_memory=torch.cuda.is_available(),
                          num_workers=workers, persistent_workers=workers > 0)
