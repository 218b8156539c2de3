"""Every bad input stops the CLI with one message naming the file and line, the field or the option; exit status 2;
no traceback and no partial output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskhead.cli import main

from conftest import cli_args, make_reviews, run_taskhead, write_jsonl


def fail(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture
def good_train(tmp_path) -> str:
    return str(write_jsonl(tmp_path / "train.jsonl", make_reviews(20, 0)))


def bad_file(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


CASES = {
    "malformed JSON line": ("train", '{"text": "fine", "label": "pos"}\n{"text": "oops", "label": \n', r"train\.jsonl:2: malformed JSON"),
    "missing text field": ("train", '{"text": "fine", "label": "pos"}\n{"review": "x", "label": "neg"}\n', r"train\.jsonl:2: field 'text' is missing"),
    "empty text": ("train", '{"text": "fine", "label": "pos"}\n{"text": "   ", "label": "neg"}\n', r"train\.jsonl:2: field 'text' is empty"),
    "missing label": ("train", '{"text": "fine", "label": "pos"}\n{"text": "meh"}\n', r"train\.jsonl:2: field 'label' is missing"),
    "unknown test label": ("test", '{"text": "fine", "label": "pos"}\n{"text": "meh", "label": "neutral"}\n', r"test\.jsonl:2: label 'neutral' is not one of the training labels"),
    "empty file": ("test", "", r"test\.jsonl: no records \(empty file\)"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_data_files(case, tiny_bert, good_train, tmp_path, capsys):
    split, text, message = CASES[case]
    files = {"train": good_train, split: bad_file(tmp_path, f"{split}.jsonl", text)}
    err = fail(["fit", *cli_args(tiny_bert, files, tmp_path)], capsys)
    assert len(err.strip().splitlines()) == 1, err
    assert pytest.importorskip("re").search(message, err), err
    assert not (tmp_path / "runs").exists()  # nothing written: the error comes before the run directory


def test_missing_file(tiny_bert, tmp_path, capsys):
    err = fail(["fit", *cli_args(tiny_bert, {"train": str(tmp_path / "nope.jsonl")}, tmp_path)], capsys)
    assert f"{tmp_path / 'nope.jsonl'}: file not found" in err


def test_missing_model_directory(good_train, tmp_path, capsys):
    err = fail(["fit", *cli_args(str(tmp_path / "no-such-model"), {"train": good_train}, tmp_path)], capsys)
    assert f"model directory '{tmp_path / 'no-such-model'}' does not exist" in err


def test_max_length_above_model_limit(tiny_bert, good_train, tmp_path, capsys):
    err = fail(["fit", *cli_args(tiny_bert, {"train": good_train}, tmp_path, "--data.max_length", "4096")], capsys)
    assert "--data.max_length 4096 exceeds the model's limit of 512 tokens" in err


def test_unknown_config_key(tiny_bert, good_train, tmp_path, capsys):
    err = fail(["fit", *cli_args(tiny_bert, {"train": good_train}, tmp_path, "--data.batch_sise", "8")], capsys)
    assert "batch_sise" in err


def test_unknown_key_in_yaml(tiny_bert, good_train, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  init_args:\n    lerning_rate: 0.1\n")
    err = fail(["fit", *cli_args(tiny_bert, {"train": good_train}, tmp_path, "--config", str(cfg))], capsys)
    assert "lerning_rate" in err


def test_console_entry_point_exit_code(tiny_bert, tmp_path):
    """The installed entry point, in a fresh process: one line on stderr, no traceback, exit 2."""
    bad = bad_file(tmp_path, "train.jsonl", '{"text": "ok", "label": 1}\n{"text": 5, "label": 0}\n')
    proc = run_taskhead("fit", *cli_args(tiny_bert, {"train": bad}, tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"taskhead: error: {bad}:2: field 'text' must be a string, got int"
    assert "Traceback" not in proc.stderr


def test_predict_leaves_no_partial_file(tiny_bert, good_train, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    bad = bad_file(tmp_path, "predict.jsonl", json.dumps({"text": "good"}) + "\n{broken\n")
    fail(["predict", *cli_args(tiny_bert, {"train": good_train, "predict": bad}, tmp_path,
                              "--artifacts.predictions_file", str(out))], capsys)
    assert not out.exists()
