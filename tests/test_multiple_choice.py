"""Multiple choice end to end on a tiny model: reading the SWAG and generic forms, bad inputs, pair encoding and
padding, a short CLI fit/test/predict, export and the round trip through taskhead.load."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import taskhead
from taskhead.cli import main, run_cli
from taskhead.core.export import export_checkpoint
from taskhead.core.pretrained import load_tokenizer
from taskhead.errors import TaskheadError
from taskhead.tasks.multiple_choice import (
    MultipleChoiceDataModule,
    MultipleChoiceModule,
    encode_choices,
    position_report,
)

from conftest import FILLER, NEGATIVE, POSITIVE, ROOT, cli_args, write_jsonl, parsed_rows

SWAG_SAMPLE = ROOT.parent / "shared/data/swag/sample_val.csv"
SWAG_HEADER = ",video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,label\n"


def make_items(n: int, seed: int, num_choices: int = 4) -> list[dict]:
    """The gold choice holds a positive word, the others negative ones: a per-choice scorer can learn it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        gold = i % num_choices
        endings = [" ".join(rng.choices(FILLER, k=rng.randint(1, 5)) + [rng.choice(POSITIVE if j == gold else NEGATIVE)])
                   for j in range(num_choices)]
        rows.append({"ctx": " ".join(rng.choices(FILLER, k=rng.randint(3, 12))), "endings": endings, "label": gold})
    return rows


def swag_row(i: int, endings=("a", "b", "c", "d"), label="0") -> str:
    return f"{i},vid,1,start,The man sits down.,He,gold,{','.join(endings)},{label}\n"


def dm_for(tmp_path, tokenizer_dir=None, **kw) -> MultipleChoiceDataModule:
    return MultipleChoiceDataModule(model_name_or_path=tokenizer_dir, cache_dir=str(tmp_path / "cache"), **kw)


GENERIC = {"context_field": "ctx", "choices_field": "endings"}


# ---- reading --------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not SWAG_SAMPLE.is_file(), reason="../shared/data/swag/sample_val.csv is not here")
def test_reads_real_swag_sample(tmp_path):
    dm = dm_for(tmp_path, test_file=str(SWAG_SAMPLE))
    recs = parsed_rows(dm, "test")
    assert len(recs) == 91 and dm.num_choices == 4
    assert recs[0]["context"] == "Students lower their eyes nervously."
    assert recs[0]["choices"][0] == "She pats her shoulder, then saunters toward someone."  # sent2 + " " + ending0
    assert [sum(r["label"] == k for r in recs) for k in range(4)] == [20, 19, 30, 22]  # as SOURCE.md says


def test_reads_generic_jsonl_any_number_of_choices(tmp_path):
    rows = [{"q": {"text": "pick one"}, "opts": ["x", "y", "z"], "answer": "2"}, {"q": {"text": "again"}, "opts": ["u", "v", "w"], "answer": 0}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    dm = dm_for(tmp_path, train_file=str(path), context_field="q.text", choices_field="opts", label_field="answer")
    assert [(r["context"], r["choices"], r["label"]) for r in parsed_rows(dm, "train")] == [
        ("pick one", ["x", "y", "z"], 2), ("again", ["u", "v", "w"], 0)]
    assert dm.num_choices == 3


def test_predict_file_needs_no_label(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"ctx": "c", "endings": ["a", "b"]}])
    assert "label" not in parsed_rows(dm_for(tmp_path, predict_file=str(path), **GENERIC), "predict")[0]


BAD = {
    "different number of choices": ("jsonl", [{"ctx": "c", "endings": ["a", "b", "c"], "label": 0}, {"ctx": "c", "endings": ["a", "b"], "label": 0}],
                                    r"t\.jsonl:2: 2 choices, but .*t\.jsonl:1 has 3"),
    "label out of range": ("jsonl", [{"ctx": "c", "endings": ["a", "b"], "label": 0}, {"ctx": "c", "endings": ["a", "b"], "label": 2}],
                           r"t\.jsonl:2: label 2 is outside \[0, 2\)"),
    "negative label": ("jsonl", [{"ctx": "c", "endings": ["a", "b"], "label": -1}], r"t\.jsonl:1: label -1 is outside"),
    "empty ending": ("jsonl", [{"ctx": "c", "endings": ["a", "b"], "label": 0}, {"ctx": "c", "endings": ["a", " "], "label": 0}],
                     r"t\.jsonl:2: field 'endings' choice 1 is empty"),
    "one choice": ("jsonl", [{"ctx": "c", "endings": ["a"], "label": 0}], r"t\.jsonl:1: field 'endings' has 1 choice"),
    "missing context": ("jsonl", [{"context": "c", "endings": ["a", "b"], "label": 0}], r"t\.jsonl:1: field 'ctx' is missing"),
    "missing label": ("jsonl", [{"ctx": "c", "endings": ["a", "b"]}], r"t\.jsonl:1: field 'label' is missing"),
    "swag empty ending": ("csv", SWAG_HEADER + swag_row(0) + swag_row(1, ("a", "", "c", "d")), r"t\.csv:3: field 'ending1' is empty"),
    "swag label out of range": ("csv", SWAG_HEADER + swag_row(0, label="4"), r"t\.csv:2: label 4 is outside \[0, 4\)"),
    "swag missing column": ("csv", SWAG_HEADER.replace(",sent2", "") + swag_row(0).replace(",He", ""), r"t\.csv:2: field 'sent2' is missing"),
    "swag missing label column": ("csv", SWAG_HEADER.replace(",label", "") + swag_row(0).replace(",0\n", "\n"), r"t\.csv:2: field 'label' is missing"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_name_file_and_line(case, tmp_path):
    kind, content, message = BAD[case]
    path = tmp_path / f"t.{kind}"
    if kind == "jsonl":
        write_jsonl(path, content)
        dm = dm_for(tmp_path, train_file=str(path), **GENERIC)
    else:
        path.write_text(content)
        dm = dm_for(tmp_path, train_file=str(path))
    with pytest.raises(TaskheadError, match=message):
        dm.data_facts


def test_choice_count_must_match_across_splits(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"ctx": "c", "endings": ["a", "b"], "label": 0}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"ctx": "c", "endings": ["a", "b", "c"], "label": 0}])
    with pytest.raises(TaskheadError, match=r"test\.jsonl:1: 3 choices, but .*train\.jsonl:1 has 2"):
        dm_for(tmp_path, train_file=str(train), test_file=str(test), **GENERIC).data_facts


# ---- encoding and padding -------------------------------------------------------------------------------------------


def test_encode_truncates_the_context_first(tiny_bert):
    tok = load_tokenizer(tiny_bert)
    ctx = "one two three four five six seven eight nine ten"
    long_choice = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    enc = encode_choices(tok, [ctx, "short"], [["yes", long_choice], ["a b", "c"]], max_length=8)
    assert [len(x) for x in enc["input_ids"]] == [2, 2]  # (examples, choices, tokens)
    first = enc["input_ids"][0][0]
    assert len(first) == 8 and tok.decode(first) == "[CLS] one two three four [SEP] yes [SEP]"  # choice kept whole
    assert len(enc["input_ids"][0][1]) == 8  # choice alone too long for only_first: longest_first fallback
    assert enc["length"] == [8, 6] and enc["full_length"] == [len(tok(ctx, long_choice)["input_ids"]), 6]
    assert enc["token_type_ids"][0][0] == [0] * 6 + [1] * 2


def test_collate_pads_all_choices_of_the_batch(tiny_bert, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", make_items(12, 0, num_choices=3))
    dm = dm_for(tmp_path, tiny_bert, train_file=str(path), batch_size=5, group_by_length=False, **GENERIC)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ids, mask = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"]
    assert ids.shape[:2] == (5, 3) and ids.shape == mask.shape == batch["inputs"]["token_type_ids"].shape
    assert ids.shape[2] == int(mask.sum(-1).max())  # padded to the longest pair of the batch, no further
    ds = dm.datasets["train"]
    lengths = {i: [len(x) for x in ds[i]["input_ids"]] for i in range(len(ds))}
    for row, idx in zip(mask.sum(-1).tolist(), batch["idx"].tolist()):
        assert row == lengths[idx]  # each choice keeps its own real length
    assert batch["stats"] == {"samples": 5, "tokens": int(mask.sum()), "padded": mask.numel()}
    assert batch["labels"].tolist() == [ds[i]["label"] for i in batch["idx"].tolist()]


def test_position_report():
    rep = position_report([[2, 1], [0, 1]])
    assert rep == [{"position": 0, "gold": 3, "predicted": 2, "accuracy": 2 / 3},
                   {"position": 1, "gold": 1, "predicted": 2, "accuracy": 1.0}]


def test_heads_score_each_choice(tiny_bert):
    inputs = {"input_ids": torch.tensor([[[101, 2204, 102, 0], [101, 2919, 2204, 102]]] * 3),
              "attention_mask": torch.tensor([[[1, 1, 1, 0], [1, 1, 1, 1]]] * 3)}
    own = MultipleChoiceModule(tiny_bert, num_choices=2).eval()
    assert own(inputs).shape == (3, 2)
    custom = MultipleChoiceModule(tiny_bert, num_choices=2, head={"pooling": "mean", "hidden_sizes": [16]}).eval()
    scores = custom(inputs)
    assert scores.shape == (3, 2) and torch.allclose(scores[0], scores[1])
    assert set(custom.head_state_dict()) == {"head.1.weight", "head.1.bias", "head.4.weight", "head.4.bias"}
    with pytest.raises(TaskheadError, match="data has 2 choices per example but model.num_choices is 4"):
        MultipleChoiceModule(tiny_bert, num_choices=4)._scores({"inputs": inputs})


# ---- CLI: fit / test / predict / export ------------------------------------------------------------------------------


def mc_args(tiny_bert: str, files: dict[str, str], run_root: Path, *extra: str) -> list[str]:
    """The shipped SWAG config with generic JSONL fields, the tiny model and a short fp32 CPU run."""
    fields = ["--data.dataset_config", "null", "--data.context_field", "ctx", "--data.choices_field", "endings",
              "--data.max_length", "64"]
    return cli_args(tiny_bert, files, run_root, *fields, *extra, config="swag.yaml")


@pytest.fixture(scope="module")
def mc_files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("mc")
    return {
        "train": str(write_jsonl(d / "train.jsonl", make_items(160, 1))),
        "test": str(write_jsonl(d / "test.jsonl", make_items(48, 2))),
        "predict": str(write_jsonl(d / "predict.jsonl", [{k: r[k] for k in ("ctx", "endings")} for r in make_items(10, 3)])),
    }


@pytest.fixture(scope="module")
def fitted(tiny_bert, mc_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("mc-fit")
    args = mc_args(tiny_bert, mc_files, root, "--model.optimizer.lr", "3e-3", "--model.scheduler.warmup_ratio", "0.0",
                   "--trainer.max_epochs", "4", "--trainer.log_every_n_steps", "2")
    cli = run_cli(["fit", *args])
    return Path(cli.trainer.log_dir), cli.trainer.checkpoint_callback.best_model_path, args, cli


def test_fit_learns(fitted):
    run, best, _, cli = fitted
    assert float(cli.trainer.callback_metrics["val/acc"]) >= 0.6  # chance is 0.25
    assert Path(best).is_file() and (run / "manifest.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    for tag in ("train/loss", "val/acc", "val/acc_by_gold/3", "val/loss", "perf/tokens_per_s"):
        assert tag in tags, tag


def test_test_writes_accuracy_positions_and_mistakes(fitted):
    run, best, args, _ = fitted
    out = Path(run_cli(["test", *args, "--ckpt_path", best]).trainer.log_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test/acc", "test/loss", "test/acc_by_gold/0", "test/acc_by_gold/3"} <= set(metrics)
    pos = json.loads((out / "choice_positions.json").read_text())
    assert [p["gold"] for p in pos["positions"]] == [12, 12, 12, 12]
    correct = sum(pos["rows_gold_cols_pred"][i][i] for i in range(4))
    assert metrics["test/acc"] == pytest.approx(correct / 48)
    assert metrics["test/acc_by_gold/1"] == pytest.approx(pos["positions"][1]["accuracy"])
    mistakes = json.loads((out / "test_mistakes.json").read_text())
    assert len(mistakes) == min(48 - correct, 20)
    assert [m["confidence"] for m in mistakes] == sorted((m["confidence"] for m in mistakes), reverse=True)
    if mistakes:
        assert set(mistakes[0]) == {"index", "context", "choices", "gold", "pred", "confidence"}


@pytest.mark.skipif(not SWAG_SAMPLE.is_file(), reason="../shared/data/swag/sample_val.csv is not here")
def test_test_on_swag_csv_with_the_same_model(fitted):
    _, best, args, _ = fitted
    args = [*args, "--data.train_file", "null", "--data.predict_file", "null", "--data.test_file", str(SWAG_SAMPLE),
            "--data.context_field", "sent1", "--data.choices_field", "null"]
    out = Path(run_cli(["test", *args, "--ckpt_path", best]).trainer.log_dir)
    pos = json.loads((out / "choice_positions.json").read_text())
    assert [p["gold"] for p in pos["positions"]] == [20, 19, 30, 22]


def test_predict_export_and_load_agree(fitted, mc_files, tmp_path):
    _, best, args, _ = fitted
    cli = run_cli(["predict", *args, "--ckpt_path", best])
    preds = [json.loads(line) for line in (Path(cli.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    items = [json.loads(line) for line in Path(mc_files["predict"]).read_text().splitlines()]
    assert len(preds) == 10 and {"index", "choice", "probabilities"} <= set(preds[0])
    assert [p["id"] for p in preds] == list(range(1, 11)) and preds[0]["context"] == items[0]["ctx"]  # line numbers
    assert all(p["choice"] == it["endings"][p["index"]] for p, it in zip(preds, items))

    out = export_checkpoint(best, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and not (out / "head.safetensors").exists()
    predictor = taskhead.load(out, precision="32-true")
    loaded = predictor([{"context": it["ctx"], "choices": it["endings"]} for it in items])
    assert [p["index"] for p in loaded] == [p["index"] for p in preds]
    for a, b in zip(loaded, preds):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)
    one = predictor(context=items[0]["ctx"], choices=items[0]["endings"])
    assert one["index"] == loaded[0]["index"] and one["probabilities"] == pytest.approx(loaded[0]["probabilities"], abs=1e-5)
    three = predictor([(items[0]["ctx"], items[0]["endings"][:3]), (items[1]["ctx"], items[1]["endings"])])
    assert len(three[0]["probabilities"]) == 3 and len(three[1]["probabilities"]) == 4  # any number of choices
    with pytest.raises(TaskheadError, match="item 0: field 'choices' has 1 choice"):
        predictor(context="c", choices=["only"])


def test_custom_head_export_round_trip(tiny_bert, mc_files, tmp_path):
    args = mc_args(tiny_bert, {"train": mc_files["train"]}, tmp_path,
                   "--model.head", '{"pooling": "max", "hidden_sizes": [8], "layer_norm": true}',
                   "--model.loss.label_smoothing", "0.1", "--trainer.max_steps", "3")
    cli = run_cli(["fit", *args])
    module = cli.model
    assert module.head is not None and module.loss_cfg.label_smoothing == 0.1
    out = export_checkpoint(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", tmp_path / "export")
    assert (out / "head.safetensors").is_file()
    items = [{"context": "the film was", "choices": ["great", "awful", "dull"]}]
    module.eval()
    with torch.inference_mode():
        expected = module.predict_raw(taskhead.load(out, precision="32-true").tokenizer, items)
    assert taskhead.load(out, precision="32-true")(items) == expected


def test_cli_bad_input_exits_2(tiny_bert, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", make_items(4, 0) + [{"ctx": "c", "endings": ["a", "b"], "label": 0}])
    with pytest.raises(SystemExit) as exc:
        main(["fit", *mc_args(tiny_bert, {"train": str(train)}, tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # the data is checked before any model is loaded
    assert "train.jsonl:5: 2 choices, but" in err and err.strip().endswith("same number of choices")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("configs", [["swag.yaml"], ["swag.yaml", "offline/swag.yaml"]])
def test_shipped_configs_parse(configs, capsys):
    args = [a for c in configs for a in ("--config", str(ROOT / "configs" / c))]
    with pytest.raises(SystemExit) as exc:
        run_cli(["fit", *args, "--print_config"])
    assert exc.value.code in (0, None)
    assert "MultipleChoiceDataModule" in capsys.readouterr().out
