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
