import random

from taskhead.core.sampling import LengthGroupedBatchSampler, SortedBatchSampler

_rng = random.Random(0)
LENGTHS = [_rng.randint(5, 500) for _ in range(1003)]


def test_length_grouped_covers_every_index_once_and_groups_lengths():
    s = LengthGroupedBatchSampler(LENGTHS, batch_size=16, seed=3, mega_batch_mult=8)
    batches = list(s)
    assert len(batches) == len(s) == 63
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(LENGTHS)))
    padded = sum(len(b) * max(LENGTHS[i] for i in b) for b in batches)
    rnd = LengthGroupedBatchSampler([0] * len(LENGTHS), batch_size=16, seed=3, mega_batch_mult=8)
    padded_random = sum(len(b) * max(LENGTHS[i] for i in b) for b in rnd)
    assert padded < 0.8 * padded_random


def test_seeded_and_epoch_dependent():
    a = LengthGroupedBatchSampler(LENGTHS, 16, seed=1)
    b = LengthGroupedBatchSampler(LENGTHS, 16, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_ranks_get_disjoint_equal_shares():
    shares = [list(LengthGroupedBatchSampler(LENGTHS, 16, seed=5, num_replicas=2, rank=r)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(LengthGroupedBatchSampler(LENGTHS, 16, num_replicas=2))
    seen = [i for share in shares for b in share for i in b]
    assert len(seen) == len(set(seen))


def test_sorted_eval_batches_cover_all_once_across_ranks():
    shares = [list(SortedBatchSampler(LENGTHS, 32, num_replicas=3, rank=r)) for r in range(3)]
    seen = sorted(i for share in shares for b in share for i in b)
    assert seen == list(range(len(LENGTHS)))  # no repeats, nothing lost: DDP metrics equal single-process ones
    single = list(SortedBatchSampler(LENGTHS, 32))
    assert all(LENGTHS[b[0]] >= LENGTHS[b[-1]] for b in single)


def test_lightning_sets_the_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    s = LengthGroupedBatchSampler(LENGTHS, 16, seed=1)
    first = list(s)
    _set_sampler_epoch(DataLoader(list(range(len(LENGTHS))), batch_sampler=s), 3)
    assert s.epoch == 3 and list(s) != first
