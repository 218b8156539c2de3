import gzip

import pytest

from taskhead.core.readers import get_field, get_text, read_records
from taskhead.errors import TaskheadError


def test_jsonl_records_carry_file_and_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "x", "label": 1}\n\n{"text": "y", "label": 0}\n')
    recs = list(read_records(p))
    assert [w for w, _ in recs] == [f"{p}:1", f"{p}:3"]
    assert recs[1][1] == {"text": "y", "label": 0}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": "broken\n', "bad.jsonl:2: malformed JSON"),
        ("list.jsonl", '{"text": "ok"}\n[1, 2]\n', "list.jsonl:2: expected a JSON object"),
        ("cols.csv", "text,label\nfine,1\ntoo,many,cols\n", "cols.csv:3: 3 columns, but the header has 2"),
        ("data.parquet", "x", "unknown file type '.parquet'"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(TaskheadError, match=message):
        list(read_records(p))


def test_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(TaskheadError, match=r"latin.jsonl:2: not valid UTF-8"):
        list(read_records(p))


def test_missing_file(tmp_path):
    with pytest.raises(TaskheadError, match="nope.jsonl: file not found"):
        list(read_records(tmp_path / "nope.jsonl"))


def test_tsv_and_gzip(tmp_path):
    p = tmp_path / "d.tsv.gz"
    with gzip.open(p, "wt") as f:
        f.write("sentence\tlabel\nhello there\tpos\n")
    assert list(read_records(p)) == [(f"{p}:2", {"sentence": "hello there", "label": "pos"})]


def test_fields():
    rec = {"text": "  ", "translation": {"en": "hi"}}
    assert get_field(rec, "translation.en", "f:1") == "hi"
    with pytest.raises(TaskheadError, match="f:1: field 'label' is missing \\(fields here: text, translation\\)"):
        get_field(rec, "label", "f:1")
    with pytest.raises(TaskheadError, match="f:1: field 'text' is empty"):
        get_text(rec, "text", "f:1")


# ---- .json files: a list of objects (or {"data": [...]}) read one item at a time, or JSON Lines --------------------------

ROWS = [{"text": f"row {i} \u00e9 \"quoted\" [x] {{y}}", "label": i % 3, "nested": {"a": [i, 1.5]}} for i in range(50)]


@pytest.mark.parametrize("layout", ["compact", "pretty", "wrapped", "wrapped_after_other_keys", "jsonl", "gzip"])
def test_json_layouts_give_the_same_records(tmp_path, monkeypatch, layout):
    import json

    monkeypatch.setattr("taskhead.core.readers.JsonScanner.READ", 64)  # items cross many reads
    p = tmp_path / ("d.json.gz" if layout == "gzip" else "d.json")
    text = {"compact": json.dumps(ROWS), "pretty": json.dumps(ROWS, indent=2), "gzip": json.dumps(ROWS),
            "wrapped": json.dumps({"data": ROWS, "version": "1"}),
            "wrapped_after_other_keys": json.dumps({"version": "1", "meta": {"data": 1}, "data": ROWS}, indent=1),
            "jsonl": "".join(json.dumps(r) + "\n" for r in ROWS)}[layout]
    if layout == "gzip":
        with gzip.open(p, "wt") as f:
            f.write(text)
    else:
        p.write_text(text)
    recs = list(read_records(p))
    assert [r for _, r in recs] == ROWS
    where = f"{p}:1" if layout == "jsonl" else f"{p}: item 0"
    assert recs[0][0] == where


def test_json_list_is_not_held_whole(tmp_path, monkeypatch):
    """The reader has read only a little past the first item when it yields it."""
    import json

    monkeypatch.setattr("taskhead.core.readers.JsonScanner.READ", 256)
    p = tmp_path / "big.json"
    p.write_text(json.dumps([{"text": "x" * 100, "label": i} for i in range(2000)]))  # ~240 kB
    records = read_records(p)
    next(records)
    import gc

    scanners = [o for o in gc.get_objects() if type(o).__name__ == "JsonScanner"]
    assert scanners and all(len(s.buf) <= 1024 for s in scanners)
    records.close()


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"text": "a"},\n {"text": "b"\n', r"d.json:3: malformed JSON"),  # ends inside item 1
        ('[{"text": "a"}\n {"text": "b"}]', r"d.json:2: malformed JSON \(Expecting ',' or ']'\)"),
        ('[{"text": "a"}]\n[1]\n', r"d.json:2: malformed JSON \(Extra data\)"),
        ('{"data": [{"text": "a"}]}\n{"x": 1}\n', r"d.json:2: malformed JSON \(Extra data\)"),
        ('{"rows": [{"text": "a"}]}', r"d.json: expected a JSON list of objects"),
        ('"just a string"', r"d.json: expected a JSON list of objects"),
        ("", r"d.json:1: malformed JSON \(Expecting value\)"),
        ('[{"text": "a"}, "b"]', r"d.json: item 1: expected a JSON object, got str"),
        ('{"text": "a"}\n{"text": "b",}\n', r"d.json:2: malformed JSON"),  # JSON Lines: the JSONL reader's message
        ('{"a": 1,}', r"d.json:1: malformed JSON \(Expecting property name"),  # a trailing comma, as json.load
    ],
)
def test_json_errors_name_the_line(tmp_path, monkeypatch, content, message):
    monkeypatch.setattr("taskhead.core.readers.JsonScanner.READ", 8)
    p = tmp_path / "d.json"
    p.write_text(content)
    with pytest.raises(TaskheadError, match=message):
        list(read_records(p))


def test_a_number_cut_at_the_end_of_a_read_is_read_whole(tmp_path, monkeypatch):
    p = tmp_path / "d.json"
    p.write_text('{"data": [{"text": "a", "n": 1}], "version": 1.25e3, "other": -0.5}')
    for size in range(1, 70):  # every place a read can end, "1." and "1.25e" among them
        monkeypatch.setattr("taskhead.core.readers.JsonScanner.READ", size)
        assert [r for _, r in read_records(p)] == [{"text": "a", "n": 1}], size
