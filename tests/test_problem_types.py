"""Multi-label and regression classification (``--data.problem_type``): label checks per problem type, the multi-hot
collate, fit → test → predict → export from the shipped YAMLs on a tiny model, metrics checked against sklearn/scipy
on the written predictions, and transformers.pipeline on the export giving the same scores."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import taskhead
from taskhead.cli import main, run_cli
from taskhead.core.export import export_checkpoint
from taskhead.errors import TaskheadError
from taskhead.tasks.classification import ClassificationDataModule, ClassificationModule, check_label, to_predictions

from conftest import FILLER, NEGATIVE, POSITIVE, cli_args, write_jsonl

FIXTURES = Path(__file__).parent / "fixtures" / "problem_types"
MUSIC = ["song", "guitar", "piano", "melody", "drums", "singer", "band", "tune"]
WORDS = {"joy": POSITIVE, "anger": NEGATIVE, "music": MUSIC}


def make_emotions(n: int, seed: int) -> list[dict]:
    """Each of three labels present with probability 1/2 (an eighth of the rows have none), each marked by two of its
    words among filler: learnable by a tiny model."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        labels = [name for name in WORDS if rng.random() < 0.5]
        words = rng.choices(FILLER, k=rng.randint(3, 10)) + [w for name in labels for w in rng.choices(WORDS[name], k=2)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "labels": labels})
    return rows


def make_pairs(n: int, seed: int) -> list[dict]:
    """Sentence pairs scored by how many positive words the second sentence repeats from the first (0-3)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        shared = rng.sample(POSITIVE, 3)
        k = rng.randint(0, 3)
        first = rng.choices(FILLER, k=4) + shared
        second = rng.choices(FILLER, k=4) + shared[:k] + rng.sample(NEGATIVE, 3 - k)
        rows.append({"sentence1": " ".join(first), "sentence2": " ".join(second), "label": float(k)})
    return rows


# ---- pure parts ---------------------------------------------------------------------------------------------------------

def test_check_label_per_problem_type():
    assert check_label(["joy", 2, "joy"], "multi_label", "labels", "f:1") == ["joy", 2]
    assert check_label([], "multi_label", "labels", "f:1") == []
    assert check_label("3.5", "regression", "label", "f:1") == 3.5 and check_label(2, "regression", "label", "f:1") == 2.0
    with pytest.raises(TaskheadError, match=r"f:3: field 'labels' must be a list of label names or ids .*got 'joy'"):
        check_label("joy", "multi_label", "labels", "f:3")
    with pytest.raises(TaskheadError, match=r"f:4: field 'labels' must be an integer or a non-empty string, got 0\.5"):
        check_label(["joy", 0.5], "multi_label", "labels", "f:4")
    for bad in ("high", True, None, float("nan"), [1.0]):
        with pytest.raises(TaskheadError, match=r"f:2: field 'label' must be a number \(problem_type regression\)"):
            check_label(bad, "regression", "label", "f:2")


def test_predictions_per_problem_type():
    logits = torch.tensor([[2.0, -1.0, 0.1], [-3.0, -2.0, -0.5]])
    multi = to_predictions(logits, "multi_label", ["a", "b", "c"], threshold=0.5)
    assert multi[0]["labels"] == ["a", "c"] and multi[1]["labels"] == []  # sigmoid(0.1) > 0.5 > sigmoid(-0.5)
    assert multi[0]["scores"]["b"] == pytest.approx(1 / (1 + np.exp(1.0)))
    assert to_predictions(logits, "multi_label", ["a", "b", "c"], threshold=0.3)[1]["labels"] == ["c"]
    assert to_predictions(torch.tensor([[1.5], [-0.25]]), "regression", None) == [{"score": 1.5}, {"score": -0.25}]


def test_multi_label_data_and_multi_hot_batches(tiny_bert, tmp_path):
    dm = ClassificationDataModule(model_name_or_path=tiny_bert, cache_dir=str(tmp_path / "cache"), problem_type="multi_label",
                                  label_field="labels", train_file=str(FIXTURES / "multi_label_ok.jsonl"),
                                  validation_file=str(FIXTURES / "multi_label_ok.jsonl"), text_pair_field=None)
    assert dm.label_names == ["anger", "joy", "music"]
    assert dm.parsed["train"]["label"] == [[1, 2], [0], [], [1, 2]]  # names → ids; the repeated "joy" counted once
    assert dm.label_counts == [[3, 1], [2, 2], [2, 2]]  # [negatives, positives] per label
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    gold = {0: [0, 1, 1], 1: [1, 0, 0], 2: [0, 0, 0], 3: [0, 1, 1]}
    assert batch["labels"].dtype == torch.float32
    assert {int(i): row.tolist() for i, row in zip(batch["idx"], batch["labels"])} == gold


@pytest.mark.parametrize("given", [None, ["anger", "joy", "music"]])
def test_multi_label_split_whose_first_chunks_have_no_labels(tiny_bert, tmp_path, monkeypatch, given):
    """The first Arrow chunk of label lists all [] reads as list<null>; a later chunk with labels widens the file."""
    monkeypatch.setattr("taskhead.core.arrow.CHUNK", 4)
    rows = [{"text": f"plain words {i}", "labels": []} for i in range(9)] + make_emotions(12, 0)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = ClassificationDataModule(model_name_or_path=tiny_bert, cache_dir=str(tmp_path / "cache"), problem_type="multi_label",
                                  label_field="labels", label_names=given, train_file=str(train),
                                  validation_file=str(train))
    assert dm.label_names == ["anger", "joy", "music"]
    names = dm.label_names
    assert dm.parsed["train"]["label"] == [[names.index(n) for n in r["labels"]] for r in rows]
    assert not list(tmp_path.glob("**/*.narrow.arrow"))


def test_regression_pairs_are_encoded_as_pairs(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(20, 0))
    dm = ClassificationDataModule(model_name_or_path=tiny_bert, cache_dir=str(tmp_path / "cache"), problem_type="regression",
                                  text_field="sentence1", text_pair_field="sentence2", train_file=str(train))
    assert dm.label_names is None and dm.label_counts is None
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].dtype == torch.float32 and set(batch["labels"].tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert (batch["inputs"]["token_type_ids"] == 1).any()
    with pytest.raises(TaskheadError, match="regression has no label names"):
        ClassificationDataModule(problem_type="regression", label_names=["a"])
    no_gold = write_jsonl(tmp_path / "glue_test.jsonl", [{**r, "label": -1} for r in make_pairs(4, 1)])  # GLUE's stsb test
    dm = ClassificationDataModule(model_name_or_path=tiny_bert, cache_dir=str(tmp_path / "cache"), problem_type="regression",
                                  text_field="sentence1", text_pair_field="sentence2", train_file=str(train),
                                  test_file=str(no_gold))
    with pytest.warns(UserWarning, match="every score is -1, i.e. no gold scores"):
        dm.label_names


def test_threshold_and_problem_type_options(tiny_bert):
    with pytest.raises(TaskheadError, match=r"model.threshold must be in \(0, 1\) or auto, got 1.5"):
        ClassificationModule(tiny_bert, label_names=["a", "b"], problem_type="multi_label", threshold=1.5)
    with pytest.raises(TaskheadError, match="threshold applies to problem_type multi_label only, not single_label"):
        ClassificationModule(tiny_bert, label_names=["a", "b"], threshold="auto")
    with pytest.raises(TaskheadError, match="loss.regression: mse | huber"):
        ClassificationModule(tiny_bert, problem_type="regression", loss={"name": "focal"})
    module = ClassificationModule(tiny_bert, problem_type="regression", loss={"regression": "huber"})
    assert module.model.config.problem_type == "regression" and module.model.config.num_labels == 1
    multi = ClassificationModule(tiny_bert, label_names=["a", "b", "c"], problem_type="multi_label", threshold="auto",
                                 loss={"class_weights": "balanced"}, label_counts=[[6, 2], [4, 4], [7, 1]])
    assert multi.class_weight.tolist() == [3.0, 1.0, 7.0]  # pos_weight = negatives / positives
    assert "decision_threshold" in multi.state_dict()  # tuned on validation: saved with the weights


# ---- bad inputs: one line naming file and line ------------------------------------------------------------------------

BAD = [
    ("go_emotions.yaml", {"train": "multi_label_not_a_list.jsonl"}, ["--data.label_field", "labels"],
     r"multi_label_not_a_list\.jsonl:3: field 'labels' must be a list of label names or ids \(problem_type multi_label; "
     r"\[\] for none\), got 'joy'"),
    ("go_emotions.yaml", {"train": "multi_label_ok.jsonl", "validation": "multi_label_unknown_label.jsonl"},
     ["--data.label_field", "labels"],
     r"multi_label_unknown_label\.jsonl:3: label 'sorrow' is not one of the training labels \['anger', 'joy', 'music'\]"),
    ("stsb.yaml", {"train": "regression_not_a_number.jsonl"}, [],
     r"regression_not_a_number\.jsonl:2: field 'label' must be a number \(problem_type regression\), got 'high'"),
]


@pytest.mark.parametrize("config,files,extra,message", BAD, ids=["not-a-list", "unknown-in-list", "not-a-number"])
def test_bad_labels_stop_with_one_line(tiny_bert, tmp_path, capsys, config, files, extra, message):
    run = tmp_path / "run"
    args = cli_args(tiny_bert, {s: str(FIXTURES / f) for s, f in files.items()}, run, *extra, config=config)
    with pytest.raises(SystemExit) as exc:
        main(["fit", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("taskhead: error: "), err
    assert re.search(message, err[0]), err[0]


# ---- end to end from the shipped YAMLs --------------------------------------------------------------------------------

def fit_test_predict(config: str, make, tiny_bert: str, root: Path, *extra: str):
    """Train/validation/test files from ``make``; fit (12 short epochs), then test and predict (on the test file) on
    the best checkpoint. Returns (fit cli, metrics, predictions, best checkpoint, files)."""
    files = {split: str(write_jsonl(root / f"{split}.jsonl", make(n, seed)))
             for split, n, seed in (("train", 256, 1), ("validation", 64, 2), ("test", 64, 3))}
    args = cli_args(tiny_bert, {"train": files["train"], "validation": files["validation"]}, root, *extra,
                    "--trainer.max_epochs", "12", "--model.optimizer.lr", "2e-3", "--model.scheduler.warmup_ratio", "0.0",
                    config=config)
    cli = run_cli(["fit", *args])
    best = cli.trainer.checkpoint_callback.best_model_path
    test = run_cli(["test", "--ckpt_path", best, "--data.test_file", files["test"]])
    metrics = json.loads((Path(test.trainer.log_dir) / "metrics.json").read_text())
    pred = run_cli(["predict", "--ckpt_path", best, "--data.predict_file", files["test"]])
    lines = (Path(pred.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()
    return cli, metrics, [json.loads(line) for line in lines], best, files


def test_multi_label_fit_test_predict_export(tiny_bert, tmp_path_factory):
    from sklearn.metrics import f1_score, precision_score
    from sklearn.preprocessing import MultiLabelBinarizer

    cli, metrics, preds, best, emotion_files = fit_test_predict("go_emotions.yaml", make_emotions, tiny_bert,
                                                                tmp_path_factory.mktemp("multi"), "--data.label_field", "labels")
    module = cli.model
    assert module.problem_type == "multi_label" and module.label_names == ["anger", "joy", "music"]
    threshold = float(cli.trainer.callback_metrics["val/threshold"])  # threshold: auto, chosen on validation
    assert module._threshold() == pytest.approx(threshold) and 0.05 <= threshold <= 0.95

    gold = [json.loads(line)["labels"] for line in Path(emotion_files["test"]).read_text().splitlines()]
    assert [p["id"] for p in preds] == list(range(1, len(gold) + 1))  # line numbers, in input order
    binarize = MultiLabelBinarizer(classes=module.label_names)
    y, yhat = binarize.fit_transform(gold), binarize.transform([p["labels"] for p in preds])
    assert metrics["test/f1_micro"] == pytest.approx(f1_score(y, yhat, average="micro"), abs=1e-6)
    assert metrics["test/f1_macro"] == pytest.approx(f1_score(y, yhat, average="macro", zero_division=0), abs=1e-6)
    per_label = precision_score(y, yhat, average=None, zero_division=0)
    assert [metrics[f"test/precision/{n}"] for n in module.label_names] == pytest.approx(per_label.tolist(), abs=1e-6)
    share = y.mean()  # predicting every label everywhere scores micro-F1 2p / (1 + p): the model must beat that
    assert metrics["test/f1_micro"] > 2 * share / (1 + share) + 0.1
    chosen = float(torch.load(best, weights_only=True)["state_dict"]["decision_threshold"])  # at the best step
    assert all(p["labels"] == [n for n, s in sorted(p["scores"].items(), key=lambda x: -x[1]) if s >= chosen] for p in preds)

    out = export_checkpoint(best, tmp_path_factory.mktemp("multi-export") / "export")
    assert json.loads((out / "config.json").read_text())["problem_type"] == "multi_label_classification"
    texts = [json.loads(line)["text"] for line in Path(emotion_files["test"]).read_text().splitlines()][:8]
    predictor = taskhead.load(out, precision="32-true")
    assert float(predictor.module.decision_threshold) == chosen  # the tuned threshold travels with the export
    loaded = predictor(texts)
    assert [p["labels"] for p in loaded] == [p["labels"] for p in preds[:8]]

    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(out), device="cpu", top_k=None)
    for scores, ours in zip(pipe(texts), loaded):
        assert {s["label"]: s["score"] for s in scores} == pytest.approx(ours["scores"], abs=1e-5)  # sigmoid, not softmax


def test_regression_fit_test_predict_export(tiny_bert, tmp_path_factory):
    from scipy.stats import pearsonr, spearmanr

    cli, metrics, preds, best, pair_files = fit_test_predict("stsb.yaml", make_pairs, tiny_bert,
                                                             tmp_path_factory.mktemp("regression"), "--model.loss.regression", "huber")
    assert cli.model.problem_type == "regression" and cli.model.label_names is None
    gold = np.array([json.loads(line)["label"] for line in Path(pair_files["test"]).read_text().splitlines()])
    score = np.array([p["score"] for p in preds])
    assert metrics["test/pearson"] == pytest.approx(pearsonr(score, gold)[0], abs=1e-4)
    assert metrics["test/spearman"] == pytest.approx(spearmanr(score, gold)[0], abs=1e-4)
    assert metrics["test/rmse"] == pytest.approx(float(np.sqrt(np.mean((score - gold) ** 2))), abs=1e-4)
    assert metrics["test/pearson"] >= 0.5  # the score counts shared words: a tiny model finds some of it
    mistakes = json.loads((Path(best).parents[1] / "test_mistakes.json").read_text())  # the largest errors first
    errors = np.abs(score - gold)
    assert [m["error"] for m in mistakes] == pytest.approx(sorted(errors, reverse=True)[:20], abs=1e-4)

    out = export_checkpoint(best, tmp_path_factory.mktemp("regression-export") / "export")
    assert json.loads((out / "config.json").read_text())["problem_type"] == "regression"
    rows = [json.loads(line) for line in Path(pair_files["test"]).read_text().splitlines()][:8]
    loaded = taskhead.load(out, precision="32-true")([r["sentence1"] for r in rows], text_pairs=[r["sentence2"] for r in rows])
    assert [p["score"] for p in loaded] == pytest.approx(score[:8].tolist(), abs=1e-4)

    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(out), device="cpu", top_k=None)
    got = pipe([{"text": r["sentence1"], "text_pair": r["sentence2"]} for r in rows])
    assert [s[0]["score"] for s in got] == pytest.approx([p["score"] for p in loaded], abs=1e-5)  # no activation


def test_best_threshold_takes_the_middle_of_a_plateau():
    from taskhead.core.metrics import best_threshold, threshold_curve

    curve = threshold_curve()
    # positives at 0.9 and 0.85, negatives at 0.3 and 0.1: every threshold in (0.3, 0.85] separates them (F1 1)
    curve.update(torch.tensor([0.9, 0.85, 0.3, 0.1]), torch.tensor([1, 1, 0, 0]))
    threshold, f1 = best_threshold(curve)
    assert f1 == 1.0 and threshold == pytest.approx(0.6)  # 0.35 ... 0.85: the middle
