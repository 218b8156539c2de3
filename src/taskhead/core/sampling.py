"""Batch samplers that cut padding: length-grouped for training, length-sorted for evaluation.

Both shard batches across data-parallel ranks themselves (the trainer runs with ``use_distributed_sampler=False``),
so the same code serves one CPU and many GPUs. Neither pads a split with repeated samples: evaluation under DDP sees
every example exactly once, which keeps metrics identical to a single-process run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from taskhead.errors import TaskheadError


def as_lengths(lengths: Sequence[int] | np.ndarray) -> torch.Tensor:
    """Lengths as one int64 tensor. Pass a numpy array (``numpy_column(ds, "length")``): it is shared, not copied.
    A ``datasets`` lazy ``Column`` would be read one element at a time here — O(rows) table selects, minutes at 500k
    rows — so it is refused; plain lists (tests, small inputs) are converted in one call."""
    if isinstance(lengths, np.ndarray):
        return torch.from_numpy(np.array(lengths, dtype=np.int64))  # a copy: Arrow's buffers are read-only
    if isinstance(lengths, torch.Tensor):
        return lengths.to(torch.int64)
    if not isinstance(lengths, (list, tuple, range)):
        raise TypeError(f"lengths must be a numpy array (read the Arrow column at once), got {type(lengths).__name__}")
    return torch.as_tensor(lengths, dtype=torch.int64)


class LengthGroupedBatchSampler:
    """Shuffled mega-batches, each sorted by length, cut into batches whose order is shuffled again.

    Seeded by ``seed + epoch`` (call :meth:`set_epoch`), so every rank draws the same permutation and takes its own
    slice. With ``num_replicas > 1`` the batch list is cut to a multiple of ``num_replicas`` (the last, partial round
    is dropped) so that every rank runs the same number of optimiser steps.

    Resumable mid-epoch: :meth:`resume` makes the next pass over ``epoch`` skip the batches already trained on, so
    a run restarted from a checkpoint sees exactly the batches it would have seen uninterrupted.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        mega_batch_mult: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.lengths = as_lengths(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches already done in it), set by resume()
        # Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` at each epoch start, not on the batch
        # sampler itself: pointing ``sampler`` here makes every epoch draw a new permutation.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue ``epoch`` after its first ``batches_done`` batches (this rank's count)."""
        self.epoch = epoch
        self._skip = (epoch, batches_done)

    def _order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices grouped in length-sorted mega-batches, this epoch's batch numbers in drawn order): two int64
        tensors rather than a Python list per batch (10M rows would be 10M Python ints held for the whole epoch).
        The same draws as cutting each mega-batch into batches: mega-batches hold whole batches, bar the last."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n, bs = len(self.lengths), self.batch_size
        perm = torch.randperm(n, generator=g)
        megas = perm.split(bs * self.mega_batch_mult)
        flat = torch.cat([m[torch.argsort(self.lengths[m], descending=True, stable=True)] for m in megas]) if n else perm
        order = torch.randperm(-(-n // bs), generator=g)
        if self.num_replicas > 1:
            order = order[: len(order) - len(order) % self.num_replicas]
        return flat, order

    def __iter__(self) -> Iterator[list[int]]:
        flat, order = self._order()
        mine = order[self.rank :: self.num_replicas]
        if self._skip is not None and self._skip[0] == self.epoch:
            mine = mine[self._skip[1] :]
        self._skip = None
        bs = self.batch_size
        for b in mine.tolist():
            yield flat[b * bs : (b + 1) * bs].tolist()

    def __len__(self) -> int:
        """Batches per epoch (a resumed pass yields fewer: Lightning counts the ones done before)."""
        return -(-len(self.lengths) // self.batch_size) // self.num_replicas


class SortedBatchSampler:
    """Batches of examples sorted longest first; each rank takes every ``num_replicas``-th batch, none repeated.

    Every rank gets the same number of batches: under FSDP (or any sharded strategy) every forward is a collective,
    and a rank with one batch more would wait forever for the others. When ``ceil(n / batch_size)`` is not a multiple
    of ``num_replicas``, the sorted examples are cut into the next multiple of batches instead, of near-equal sizes
    (all ≤ ``batch_size``): smaller batches, never a repeated example, so metrics stay exact. That needs at least one
    example per rank.

    Callers that need input order back (prediction) carry the example index through the batch. Holds one int64
    tensor of the order and the batch boundaries in it; batches are cut as they are drawn.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.order = torch.argsort(as_lengths(lengths), descending=True, stable=True)
        self.batch_size = batch_size
        n = len(self.order)
        count = -(-n // batch_size)
        if count % num_replicas == 0:  # full batches, the last one partial
            self.bounds = [min(b * batch_size, n) for b in range(count + 1)]
        else:  # the next multiple of num_replicas, sizes differing by at most one (≤ batch_size: more batches)
            count += num_replicas - count % num_replicas
            if count > n:
                raise TaskheadError(f"{n} evaluation example(s) cannot give each of the {num_replicas} ranks a batch")
            size, extra = divmod(n, count)
            self.bounds = [b * size + min(b, extra) for b in range(count + 1)]
        self.mine = range(rank, count, num_replicas)  # this rank's batch numbers

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.mine:
            yield self.order[self.bounds[b] : self.bounds[b + 1]].tolist()

    def __len__(self) -> int:
        return len(self.mine)
