import random

import pytest

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


@pytest.mark.parametrize("n, batch_size, world", [(1003, 32, 3), (75, 16, 2), (75, 8, 2), (20, 32, 2), (7, 2, 4),
                                                   (5, 100, 5), (64, 8, 8), (33, 4, 1)])
def test_sorted_eval_batches_are_equal_in_count_on_every_rank(n, batch_size, world):
    """Under FSDP every forward is a collective: a rank with one eval batch more than another would hang. Every rank
    gets the same count, each example exactly once, no batch over the batch size, still longest first."""
    lengths = LENGTHS[:n]
    shares = [list(SortedBatchSampler(lengths, batch_size, num_replicas=world, rank=r)) for r in range(world)]
    assert len({len(share) for share in shares}) == 1
    assert all(len(SortedBatchSampler(lengths, batch_size, world, r)) == len(shares[r]) for r in range(world))
    seen = sorted(i for share in shares for b in share for i in b)
    assert seen == list(range(n))
    assert all(0 < len(b) <= batch_size for share in shares for b in share)
    batches = [b for rnd in zip(*shares) for b in rnd]  # batch k is rank k % world's: the global order back
    assert [LENGTHS[i] for b in batches for i in b] == sorted(lengths, reverse=True)


def test_sorted_eval_batches_stay_full_where_the_count_divides():
    """One process, or a batch count the ranks divide: full batches as before (the last one partial)."""
    assert [len(b) for b in SortedBatchSampler(LENGTHS[:75], 8)] == [8] * 9 + [3]
    assert [len(b) for b in SortedBatchSampler(LENGTHS[:75], 8, 2, 1)] == [8] * 4 + [3]
    assert [len(b) for b in SortedBatchSampler(LENGTHS[:75], 16, 2, 0)] == [13, 13, 12]  # 5 batches → 6


def test_fewer_eval_examples_than_ranks_is_one_clear_error():
    from taskhead.errors import TaskheadError

    with pytest.raises(TaskheadError, match="3 evaluation example\\(s\\) cannot give each of the 4 ranks a batch"):
        SortedBatchSampler([1, 2, 3], 8, num_replicas=4, rank=0)


def test_lightning_sets_the_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    s = LengthGroupedBatchSampler(LENGTHS, 16, seed=1)
    first = list(s)
    _set_sampler_epoch(DataLoader(list(range(len(LENGTHS))), batch_sampler=s), 3)
    assert s.epoch == 3 and list(s) != first


# ---- lengths come in as one array: a per-element read of a datasets Column is O(rows) Python calls (issue 18) ----


def test_lazy_column_is_refused_and_arrays_are_taken_as_they_are():
    import datasets
    import numpy as np
    import pytest

    ds = datasets.Dataset.from_dict({"length": LENGTHS})
    with pytest.raises(TypeError, match="numpy array"):
        LengthGroupedBatchSampler(ds["length"], 16)  # a lazy Column: refused, not read element by element
    with pytest.raises(TypeError, match="numpy array"):
        SortedBatchSampler(ds["length"], 16)
    arr = np.asarray(LENGTHS)
    assert list(LengthGroupedBatchSampler(arr, 16, seed=1)) == list(LengthGroupedBatchSampler(LENGTHS, 16, seed=1))


def test_numpy_column_follows_the_indices_mapping():
    import datasets
    import numpy as np

    from taskhead.core.arrow import numpy_column

    ds = datasets.Dataset.from_dict({"length": LENGTHS, "x": [str(i) for i in range(len(LENGTHS))]})
    picked = ds.select([5, 1, 900])
    col = numpy_column(picked, "length")
    assert isinstance(col, np.ndarray) and col.tolist() == [LENGTHS[5], LENGTHS[1], LENGTHS[900]]


def test_datamodule_never_reads_a_column_row_by_row(tiny_bert, tmp_path, monkeypatch):
    """setup, the data report, label counts and every sampler read whole Arrow columns: any per-element access to a
    datasets ``Column`` (what made a 500k-row fit spend minutes in the sampler) fails this test."""
    import datasets.arrow_dataset as arrow_dataset

    from taskhead.tasks.classification import ClassificationDataModule

    from conftest import make_reviews, write_jsonl

    def refuse(*args, **kwargs):
        raise AssertionError("a datasets Column was read element by element")

    train = write_jsonl(tmp_path / "train.jsonl", make_reviews(300, 0))
    test = write_jsonl(tmp_path / "test.jsonl", make_reviews(50, 1))
    dm = ClassificationDataModule(model_name_or_path=tiny_bert, train_file=str(train), test_file=str(test),
                                  cache_dir=str(tmp_path / "cache"), batch_size=8)
    monkeypatch.setattr(arrow_dataset.Column, "__iter__", refuse)
    monkeypatch.setattr(arrow_dataset.Column, "__getitem__", refuse)
    assert dm.label_counts == [135, 135]  # the rows left after the 10 % hold-out
    dm.setup("fit")
    dm.setup("test")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert len(loader) > 0 and next(iter(loader))["inputs"]["input_ids"].shape[0] > 0
