"""A stage reads only the splits it needs (issue 18): fit reads train + validation, test only test, predict only
predict; evaluating a checkpoint, the label set comes from its model, so the training file may be gone."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from taskhead.cli import run_cli
from taskhead.errors import TaskheadError
from taskhead.tasks.classification import ClassificationDataModule
from taskhead.tasks.ner import NerDataModule

from conftest import cli_args, make_reviews, write_jsonl

SENTENCES = "EU B-ORG\nrejects O\nGerman B-MISC\n\nPeter B-PER\nBlackburn I-PER\n\nParis B-LOC\nsaw O\nLondon B-LOC\n"


def fit(tiny_bert, root: Path, files: dict[str, str], *extra: str, config: str = "imdb.yaml"):
    args = cli_args(tiny_bert, files, root, "--trainer.max_steps", "2", "--trainer.max_epochs", "-1", *extra, config=config)
    return run_cli(["fit", *args]), args


def test_fit_never_reads_a_corrupt_test_file(tiny_bert, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", make_reviews(64, 0))
    test = tmp_path / "test.jsonl"
    test.write_text('{"text": "fine", "label": "pos"}\n{"text": "cut off\n')  # line 2: malformed JSON
    cli, _ = fit(tiny_bert, tmp_path / "run", {"train": str(train), "test": str(test)})
    assert cli.trainer.global_step == 2
    assert "test" not in cli.datamodule.parsed and "test" not in cli.datamodule.datasets
    out = capsys.readouterr()
    assert "test.jsonl" not in out.out + out.err  # not read, not mentioned


def test_test_and_predict_from_a_checkpoint_whose_train_file_is_gone(tiny_bert, tmp_path):
    files = {s: str(write_jsonl(tmp_path / f"{s}.jsonl", make_reviews(n, i, labels=("bad", "good"))))
             for i, (s, n) in enumerate((("train", 64), ("test", 24)))}
    files["predict"] = str(write_jsonl(tmp_path / "predict.jsonl", [{"text": r["text"]} for r in make_reviews(5, 9)]))
    cli, args = fit(tiny_bert, tmp_path / "run", files)
    best = cli.trainer.checkpoint_callback.best_model_path
    config = Path(cli.trainer.log_dir) / "config.yaml"
    assert files["train"] in config.read_text()  # the fit's config names the train file: test and predict use it
    Path(files["train"]).unlink()

    tested = run_cli(["test", "--ckpt_path", best])  # the run's config.yaml supplies the rest (cli.run_config_for)
    assert tested.model.label_names == ["bad", "good"]
    assert tested.model.hparams.label_counts == cli.model.hparams.label_counts  # the fit's, from the checkpoint
    assert set(tested.datamodule.parsed) == {"test"}  # train is gone and was never needed
    metrics = json.loads((Path(tested.trainer.log_dir) / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0

    predicted = run_cli(["predict", "--ckpt_path", best])
    assert set(predicted.datamodule.parsed) == {"predict"}
    rows = (Path(predicted.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 5 and {json.loads(r)["label"] for r in rows} <= {"bad", "good"}


def test_test_without_a_checkpoint_takes_the_label_set_from_train(tiny_bert, tmp_path):
    """No model to ask: train is read once for its labels (and checked), the other splits are not."""
    train = write_jsonl(tmp_path / "train.jsonl", make_reviews(40, 0))
    test = write_jsonl(tmp_path / "test.jsonl", make_reviews(10, 1))
    validation = tmp_path / "validation.jsonl"
    validation.write_text("not json\n")
    dm = ClassificationDataModule(model_name_or_path=tiny_bert, cache_dir=str(tmp_path / "cache"), train_file=str(train),
                                  validation_file=str(validation), test_file=str(test))
    dm.connect("test")
    assert dm.label_names == ["neg", "pos"] and set(dm.parsed) == {"train", "test"}
    dm.setup("test")
    assert len(dm.datasets["test"]) == 10


def test_ner_test_stage_checks_tags_against_the_checkpoint_labels(tiny_bert, tmp_path):
    test = tmp_path / "test.conll"
    test.write_text(SENTENCES)
    dm = NerDataModule(model_name_or_path=tiny_bert, cache_dir=str(tmp_path / "cache"), train_file=str(tmp_path / "gone.conll"),
                       test_file=str(test))
    names = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    dm.connect("test", {"label_names": names, "label_counts": [5, 1, 1, 1, 1, 1, 1, 1, 1]})
    assert dm.label_names == names and dm.label_counts == [5, 1, 1, 1, 1, 1, 1, 1, 1]
    assert [names[t] for t in dm.parsed["test"][0]["tags"]] == ["B-ORG", "O", "B-MISC"]
    dm = NerDataModule(model_name_or_path=tiny_bert, cache_dir=str(tmp_path / "cache"), test_file=str(test))
    dm.connect("test", {"label_names": ["O", "B-PER", "I-PER"], "label_counts": None})
    with pytest.raises(TaskheadError, match=r"test\.conll:1: tag 'B-ORG' is not in the checkpoint's label_names"):
        dm.label_names


def mnli_like(root: Path) -> str:
    """A Hub-shaped dataset (Parquet shards under data/) whose splits are MNLI's: no 'validation', no 'test'."""
    import datasets

    feats = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])})
    (root / "data").mkdir(parents=True)
    for split, n, label in (("train", 30, None), ("validation_matched", 9, None), ("test_matched", 6, -1)):
        rows = [{"premise": f"a man plays {i}", "hypothesis": f"someone plays {i}", "label": i % 3 if label is None else label}
                for i in range(n)]
        datasets.Dataset.from_list(rows, features=feats).to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")
    return str(root)


def test_hub_split_names_are_options(tiny_bert, tmp_path):
    hub = mnli_like(tmp_path / "mnli")
    kw = dict(model_name_or_path=tiny_bert, cache_dir=str(tmp_path / "cache"), dataset_name=hub, text_field="premise",
              text_pair_field="hypothesis")
    dm = ClassificationDataModule(**kw, validation_split="validation_matched", test_split="test_matched")
    dm.setup("fit")
    assert dm.label_names == ["entailment", "neutral", "contradiction"]  # the Hub's ClassLabel order
    assert len(dm.datasets["train"]) == 30 and len(dm.datasets["validation"]) == 9  # not held out of train
    default = ClassificationDataModule(**kw)
    default.setup("fit")
    assert len(default.datasets["validation"]) == 3  # no 'validation' split: 10% of train held out
    with pytest.raises(TaskheadError, match=r"has no split for --data.validation_split dev; its splits: train, "):
        ClassificationDataModule(**kw, validation_split="dev").setup("fit")


def task_files(tmp_path: Path) -> dict[str, tuple[type, dict, dict[str, str]]]:
    """Per task: its DataModule, options and train/validation files (small, hand-written)."""
    from taskhead.tasks.multiple_choice import MultipleChoiceDataModule
    from taskhead.tasks.qa import QADataModule
    from taskhead.tasks.seq2seq_data import Seq2SeqDataModule

    conll = tmp_path / "ner.conll"
    conll.write_text(SENTENCES.replace("London B-LOC", "London I-LOC") * 4)  # IOB1-style I- start: converted
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"ctx": f"c {i}", "endings": ["a", "b", "c"], "label": i % 3} for i in range(12)])
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"id": f"q{i}", "question": "who?", "context": f"Ann met Bob {i} times.",
                                              "answers": [{"text": "Bob", "answer_start": 8 if i % 2 else 9}]} for i in range(12)])
    s2s = write_jsonl(tmp_path / "s2s.jsonl", [{"document": f"long text number {i}", "summary": f"text {i}"} for i in range(12)])
    return {
        "ner": (NerDataModule, {"tag_scheme": "iob1"}, {"train_file": str(conll), "validation_file": str(conll)}),
        "mc": (MultipleChoiceDataModule, {"context_field": "ctx", "choices_field": "endings"}, {"train_file": str(mc)}),
        "qa": (QADataModule, {"fix_answer_offsets": True, "max_length": 64, "doc_stride": 16}, {"train_file": str(qa)}),
        "seq2seq": (Seq2SeqDataModule, {"architecture": "encoder_decoder"}, {"train_file": f"{s2s}[2:]", "validation_file": f"{s2s}[:2]"}),
    }


@pytest.mark.parametrize("task", ["ner", "mc", "qa", "seq2seq"])
def test_warm_start_reads_no_record_for_every_task(task, tiny_bert, tmp_path, monkeypatch, caplog):
    """What the streaming pass learnt (label set and counts, IOB2 conversions, number of choices, answer offsets moved)
    comes back from the cache: a second run reads no record and reports the same."""
    cls, options, files = task_files(tmp_path)[task]
    make = lambda: cls(model_name_or_path=tiny_bert, cache_dir=str(tmp_path / "cache"), batch_size=4, **options, **files)  # noqa: E731
    cold = make()
    cold.connect("fit")
    facts = cold.model_args()
    caplog.set_level(logging.INFO)
    cold.setup("fit")
    report = [line for line in data_report(caplog) if "moved answer_start" not in line]  # said while reading (QA)

    def no_reading(self, path):
        raise AssertionError(f"{path} was read again on a warm start")

    monkeypatch.setattr(cls, "read_file", no_reading)
    warm = make()
    warm.connect("fit")
    assert warm.model_args() == facts
    warm.setup("fit")
    for split in ("train", "validation"):
        assert warm.datasets[split].to_dict() == cold.datasets[split].to_dict()
    assert data_report(caplog) == report and any("examples; tokens p50" in line for line in report)


def data_report(caplog) -> list[str]:
    """The data report's lines logged since the last call (tokenising times aside)."""
    lines = [line for r in caplog.records for line in r.getMessage().splitlines() if line.startswith("[data]")]
    caplog.clear()
    return [line for line in lines if "tokenised" not in line]
