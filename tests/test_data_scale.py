"""Data at scale (issue 18): splits streamed into memory-mapped Arrow, cache keys from file identity, a warm start that
reads no records, parallel tokenisation that gives the same result. No timings here: benchmarks/scale.py has them."""

from __future__ import annotations

import json

import pytest

from taskhead.core import arrow
from taskhead.core.splits import package_version
from taskhead.errors import TaskheadError
from taskhead.tasks.classification import ClassificationDataModule

from conftest import make_reviews, write_jsonl


def dm_for(tiny_bert, tmp_path, **kw) -> ClassificationDataModule:
    return ClassificationDataModule(model_name_or_path=tiny_bert, cache_dir=str(tmp_path / "cache"), batch_size=8, **kw)


def test_splits_are_memory_mapped_arrow_not_python_records(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_reviews(120, 0))
    dm = dm_for(tiny_bert, tmp_path, train_file=str(train))
    assert dm.label_names == ["neg", "pos"] and dm.label_counts == [54, 54]  # the rows left after the 10 % hold-out
    assert "raw" not in dm.__dict__  # the list-of-records path never ran
    parsed = dm.parsed["train"]
    assert parsed.cache_files and parsed.cache_files[0]["filename"].endswith(".arrow")  # on disk, memory-mapped
    assert parsed.column_names == ["text", "label"]  # "where" (file:line) served the checks only
    dm.setup("fit")
    for split in ("train", "validation"):
        assert all(f["filename"].startswith(str(tmp_path / "cache")) for f in dm.datasets[split].cache_files)


def test_chunked_writer_keeps_every_row_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(arrow, "CHUNK", 7)  # many record batches
    rows = [{"text": f"row {i}", "label": i % 3} for i in range(50)]
    ds = arrow.write_arrow(iter(rows), tmp_path / "x.arrow", drop=("where",))
    assert ds.to_list() == rows
    assert arrow.write_arrow(iter([]), tmp_path / "empty.arrow") is None


def test_warm_start_reads_no_record(tiny_bert, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", make_reviews(100, 0))
    test = write_jsonl(tmp_path / "test.jsonl", make_reviews(20, 1))
    cold = dm_for(tiny_bert, tmp_path, train_file=str(train), test_file=str(test))
    cold.setup("fit")
    cold.setup("test")

    def no_reading(self, path):
        raise AssertionError(f"{path} was read again on a warm start")

    monkeypatch.setattr(ClassificationDataModule, "read_file", no_reading)
    warm = dm_for(tiny_bert, tmp_path, train_file=str(train), test_file=str(test))
    assert warm.label_names == cold.label_names and warm.label_counts == cold.label_counts
    warm.setup("fit")
    warm.setup("test")
    for split in ("train", "validation", "test"):
        assert warm.datasets[split].to_dict() == cold.datasets[split].to_dict()


def test_cache_key_follows_the_file_not_its_rows(tiny_bert, tmp_path):
    train = tmp_path / "train.jsonl"
    write_jsonl(train, make_reviews(60, 0))
    dm_for(tiny_bert, tmp_path, train_file=str(train)).setup("fit")
    rows = make_reviews(60, 0)
    rows[0]["label"] = "pos" if rows[0]["label"] == "neg" else "neg"  # same size, new content
    write_jsonl(train, rows)
    dm = dm_for(tiny_bert, tmp_path, train_file=str(train))
    assert dm.label_counts != [30, 30]  # re-read, not served from the first file's facts
    dm.setup("fit")
    assert len(list((tmp_path / "cache").glob("train-*.arrow"))) == 2


def test_bad_record_leaves_no_cache(tiny_bert, tmp_path):
    rows = make_reviews(30, 0) + [{"text": "", "label": "pos"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = dm_for(tiny_bert, tmp_path, train_file=str(train))
    with pytest.raises(TaskheadError, match=r"train.jsonl:31: field 'text' is empty"):
        dm.label_names
    assert not (tmp_path / "cache").exists()


def test_parallel_tokenisation_matches_one_process(tiny_bert, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", make_reviews(400, 0))
    one = dm_for(tiny_bert, tmp_path / "a", train_file=str(train))
    one.setup("fit")
    monkeypatch.setattr(arrow, "NUM_PROC_MIN_ROWS", 10)
    monkeypatch.setattr(arrow, "ROWS_PER_PROC", 100)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    two = dm_for(tiny_bert, tmp_path / "b", train_file=str(train))
    two.setup("fit")
    assert len(list((tmp_path / "b" / "cache").glob("train-*_of_00002.arrow"))) == 2  # two workers wrote shards
    assert two.datasets["train"].to_dict() == one.datasets["train"].to_dict()
    again = dm_for(tiny_bert, tmp_path / "b", train_file=str(train))  # the shards are found again
    again.setup("fit")
    assert again.datasets["train"].to_dict() == one.datasets["train"].to_dict()


def test_one_tokeniser_pass_equals_truncated_plus_full(tiny_bert, tmp_path):
    dm = dm_for(tiny_bert, tmp_path, max_length=12)
    texts = [r["text"] for r in make_reviews(50, 3)]
    for pair in (None, texts[::-1]):
        enc = dm.encode({"text": texts, **({"text_pair": pair} if pair else {})})
        cut = dm.tokenizer(texts, pair, truncation=True, max_length=12)
        full = dm.tokenizer(texts, pair, truncation=False, verbose=False)
        assert any(n > 12 for n in enc["full_length"]) and (pair or any(n <= 12 for n in enc["full_length"]))  # both kinds
        assert "input_ids" in enc and all(enc[k] == cut[k] for k in cut if k in enc)
        # left out only what collate rebuilds: the all-ones mask, and a single text's all-zero type ids
        assert all(set(row) == {1} for row in cut["attention_mask"]) and "attention_mask" not in enc
        assert ("token_type_ids" in enc) == bool(pair) or all(set(row) == {0} for row in cut["token_type_ids"])
        assert enc["full_length"] == [len(ids) for ids in full["input_ids"]]


def test_predict_inputs_keep_ids_and_fields(tiny_bert, tmp_path):
    rows = [{"id": "a", "text": "good film"}, {"text": "bad film"}, {"id": 7, "text": "fine"}]
    pred = write_jsonl(tmp_path / "p.jsonl", rows)
    # max_eval_samples bounds validation and test: predict still gives a prediction for every input
    dm = dm_for(tiny_bert, tmp_path, predict_file=str(pred), label_names=["neg", "pos"], max_eval_samples=2)
    dm.setup("predict")
    assert len(dm.datasets["predict"]) == 3
    expected = [{"id": "a", "text": "good film"}, {"id": 2, "text": "bad film"}, {"id": 7, "text": "fine"}]
    assert len(dm.predict_input_rows) == 3 and dm.predict_input_rows([0, 1, 2]) == expected
    assert dm.predict_input_rows([2, 0]) == [expected[2], expected[0]] and json.dumps(dm.predict_input_rows([1]))


def test_package_version_from_metadata():
    assert package_version() and package_version() != "0+unknown"


def test_scratch_of_a_killed_process_is_removed(tiny_bert, tmp_path, monkeypatch):
    """A run killed by SIGKILL leaves its parsed splits behind; the next run on the host removes them (and only those
    of processes that are gone)."""
    import os
    import signal
    import socket
    import subprocess
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    (tmp_path / "tmp").mkdir()
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.Popen(["sleep", "30"])
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    stale = tmp_path / "tmp" / f"taskhead-parsed-{host}-{dead.pid}-abc123"
    live = tmp_path / "tmp" / f"taskhead-parsed-{host}-{os.getppid()}-abc123"
    for d in (stale, live):
        d.mkdir()
        (d / "train.arrow").write_text("x")
    train = write_jsonl(tmp_path / "train.jsonl", make_reviews(20, 0))
    dm = dm_for(tiny_bert, tmp_path, train_file=str(train))
    assert dm.label_names == ["neg", "pos"]
    assert not stale.exists() and live.exists()
    assert dm.parsed["train"].cache_files[0]["filename"].startswith(str(tmp_path / "tmp" / f"taskhead-parsed-{host}-{os.getpid()}-"))


def test_arrow_stream_widens_types_of_later_chunks(tmp_path, monkeypatch):
    """Integers then floats become floats (not floats cut to integers); [] then names, a list of strings; a key a later
    row lacks, null."""
    from taskhead.core import arrow

    monkeypatch.setattr(arrow, "CHUNK", 2)
    rows = [{"a": 1, "l": []}, {"a": 2, "l": []}, {"a": 1.5, "l": ["x"]}, {"a": 3, "l": []}, {"l": ["y"]}]
    ds = arrow.write_arrow(iter(rows), tmp_path / "t.arrow")
    assert ds.to_list() == [{"a": 1.0, "l": []}, {"a": 2.0, "l": []}, {"a": 1.5, "l": ["x"]}, {"a": 3.0, "l": []},
                            {"a": None, "l": ["y"]}]
    assert [p.name for p in tmp_path.iterdir()] == ["t.arrow"]


def test_a_rank_with_fewer_predict_batches_meets_the_others_gathers(tmp_path):
    """Predictions are gathered batch by batch; a rank with fewer batches (QA: fewer windows) gathers nothing until the
    rank with the most is done, so no rank waits in a collective the others never join, and none of its rows is lost.
    Here rank 0 (this one) has 2 batches, rank 1 five, one row each (idx 10 to 14)."""
    from types import SimpleNamespace

    from taskhead.core.callbacks import RunArtifacts

    rank1 = iter([[{"idx": i, "label": f"l{i}"}] for i in range(10, 15)])

    class Module:
        calls: list = []

        def gather(self, items):
            self.calls.append(items)
            return [2, 5] if len(self.calls) == 1 else list(items) + next(rank1)

    trainer = SimpleNamespace(is_global_zero=True, num_predict_batches=[2], logger=None, default_root_dir=str(tmp_path),
                              datamodule=SimpleNamespace(predict_input_rows=None))
    module, writer = Module(), RunArtifacts()
    writer.on_predict_epoch_start(trainer, module)
    for i in (1, 0):
        writer.write_on_batch_end(trainer, module, [{"idx": i, "label": f"l{i}"}], None, None, 0, 0)
    writer.on_predict_epoch_end(trainer, module)
    assert module.calls[0] == [2] and module.calls[3:] == [[], [], []]  # three empty gathers meet rank 1's last three
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"label": f"l{i}"} for i in (0, 1, 10, 11, 12, 13, 14)]  # input order
