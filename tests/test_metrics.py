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
