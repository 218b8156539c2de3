"""Extractive QA: windows and span labels checked by hand, n-best post-processing on hand-written logits, the
official SQuAD v1.1 EM/F1 against hand-computed numbers, bad inputs, and fit/test/predict/export on a tiny model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import taskhead
from taskhead.cli import main, run_cli
from taskhead.core.export import export_checkpoint
from taskhead.core.pretrained import load_tokenizer
from taskhead.errors import TaskheadError
from taskhead.tasks.qa import QADataModule, QAModule
from taskhead.tasks.qa_spans import (
    ExampleBatchSampler,
    best_answer,
    prepare_features,
    span_labels,
    squad_scores,
    window_candidates,
)

from conftest import MINILM, cli_args, write_jsonl, parsed_rows

# 40 words that are one WordPiece each (checked below), so token positions can be worked out by hand
WORDS = ("cat dog red blue green sun moon star tree lake river hill road town city house door wall roof floor bread milk "
         "salt fish bird horse cow ship boat car train bus king queen girl boy man woman child book").split()


def squad_json(path: Path, paragraphs: list[tuple[str, list[dict]]]) -> str:
    """paragraphs: (context, [{"id", "question", "answers": [{"text", "answer_start"}]}])."""
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": c, "qas": qas} for c, qas in paragraphs]}]}
    path.write_text(json.dumps(data))
    return str(path)


def dm_for(tiny_bert, tmp_path, **kw) -> QADataModule:
    return QADataModule(model_name_or_path=tiny_bert, cache_dir=str(tmp_path / "cache"), **kw)


# ---- preprocessing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_windows_and_labels_on_a_long_context(side):
    tok = load_tokenizer(MINILM)
    assert all(len(tok.tokenize(w)) == 1 for w in WORDS[:40])
    tok.padding_side = side
    context = "   " + " ".join(WORDS[:40])  # leading blanks: offsets still index the raw context
    start = context.index(" ship boat") + 1  # words 27 and 28 (0-based)
    answers = [{"text": ["ship boat"], "answer_start": [start]}]
    f = prepare_features(tok, ["where?"], [context], max_length=24, doc_stride=8, answers=answers)
    # [CLS] where ? [SEP] + 19 context tokens + [SEP] = 24; windows overlap by 8 → context words 0-18, 11-29, 22-39
    assert f["example"] == [0, 0, 0]
    assert [sum(o is not None for o in offs) for offs in f["offsets"]] == [19, 19, 18]
    # window 1 (words 0-18) lacks the answer: CLS (0); windows 2 (from word 11) and 3 (from word 22) both hold it
    if side == "right":  # question first: context word k of a window starting at word w0 sits at 4 + (k - w0)
        assert f["start_positions"] == [0, 4 + 27 - 11, 4 + 27 - 22] and f["end_positions"] == [0, 4 + 28 - 11, 4 + 28 - 22]
    else:  # context first ([CLS] context [SEP] where ? [SEP]): 1 + (k - w0)
        assert f["start_positions"] == [0, 1 + 27 - 11, 1 + 27 - 22] and f["end_positions"] == [0, 1 + 28 - 11, 1 + 28 - 22]
    for w in (1, 2):
        s, e = f["start_positions"][w], f["end_positions"][w]
        assert context[f["offsets"][w][s][0] : f["offsets"][w][e][1]] == "ship boat"
        assert tok.convert_ids_to_tokens(f["input_ids"][w][s : e + 1]) == ["ship", "boat"]


def test_span_labels_by_hand():
    offsets = [None, None, (0, 3), (4, 9), (10, 12), (13, 18), None]
    assert span_labels(offsets, 4, 12, cls_index=0) == (3, 4)
    assert span_labels(offsets, 5, 9, cls_index=0) == (3, 3)  # inside one token: that token
    assert span_labels(offsets, 13, 20, cls_index=0) == (0, 0)  # runs past the window's context
    assert span_labels([None, None], 0, 1, cls_index=0) == (0, 0)


def test_left_padding_collate_moves_labels(tiny_bert, tmp_path):
    context = " ".join(WORDS[:12])
    qa = [{"id": "q1", "question": "   where?", "answers": [{"text": "tree", "answer_start": context.index("tree")}]},
          {"id": "q2", "question": "which one is it here?", "answers": [{"text": "cat", "answer_start": 0}]}]
    train = squad_json(tmp_path / "t.json", [(context, qa)])
    for side in ("right", "left"):
        dm = dm_for(tiny_bert, tmp_path / side, train_file=train, validation_file=train)
        dm.tokenizer.padding_side = side
        assert parsed_rows(dm, "train")[0]["question"] == "where?"  # leading whitespace stripped
        dm.setup("fit")
        batch = dm.collate([dm.datasets["train"][i] for i in range(2)])
        ids = batch["inputs"]["input_ids"]
        got = [dm.tokenizer.convert_ids_to_tokens([int(ids[i, batch["start_positions"][i]])])[0] for i in range(2)]
        assert got == ["tree", "cat"], side


def test_hub_shaped_record_and_example_sampler(tiny_bert, tmp_path):
    dm = dm_for(tiny_bert, tmp_path)
    rec = {"id": "5733be28", "title": "x", "context": "a b c", "question": "q?", "answers": {"text": ["b"], "answer_start": [2]}}
    assert dm.parse_record(rec, "rajpurkar/squad[train] row 0", "train")["answers"] == {"text": ["b"], "answer_start": [2]}
    sampler = ExampleBatchSampler(examples=[0, 0, 0, 1, 2, 2], lengths=[9, 9, 5, 3, 8, 2], batch_size=4)
    assert list(sampler) == [[0, 1, 2], [4, 5, 3]]  # whole questions per batch, longest first


def test_example_sampler_never_exceeds_the_batch_size():
    # question 1 has 5 windows, more than a batch of 2 holds: it fills batches of its own, in window order
    examples, lengths = [0, 1, 1, 1, 1, 1, 2, 3], [4, 9, 9, 9, 9, 6, 5, 3]
    sampler = ExampleBatchSampler(examples, lengths, batch_size=2)
    assert list(sampler) == [[1, 2], [3, 4], [5], [6, 0], [7]]
    # two ranks: every batch within the size, every window on exactly one rank, all windows of a question on one rank
    ranks = [list(ExampleBatchSampler(examples, lengths, batch_size=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert all(len(b) <= 2 for batches in ranks for b in batches)
    rows = [row for batches in ranks for b in batches for row in b]
    assert sorted(rows) == list(range(len(examples)))
    owner = {examples[row]: r for r, batches in enumerate(ranks) for b in batches for row in b}
    assert all(owner[examples[row]] == r for r, batches in enumerate(ranks) for b in batches for row in b)


def test_example_sampler_gives_every_rank_the_same_number_of_batches():
    # under FSDP every forward is a collective: a rank with fewer prediction batches would leave the others waiting.
    # Question 0 has 4 windows (two batches of 2); six one-window questions follow: rank 0 would get 3 batches, rank 1 two
    examples, lengths = [0, 0, 0, 0, 1, 2, 3, 4, 5, 6], [9, 9, 9, 9, 5, 5, 4, 4, 3, 3]
    ranks = [list(ExampleBatchSampler(examples, lengths, batch_size=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert all(1 <= len(b) <= 2 for batches in ranks for b in batches)
    assert sorted(row for batches in ranks for b in batches for row in b) == list(range(len(examples)))


def test_predict_batches_split_long_contexts_and_answers_match_predict_raw(tiny_bert, tmp_path):
    """A context with more windows than an eval batch holds: batches stay within the size, and predict_step (which
    carries a question's candidates over to its next batch) gives the answers predict_raw gives on whole questions."""
    long_context = " ".join(WORDS * 2)  # 80 one-piece words: several windows of 32 tokens
    rows = [{"id": "long", "question": "where is the king?", "context": long_context},
            {"id": "short", "question": "who?", "context": "the boy and the girl"},
            {"id": "long2", "question": "which bird?", "context": " ".join(reversed(WORDS * 2))}]
    dm = dm_for(tiny_bert, tmp_path, predict_file=str(write_jsonl(tmp_path / "p.jsonl", rows)), max_length=32,
                doc_stride=8, eval_batch_size=2)
    dm.setup("predict")
    assert max(dm.datasets["predict"]["idx"].count(i) for i in range(3)) > 2  # the case under test
    torch.manual_seed(0)
    module = QAModule(tiny_bert, max_length=32, doc_stride=8).eval()
    got = []
    with torch.inference_mode():
        for batch in dm.predict_dataloader():
            assert batch["inputs"]["input_ids"].shape[0] <= 2
            got += module.predict_step(batch, 0)
        expected = module.predict_raw(dm.tokenizer, [r["question"] for r in rows], [r["context"] for r in rows])
    assert sorted(r["idx"] for r in got) == [0, 1, 2]  # every question answered once
    for r in got:
        want = expected[r["idx"]]
        assert (r["id"], r["answer"], r["start"], r["end"]) == (rows[r["idx"]]["id"], want["answer"], want["start"], want["end"])
        assert r["score"] == pytest.approx(want["score"], abs=1e-5)


# ---- post-processing ------------------------------------------------------------------------------------------------

OFFSETS = [None, None, (0, 3), (4, 9), (10, 12), (13, 18), None]  # [CLS] q | four context tokens | [SEP]
START = [5.0, 4.0, 1.0, 3.0, 0.0, 2.0, 6.0]
END = [5.0, 4.0, 0.0, 1.5, 3.0, 2.0, 6.0]


def test_window_candidates_by_hand():
    # the 3 best starts and ends (tokens 6, 0, 1) all lie outside the context: nothing to offer
    assert window_candidates(START, END, OFFSETS, n_best=3) == []
    got = window_candidates(START, END, OFFSETS, n_best=20, max_answer_length=30)
    # best: start token 3 (3.0) + end token 4 (3.0) = 6.0 → chars 4..12; then 3+5 → 5.0, 5+5 → 4.0, 2+4 → 4.0 ...
    assert got[:2] == [(6.0, 4, 12), (5.0, 4, 18)]
    assert all(s <= e for _, s, e in got) and (5.0, 13, 12) not in got  # reversed 5→4 (2 + 3) is skipped
    assert len(got) == 10  # every ordered context pair (4 + 3 + 2 + 1)
    assert window_candidates(START, END, OFFSETS, max_answer_length=1)[0] == (4.5, 4, 9)  # one token: 3+1.5
    padded = window_candidates(START + [99.0], END + [99.0], OFFSETS)  # logits of padding are ignored
    assert padded[0] == (6.0, 4, 12)


def test_best_answer_merges_windows():
    context = "abc defgh ij klmno"
    a = [(6.0, 4, 12), (5.0, 4, 9)]
    b = [(7.0, 13, 18), (5.5, 4, 12)]  # (4, 12) again from an overlapping window: the higher score (6.0) stays
    got = best_answer(a + b, context)
    assert got["answer"] == "klmno" and (got["start"], got["end"]) == (13, 18)
    assert got["score"] == pytest.approx(1 / (1 + math.exp(-1) + math.exp(-2)))  # softmax over 7, 6, 5 = 0.6652
    assert best_answer([], context) == {"answer": "", "start": 0, "end": 0, "score": 0.0}


# ---- metric: the official SQuAD v1.1 rules, numbers worked out by hand -----------------------------------------------

GOLD = {  # id: gold answers (as in a SQuAD dev file)
    "q1": ["the Eiffel Tower"], "q2": ["Denver Broncos", "Broncos"], "q3": ["1858"], "q4": ["Saint Bernadette Soubirous"],
    "q5": ["a copper statue of Christ"], "q6": ["U.S."], "q7": ["cat dog dog"], "q8": ["The"], "q9": ["Lourdes"],
}
PREDICTIONS = {  # a prediction file (id: text); q9 is unanswered
    "q1": "Eiffel tower", "q2": "the Denver Broncos team", "q3": "in 1858.", "q4": "Mary", "q5": "copper statue, of Christ!",
    "q6": "US", "q7": "cat cat dog", "q8": "",
}
# Hand-worked with evaluate-v1.1.py's normalize_answer / exact_match_score / f1_score / metric_max_over_ground_truths:
# q1 "eiffel tower" == "eiffel tower"                                  EM 1  F1 1
# q2 "denver broncos team" vs "denver broncos": same 2, P 2/3, R 1 → .8; vs "broncos": P 1/3, R 1 → .5; max  EM 0  F1 .8
# q3 "in 1858" vs "1858": same 1, P 1/2, R 1                            EM 0  F1 2/3
# q4 "mary" vs "saint bernadette soubirous"                              EM 0  F1 0
# q5 "copper statue of christ" both (punctuation and "a" removed)       EM 1  F1 1
# q6 "us" == "us" (the dots are deleted, not replaced by spaces)        EM 1  F1 1
# q7 "cat cat dog" vs "cat dog dog": common {cat 1, dog 1} = 2, P 2/3, R 2/3  EM 0  F1 2/3
# q8 "" vs "the" → "": strings equal → EM 1; no common token → F1 0 (v1.1's `if num_same == 0: return 0`)
# q9 no prediction: counted in the total with 0                          EM 0  F1 0
HAND_EM = 100 * 4 / 9  # 44.444
HAND_F1 = 100 * (1 + 0.8 + 2 / 3 + 0 + 1 + 1 + 2 / 3 + 0 + 0) / 9  # 68.148


def test_official_squad_v1_metric_by_hand(tmp_path):
    dev = squad_json(tmp_path / "dev.json", [(f"context of {q}", [{"id": q, "question": "?", "answers": [
        {"text": g, "answer_start": 0} for g in golds]}]) for q, golds in GOLD.items()])
    preds_file = tmp_path / "predictions.json"
    preds_file.write_text(json.dumps(PREDICTIONS))
    refs = {qa["id"]: [a["text"] for a in qa["answers"]]
            for art in json.loads(Path(dev).read_text())["data"] for p in art["paragraphs"] for qa in p["qas"]}
    got = squad_scores(json.loads(preds_file.read_text()), refs)
    assert got["exact_match"] == pytest.approx(HAND_EM) and got["f1"] == pytest.approx(HAND_F1)


def test_metric_agrees_with_torchmetrics():
    from torchmetrics.text import SQuAD

    ids = ["q1", "q2", "q3", "q4", "q5", "q6", "q7"]  # q8: torchmetrics gives F1 1 when both sides are empty (v2 rule)
    tm = SQuAD()(
        [{"prediction_text": PREDICTIONS[i], "id": i} for i in ids],
        [{"answers": {"answer_start": [0] * len(GOLD[i]), "text": GOLD[i]}, "id": i} for i in ids],
    )
    ours = squad_scores({i: PREDICTIONS[i] for i in ids}, {i: GOLD[i] for i in ids})
    assert ours["exact_match"] == pytest.approx(float(tm["exact_match"]), abs=1e-4) == pytest.approx(100 * 3 / 7, abs=1e-4)
    assert ours["f1"] == pytest.approx(float(tm["f1"]), abs=1e-4) == pytest.approx(100 * (4.8 + 1 / 3) / 7, abs=1e-4)


# ---- bad input ------------------------------------------------------------------------------------------------------


def test_malformed_json_names_the_line(tiny_bert, tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"data": [\n{"title": "x",\n "paragraphs": [}\n]}')
    with pytest.raises(TaskheadError, match=r"bad.json:3: malformed JSON"):
        dm_for(tiny_bert, tmp_path, train_file=str(p)).data_facts


@pytest.mark.parametrize("qa, context, message", [
    ({"id": "q-wrong", "question": "?", "answers": [{"text": "blue", "answer_start": 2}]}, "red blue",
     r"question q-wrong: answer 0 'blue' is not at answer_start 2 \(found 'd bl'\); fix the file, or pass --data.fix_answer_offsets"),
    ({"id": "q-empty", "question": "?", "answers": [{"text": "x", "answer_start": 0}]}, "   ", r"question q-empty: empty context"),
    ({"id": "q-none", "question": "?", "answers": []}, "red blue", r"question q-none: no answers"),
])
def test_bad_records_name_the_question(tiny_bert, tmp_path, qa, context, message):
    train = squad_json(tmp_path / "t.json", [(context, [qa])])
    with pytest.raises(TaskheadError, match=message):
        dm_for(tiny_bert, tmp_path, train_file=train).data_facts


def test_fix_answer_offsets_takes_the_nearest_occurrence(tiny_bert, tmp_path, caplog):
    context = "blue sky, blue sea, blue eyes"  # "blue" at 0, 10, 20
    qas = [{"id": "a", "question": "?", "answers": [{"text": "blue", "answer_start": 12}]},
           {"id": "b", "question": "?", "answers": [{"text": "sea", "answer_start": 15}]}]
    train = squad_json(tmp_path / "t.json", [(context, qas)])
    with pytest.raises(TaskheadError, match="question a: answer 0 'blue' is not at answer_start 12"):
        dm_for(tiny_bert, tmp_path, train_file=train).data_facts
    dm = dm_for(tiny_bert, tmp_path, train_file=train, fix_answer_offsets=True)
    assert [r["answers"]["answer_start"] for r in parsed_rows(dm, "train")] == [[10], [15]]
    assert dm.offset_fixes["train"] == 1


def test_cli_bad_input_exits_2(tiny_bert, tmp_path, capsys):
    train = squad_json(tmp_path / "t.json", [("red blue", [{"id": "q7", "question": "?", "answers": [{"text": "blu", "answer_start": 0}]}])])
    with pytest.raises(SystemExit) as exc:
        main(["fit", *qa_args(tiny_bert, {"train": train}, tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "question q7: answer 0 'blu' is not at answer_start 0" in err and "Traceback" not in err


# ---- model and CLI --------------------------------------------------------------------------------------------------

NAMES = "anna boris carla dmitri elena felix greta hugo ivan julia".split()
CODES = "red blue green gold silver amber ivory olive".split()


def make_squad(path: Path, n: int, seed: int, prefix: str) -> str:
    """Questions whose answer follows 'the code of NAME is': contexts of 1-9 filler sentences (some need windows)."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        name, code = rng.choice(NAMES), rng.choice(CODES)
        sents = [" ".join(rng.choices(WORDS, k=rng.randint(4, 9))) + "." for _ in range(rng.randint(1, 9))]
        sents.insert(rng.randint(0, len(sents)), f"The code of {name} is {code}.")
        context = " ".join(sents)
        start = context.index(f"of {name} is {code}") + len(f"of {name} is ")
        paragraphs.append((context, [{"id": f"{prefix}{i}", "question": f"What is the code of {name}?",
                                      "answers": [{"text": code, "answer_start": start}]}]))
    return squad_json(path, paragraphs)


def qa_args(tiny_bert: str, files: dict[str, str], root: Path, *extra: str) -> list[str]:
    windows = ["--data.max_length", "48", "--data.doc_stride", "16", "--model.doc_stride", "16"]
    return cli_args(tiny_bert, files, root, *windows, *extra, config="squad.yaml")


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("squad")
    test = make_squad(d / "dev.json", 24, 2, "dev")
    paragraphs = json.loads(Path(test).read_text())["data"][0]["paragraphs"]
    rows = [{"question": "  " + p["qas"][0]["question"], "context": p["context"]} for p in paragraphs[:10]]
    return {"train": make_squad(d / "train.json", 96, 1, "tr"), "validation": test, "test": test,
            "predict": str(write_jsonl(d / "predict.jsonl", rows))}


@pytest.fixture(scope="module")
def fitted(tiny_bert, qa_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    args = qa_args(tiny_bert, qa_files, root, "--model.optimizer.lr", "3e-3", "--model.scheduler.warmup_ratio", "0.0",
                   "--trainer.max_epochs", "3", "--trainer.log_every_n_steps", "2")
    cli = run_cli(["fit", *args])
    return Path(cli.trainer.log_dir), cli.trainer.checkpoint_callback.best_model_path, args, cli


def test_fit_logs_official_metrics_and_loss_goes_down(fitted):
    run, best, _, cli = fitted
    m = cli.trainer.callback_metrics
    assert 0.0 <= float(m["val/exact_match"]) <= float(m["val/f1"]) <= 100.0 and "val/loss" in m
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run)).Reload()
    for tag in ("train/loss", "val/exact_match", "val/f1", "lr/head"):
        assert tag in acc.Tags()["scalars"], tag
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])  # chance level is ln(window length) ≈ 3.8
    assert Path(best).is_file()


def test_a_checkpoint_of_an_older_taskhead_still_tests(fitted, tmp_path):
    # before the one data→model link every task's hparams held label_names/label_counts, which QAModule no longer
    # takes: --ckpt_path alone must still rebuild the model and test it
    import torch

    _, best, args, _ = fitted
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"].update(label_names=None, label_counts=None)
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    cli = run_cli(["test", *args, "--ckpt_path", str(old)])
    assert "test/f1" in json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())


def test_test_and_predict_through_the_cli(fitted, qa_files):
    run, best, args, _ = fitted
    cli = run_cli(["test", *args, "--ckpt_path", best])
    out = Path(cli.trainer.log_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    preds = json.loads((out / "test_predictions.json").read_text())
    gold = {p["qas"][0]["id"]: [a["text"] for a in p["qas"][0]["answers"]]
            for p in json.loads(Path(qa_files["test"]).read_text())["data"][0]["paragraphs"]}
    assert set(preds) == set(gold)  # every question answered once, whatever batch its windows fell into
    rescored = squad_scores(preds, gold)  # the written predictions reproduce the logged numbers
    assert metrics["test/exact_match"] == pytest.approx(rescored["exact_match"]) and metrics["test/f1"] == pytest.approx(rescored["f1"])

    cli = run_cli(["predict", *args, "--ckpt_path", best])
    rows = [json.loads(line) for line in (Path(cli.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    inputs = [json.loads(line) for line in Path(qa_files["predict"]).read_text().splitlines()]
    assert len(rows) == len(inputs) == 10
    for r, x in zip(rows, inputs):
        assert x["context"][r["start"] : r["end"]] == r["answer"] and 0.0 <= r["score"] <= 1.0


def test_export_load_and_standard_hf_loading_agree(fitted, qa_files, tmp_path):
    run, best, args, _ = fitted
    cli = run_cli(["predict", *args, "--ckpt_path", best])
    rows = [json.loads(line) for line in (Path(cli.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    inputs = [json.loads(line) for line in Path(qa_files["predict"]).read_text().splitlines()]
    out = export_checkpoint(best, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and not (out / "head.safetensors").exists()
    predictor = taskhead.load(out, precision="32-true")
    got = predictor(question=[x["question"] for x in inputs], context=[x["context"] for x in inputs])
    assert [(g["answer"], g["start"], g["end"]) for g in got] == [(r["answer"], r["start"], r["end"]) for r in rows]
    assert [g["score"] for g in got] == pytest.approx([r["score"] for r in rows], abs=1e-4)

    # a short context (one window of under 20 tokens, so the n-best covers every pair): the best span is the argmax
    # of start + end logits over valid context pairs, which is what transformers' QA pipeline returns
    question, context = "What is the code of anna?", "The code of anna is gold."
    one = predictor(question=question, context=context)
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    from transformers.pipelines import REMOVED_TASKS

    if "question-answering" not in REMOVED_TASKS:  # transformers 4.x
        from transformers import pipeline

        p = pipeline("question-answering", model=str(out), device="cpu")(question=question, context=context, max_answer_len=30)
        assert (p["answer"], p["start"], p["end"]) == (one["answer"], one["start"], one["end"])
        return
    # transformers 5 removed the "question-answering" pipeline: check the standard Auto classes instead
    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForQuestionAnswering.from_pretrained(out).eval()
    enc = tok(question, context, return_offsets_mapping=True, return_tensors="pt")
    offsets, seq = enc.pop("offset_mapping")[0].tolist(), enc.sequence_ids(0)
    with torch.inference_mode():
        o = model(**enc)
    ctx = [i for i, s in enumerate(seq) if s == 1]
    s, e = max(((s, e) for s in ctx for e in ctx if s <= e), key=lambda p: float(o.start_logits[0, p[0]] + o.end_logits[0, p[1]]))
    assert (offsets[s][0], offsets[e][1]) == (one["start"], one["end"])


def test_custom_head_export_round_trip(tiny_bert, tmp_path):
    module = QAModule(tiny_bert, head={"hidden_sizes": [16], "layer_norm": True}, max_length=32, doc_stride=8)
    tok = load_tokenizer(tiny_bert)
    enc = tok(["who?"], ["a b c d"], return_tensors="pt")
    start, end = module(dict(enc))
    assert start.shape == end.shape == enc["input_ids"].shape
    assert set(module.head_state_dict()) == {"head.1.weight", "head.1.bias", "head.2.weight", "head.2.bias",
                                             "head.5.weight", "head.5.bias"}
    out = module.export(tmp_path / "export", tok)
    assert (out / "head.safetensors").is_file()
    long_context = " ".join(WORDS * 2)  # 80 words: several windows of 32 tokens
    module.eval()
    with torch.inference_mode():
        expected = module.predict_raw(tok, ["where is the king?", "who?"], [long_context, "the boy"])
    got = taskhead.load(out, precision="32-true")(question=["where is the king?", "who?"], context=[long_context, "the boy"])
    assert got == expected
    assert got[0]["answer"] == long_context[got[0]["start"] : got[0]["end"]]


@pytest.mark.slow
def test_ddp_test_equals_single_process(tiny_bert, qa_files, tmp_path):
    """Windows of one question sorted into batches on different ranks: the gathered n-best merge gives the same answers."""
    from conftest import run_taskhead

    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        root = tmp_path / f"d{devices}"
        args = qa_args(tiny_bert, {"test": qa_files["test"]}, root, "--trainer.devices", str(devices),
                       "--trainer.strategy", strategy, "--data.eval_batch_size", "4")
        proc = run_taskhead("test", *args, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = next(Path(root / "runs").rglob("metrics.json")).parent
        results[devices] = (json.loads((out / "metrics.json").read_text()), json.loads((out / "test_predictions.json").read_text()))
    (m1, p1), (m2, p2) = results[1], results[2]
    assert p1 == p2 and len(p1) == 24
    for key in ("test/exact_match", "test/f1"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-6), key
