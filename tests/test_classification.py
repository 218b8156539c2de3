"""Classification end to end on a tiny model: data handling, a short fit that learns, test artifacts, predict,
export and the round trip through taskhead.load and transformers.pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import taskhead
from taskhead.cli import run_cli
from taskhead.core.export import export_checkpoint
from taskhead.errors import TaskheadError
from taskhead.tasks.classification import ClassificationDataModule, ClassificationModule, label_names_from

from conftest import cli_args, make_reviews, write_jsonl


def dm_for(tiny_bert, tmp_path, **kw) -> ClassificationDataModule:
    return ClassificationDataModule(model_name_or_path=tiny_bert, cache_dir=str(tmp_path / "cache"), **kw)


def test_label_sets():
    assert label_names_from([2, 10, 1]) == ["1", "2", "10"]
    assert label_names_from(["10", "9"]) == ["9", "10"]
    assert label_names_from(["pos", "neg"]) == ["neg", "pos"]


def test_string_labels_and_sentence_fields(tiny_bert, tmp_path):
    rows = [{"sentence": r["text"], "label": r["label"]} for r in make_reviews(40, 0)]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    dm = dm_for(tiny_bert, tmp_path, train_file=str(train), text_field="sentence")
    assert dm.label_names == ["neg", "pos"] and dm.label_counts == [18, 18]  # the 36 rows left after the hold-out
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 36 and len(dm.datasets["validation"]) == 4  # stratified 10 % hold-out
    assert sorted(dm.datasets["validation"]["label"]) == [0, 0, 1, 1]
    batch = next(iter(dm.train_dataloader()))
    ids = batch["inputs"]["input_ids"]
    assert ids.shape[0] == 32 and ids.shape[1] == int(batch["inputs"]["attention_mask"].sum(1).max())  # padded per batch
    assert batch["stats"]["tokens"] == int(batch["inputs"]["attention_mask"].sum())


def test_csv_with_sentence_field(tiny_bert, tmp_path):
    """A dataset whose fields are sentence/label works with two overrides (CSV: every value is a string)."""
    rows = make_reviews(30, 4, labels=("0", "1"))
    csv = tmp_path / "t.csv"
    csv.write_text("sentence,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    dm = dm_for(tiny_bert, tmp_path, train_file=str(csv), text_field="sentence", label_field="label")
    assert dm.label_names == ["0", "1"] and sum(dm.label_counts) == 27  # 3 of 30 held out for validation


def test_label_counts_are_the_training_rows_used(tiny_bert, tmp_path):
    """``class_weights: balanced`` weighs the labels the model trains on: not the held-out validation rows, not the
    rows ``max_train_samples`` leaves out (issue 14, bug 4: the counts were taken over the whole training file)."""
    rows = make_reviews(60, 0)
    rows = [r for r in rows if r["label"] == "neg"] + [r for r in rows if r["label"] == "pos"][:10]  # 30 neg, 10 pos
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    dm = dm_for(tiny_bert, tmp_path, train_file=str(train), max_train_samples=20)
    counts = dm.label_counts
    dm.setup("fit")
    used = np.bincount(dm.datasets["train"]["label"], minlength=2).tolist()
    assert sum(used) == 20 and counts == used
    assert len(dm.datasets["validation"]) == 4  # held out before the subset, as before


def test_int_labels_index_label_names(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}] * 5)
    dm = dm_for(tiny_bert, tmp_path, train_file=str(train), label_names=["neg", "pos"])
    assert dm.label_names == ["neg", "pos"]
    assert dm.parsed["train"]["label"][:2] == [1, 0]


def test_unknown_test_label_names_file_and_line(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", make_reviews(10, 0))
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "fine", "label": "neg"}, {"text": "meh", "label": "neutral"}])
    dm = dm_for(tiny_bert, tmp_path, train_file=str(train), test_file=str(test))
    with pytest.raises(TaskheadError, match=r"test.jsonl:2: label 'neutral' is not one of the training labels \['neg', 'pos'\]"):
        dm.label_names


def test_tokenisation_is_cached(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", make_reviews(40, 0))
    for _ in range(2):
        dm = dm_for(tiny_bert, tmp_path, train_file=str(train))
        dm.setup("fit")
    assert len(list((tmp_path / "cache").glob("train-*.arrow"))) == 1
    dm = dm_for(tiny_bert, tmp_path, train_file=str(train), max_length=8)  # a different encoding: a new cache file
    dm.setup("fit")
    assert len(list((tmp_path / "cache").glob("train-*.arrow"))) == 2


def test_custom_head_forward_and_freeze(tiny_bert):
    m = ClassificationModule(tiny_bert, label_names=["a", "b", "c"], head={"pooling": "mean", "hidden_sizes": [16]})
    inputs = {"input_ids": torch.tensor([[101, 2204, 102, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    assert m(inputs).shape == (1, 3)
    assert set(m.head_state_dict()) == {"head.1.weight", "head.1.bias", "head.4.weight", "head.4.bias"}


@pytest.fixture(scope="module")
def fitted(tiny_bert, review_files, tmp_path_factory):
    """One short fit through the real CLI; returns (run dir, best checkpoint, args)."""
    root = tmp_path_factory.mktemp("fit")
    args = cli_args(
        tiny_bert, {"train": review_files["train"], "test": review_files["test"], "predict": review_files["predict"]}, root,
        "--model.optimizer.lr", "3e-3", "--model.scheduler.warmup_ratio", "0.0", "--trainer.max_epochs", "4", "--trainer.log_every_n_steps", "2",
    )
    cli = run_cli(["fit", *args])
    run = Path(cli.trainer.log_dir)
    return run, cli.trainer.checkpoint_callback.best_model_path, args, cli


def test_fit_learns_and_writes_run_files(fitted):
    run, best, _, cli = fitted
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/acc"]) >= 0.9  # sentiment words decide the label: a tiny model must learn it
    for name in ("config.yaml", "manifest.json", "hparams.yaml"):
        assert (run / name).is_file()
    assert list(run.glob("events.out.tfevents.*"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data_files"]["train"]["sha256"] and manifest["packages"]["torch"].startswith("2.13")
    assert manifest["seed"] == 42
    assert Path(best).is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    for tag in ("train/loss", "val/acc", "val/f1_macro", "val/f1/pos", "lr/head", "lr/backbone.layer_1", "perf/tokens_per_s", "perf/padding_share"):
        assert tag in tags, tag


def test_loss_goes_down(fitted):
    """Validation loss of the trained checkpoint vs the same seeded model before training (chance level: ln 2)."""
    _, best, args, _ = fitted
    before = float(run_cli(["validate", *args]).trainer.callback_metrics["val/loss"])
    after = float(run_cli(["validate", *args, "--ckpt_path", best]).trainer.callback_metrics["val/loss"])
    assert before > 0.6 and after < before - 0.05, (before, after)  # validation is deterministic: no noise to clear


def test_test_writes_metrics_confusion_and_mistakes(fitted):
    run, best, args, _ = fitted
    cli = run_cli(["test", *args, "--ckpt_path", best])
    out = Path(cli.trainer.log_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test/acc", "test/f1_macro", "test/precision/neg", "test/recall/pos", "test/loss"} <= set(metrics)
    cm = json.loads((out / "confusion_matrix.json").read_text())
    assert sum(map(sum, cm["rows_gold_cols_pred"])) == 64
    correct = cm["rows_gold_cols_pred"][0][0] + cm["rows_gold_cols_pred"][1][1]
    assert metrics["test/acc"] == pytest.approx(correct / 64)
    mistakes = json.loads((out / "test_mistakes.json").read_text())
    assert len(mistakes) == 64 - correct or len(mistakes) == 20
    assert [m["confidence"] for m in mistakes] == sorted((m["confidence"] for m in mistakes), reverse=True)
    assert all({m["gold"], m["pred"]} == {"neg", "pos"} for m in mistakes)  # by name, and wrong


def test_checkpoint_refuses_reordered_label_names(fitted):
    """Label ids are positions in label_names: a checkpoint trained on [neg, pos] read with [pos, neg] would swap
    every prediction, so loading it stops with one line."""
    _, best, args, _ = fitted
    with pytest.raises(TaskheadError, match=r"trained with label_names \['neg', 'pos'\] but the model now has \['pos', 'neg'\]"):
        run_cli(["test", *args, "--ckpt_path", best, "--data.label_names", "[pos, neg]"])


def test_predict_export_load_and_pipeline_agree(fitted, tmp_path, review_files):
    run, best, args, _ = fitted
    cli = run_cli(["predict", *args, "--ckpt_path", best])
    preds = [json.loads(line) for line in (Path(cli.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    texts = [json.loads(line)["text"] for line in Path(review_files["predict"]).read_text().splitlines()]
    assert len(preds) == len(texts) == 10

    out = export_checkpoint(best, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "taskhead.json").is_file()
    predictor = taskhead.load(out, precision="32-true")
    loaded = predictor(texts)
    assert [p["label"] for p in loaded] == [p["label"] for p in preds]  # same order, same labels
    for a, b in zip(loaded, preds):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert sum(a["probabilities"].values()) == pytest.approx(1.0)
    one = predictor(texts[0])  # a single string gives a single dict (unpadded: equal up to float rounding)
    assert one["label"] == loaded[0]["label"] and one["score"] == pytest.approx(loaded[0]["score"], abs=1e-5)

    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(out), device="cpu")
    for p, q in zip(pipe(texts), loaded):
        assert p["label"] == q["label"] and p["score"] == pytest.approx(q["score"], abs=1e-4)


def test_custom_head_export_round_trip(tiny_bert, review_files, tmp_path):
    args = cli_args(tiny_bert, {"train": review_files["train"]}, tmp_path,
                    "--model.head", '{"pooling": "max", "hidden_sizes": [8], "layer_norm": true}',
                    "--model.loss.name", "focal", "--model.optimizer.layer_decay", "0.8",
                    "--model.optimizer.freeze_backbone_steps", "3", "--trainer.max_steps", "5")
    cli = run_cli(["fit", *args])
    module = cli.model
    assert module.head is not None and module.loss_cfg.name == "focal"
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    out = export_checkpoint(ckpt, tmp_path / "export")
    assert (out / "head.safetensors").is_file()
    texts = ["a wonderful superb film", "dull and awful plot"]
    module.eval()
    with torch.inference_mode():
        expected = module.predict_raw(taskhead.load(out, precision="32-true").tokenizer, texts)
    assert taskhead.load(out, precision="32-true")(texts) == expected


@pytest.mark.parametrize("freeze_steps", [4, 2])
def test_freeze_then_unfreeze(tiny_bert, review_files, tmp_path, freeze_steps):
    """Frozen steps leave the backbone untouched; after them it trains at the scheduled LR, not a changed one."""
    args = cli_args(tiny_bert, {"train": review_files["train"]}, tmp_path,
                    "--model.optimizer.freeze_backbone_steps", str(freeze_steps), "--model.optimizer.lr", "1e-3",
                    "--model.scheduler.name", "constant", "--model.scheduler.warmup_ratio", "0.0",
                    "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", "--checkpoint.monitor", "null")
    before = ClassificationModule(tiny_bert, label_names=["neg", "pos"]).model.bert.state_dict()
    cli = run_cli(["fit", *args])
    after = cli.model.model.bert.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if freeze_steps >= 4:
        assert changed == []
    else:
        assert "encoder.layer.0.attention.self.query.weight" in changed
    assert all(p.requires_grad for p in cli.model.parameters()) == (freeze_steps < 4)
    lrs = {g["name"]: g["lr"] for g in cli.trainer.optimizers[0].param_groups}
    assert lrs["backbone.layer_1"] == pytest.approx(1e-3)


def test_predict_raw_reads_the_text_pair(tiny_bert, tmp_path):
    """Sentence pairs: ``predict_raw(texts, text_pairs)`` scores what the DataModule's pair encoding feeds the model in
    ``taskhead predict`` (both texts, the pair's token types), not the first text alone."""
    hypotheses = ["the plot was great", "the acting was awful", "a film", "boring"]
    rows = [{"premise": r["text"], "hypothesis": h} for r, h in zip(make_reviews(4, 5), hypotheses)]
    dm = dm_for(tiny_bert, tmp_path, predict_file=str(write_jsonl(tmp_path / "pairs.jsonl", rows)),
                text_field="premise", text_pair_field="hypothesis")
    dm.setup("predict")
    torch.manual_seed(0)
    module = ClassificationModule(tiny_bert, label_names=["entailment", "neutral", "contradiction"]).eval()
    batch = next(iter(dm.predict_dataloader()))
    assert (batch["inputs"]["token_type_ids"] == 1).any()  # the pair is really encoded as a pair
    with torch.inference_mode():
        probs = module(batch["inputs"]).float().softmax(-1)
        by_idx = {int(i): p.tolist() for i, p in zip(batch["idx"], probs)}
        premises, pairs = [r["premise"] for r in rows], [r["hypothesis"] for r in rows]
        got = module.predict_raw(dm.tokenizer, premises, text_pairs=pairs)
        alone = module.predict_raw(dm.tokenizer, premises)
        single = module.predict_raw(dm.tokenizer, premises[0], text_pairs=pairs[0])
    for i, row in enumerate(got):
        assert list(row["probabilities"].values()) == pytest.approx(by_idx[i], abs=1e-5)
    assert single == got[0]
    assert all(a["probabilities"] != pytest.approx(b["probabilities"], abs=1e-6) for a, b in zip(alone, got))
    with pytest.raises(TaskheadError, match="2 texts but 1 text_pairs"):
        module.predict_raw(dm.tokenizer, premises[:2], text_pairs=pairs[:1])
