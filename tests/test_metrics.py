"""The degenerate-output guards of core/metrics.py on hand-written outputs: distinct share, repeated 4-grams within an
output, the cap-hit share, and when they turn into warnings (thresholds tested on both sides)."""

from __future__ import annotations

import pytest

from taskhead.core.metrics import degenerate_warnings, distinct_share, guard_scores, repeated_ngram_share, repetition_rate


def test_distinct_share():
    assert distinct_share(["a b", "a  b ", "A b", "c"]) == pytest.approx(3 / 4)  # whitespace collapsed, case kept
    assert distinct_share(["same"] * 10) == pytest.approx(0.1)
    assert distinct_share([]) == 0.0


def test_repeated_ngrams_within_outputs():
    assert repeated_ngram_share("a b c d a b c d") == pytest.approx(1 - 4 / 5)  # 4-grams: abcd bcda cdab dabc abcd
    assert repeated_ngram_share("The cat sat on the mat") == 0.0  # "the" twice, but no repeated 4-gram
    assert repeated_ngram_share("x x x x x x") == pytest.approx(1 - 1 / 3)  # case-folded words: one distinct of three
    assert repeated_ngram_share("too short") is None
    # the mean runs over outputs long enough to have a 4-gram; repeats across outputs do not count
    assert repetition_rate(["a b c d a b c d", "a b c d e", "no"]) == pytest.approx(0.2 / 2)
    assert repetition_rate(["short", "one"]) == 0.0


def test_guard_scores_and_warnings():
    outs = ["one sentence here ."] * 15 + [f"text {i}" for i in range(5)]  # 20 outputs, 6 distinct
    scores = guard_scores(outs, [True] * 11 + [False] * 9)
    assert scores == {"distinct_outputs": pytest.approx(0.3), "repeated_4grams": 0.0, "hit_max_new_tokens": pytest.approx(0.55)}
    lines = degenerate_warnings(scores, 20, 48, "test")
    assert len(lines) == 2 and "collapsed: only 30% of 20 outputs" in lines[0] and "55% of 20 outputs hit max_new_tokens=48" in lines[1]
    # just inside every threshold: no warning
    assert degenerate_warnings({**scores, "distinct_outputs": 0.5, "hit_max_new_tokens": 0.5}, 20, 48, "val") == []
    assert degenerate_warnings({**scores, "hit_max_new_tokens": 0.0}, 19, 48, "val") == []  # too few outputs to judge


def test_per_class_recall_is_accuracy_by_gold_position():
    """Multiple choice logs multiclass_metrics' per-class recall as acc_by_gold: accuracy where the gold is at each
    position (torchmetrics' per-class accuracy), also for a position that is never gold (0, not NaN)."""
    import torch
    from torchmetrics.classification import MulticlassAccuracy

    from taskhead.core.metrics import multiclass_metrics

    preds = torch.tensor([0, 1, 1, 2, 0, 1])
    gold = torch.tensor([0, 1, 2, 2, 1, 1])  # position 3: never gold
    metrics = multiclass_metrics(4, per_class=("recall",))
    metrics.update(torch.nn.functional.one_hot(preds, 4).float(), gold)
    values = metrics.compute()
    assert set(values) == {"acc", "f1_macro", "recall"}
    assert values["recall"].tolist() == pytest.approx([1.0, 2 / 3, 1 / 2, 0.0])
    assert values["recall"].tolist() == pytest.approx(MulticlassAccuracy(4, average=None)(preds, gold).tolist())


def test_most_confident_keeps_the_top_k_of_every_rank():
    from taskhead.core.metrics import MostConfident

    heap = MostConfident(3)
    for conf, name in [(0.5, "a"), (0.9, "b"), (0.7, "c"), (0.9, "d"), (0.6, "e")]:
        heap.add(conf, name)
    other_rank = [(0.95, ("x",)), (0.1, ("y",))]
    assert heap.take(lambda items: items + other_rank) == [(0.95, "x"), (0.9, "b"), (0.9, "d")]
    assert heap.take() == []  # emptied


def test_most_confident_add_wrong_keeps_only_wrong_argmaxes():
    import torch

    from taskhead.core.metrics import MostConfident

    heap = MostConfident(5)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    pred = heap.add_wrong(probs, torch.tensor([0, 0, 1, 1]), lambda i: (f"row{i}",))
    assert pred.tolist() == [0, 1, 1, 0]
    assert heap.take() == [(pytest.approx(0.8), "row1", 0, 1), (pytest.approx(0.6), "row3", 1, 0)]
