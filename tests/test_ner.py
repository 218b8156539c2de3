"""NER end to end on a tiny model: CoNLL reading and IOB1 → IOB2, sub-token alignment, constrained Viterbi, the
seqeval metric against hand-worked and conlleval numbers, bad inputs, a short CLI fit/test/predict, export and the
round trip through taskhead.load and transformers.pipeline."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

import taskhead
from taskhead.cli import run_cli
from taskhead.core.export import export_checkpoint
from taskhead.errors import TaskheadError
from taskhead.tasks.ner import NerDataModule, NerModule
from taskhead.tasks.ner_tags import (
    align_labels,
    allowed_transitions,
    decode,
    first_subtokens,
    inside_map,
    ner_metrics,
    read_conll,
    split_words,
    to_entities,
    to_iob2,
    viterbi_decode,
    word_scores,
)

from conftest import ROOT, cli_args, run_taskhead, parsed_rows

FIXTURES = Path(__file__).parent / "fixtures" / "ner"
NAMES = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]

# ---- a tiny learnable corpus: the entity type is decided by the word itself ----------------------------------------
ENTITIES = {
    "PER": [["Angela", "Merkel"], ["Peter", "Blackburn"], ["Maria", "Garcia"], ["John"]],
    "LOC": [["Paris"], ["London"], ["Berlin"], ["New", "Zealand"]],
    "ORG": [["European", "Commission"], ["Reuters"], ["Acme", "Corporation"]],
}
FILLER = ["the", "visited", "said", "met", "in", "on", "with", "and", "today", "reported", "talks", "about", "."]


def make_conll(n: int, seed: int) -> str:
    """``n`` sentences in CoNLL-2003 layout (word POS chunk NER) with IOB1 tags and -DOCSTART- documents."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 20 == 0:
            out.append("-DOCSTART- -X- -X- O\n")
        prev_type = None
        for _ in range(rng.randint(3, 8)):
            if rng.random() < 0.35:
                typ = rng.choice(sorted(ENTITIES))
                for j, word in enumerate(rng.choice(ENTITIES[typ])):
                    prefix = "B" if j == 0 and prev_type == typ else "I"  # IOB1: B- only between adjacent same-type
                    out.append(f"{word} NNP I-NP {prefix}-{typ}")
                prev_type = typ
            else:
                out.append(f"{rng.choice(FILLER)} XX I-NP O")
                prev_type = None
        out.append("")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def ner_files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("conll")
    files = {}
    for split, n, seed in (("train", 160, 1), ("validation", 40, 2), ("test", 40, 3)):
        (d / f"{split}.conll").write_text(make_conll(n, seed))
        files[split] = str(d / f"{split}.conll")
    (d / "predict.txt").write_text("Angela Merkel visited Paris.\n\nthe European Commission met John in London today\n")
    files["predict"] = str(d / "predict.txt")
    return files


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared CPU: intra-op threads only contend (1.7 s vs 0.04 s a step with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ner_args(tiny_bert: str, files: dict[str, str], root: Path, *extra: str) -> list[str]:
    return cli_args(tiny_bert, files, root, "--data.tag_scheme", "iob1", *extra, config="conll2003.yaml")


def dm_for(tiny_bert, tmp_path, **kw) -> NerDataModule:
    return NerDataModule(model_name_or_path=tiny_bert, cache_dir=str(tmp_path / "cache"), **kw)


# ---- preprocessing --------------------------------------------------------------------------------------------------


def test_iob1_to_iob2():
    # IOB1: I- everywhere, B- only where two same-type entities touch
    assert to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG"]) == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG"]
    iob2 = ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]
    assert to_iob2(iob2) == iob2  # valid IOB2 is left alone
    assert to_iob2(["S-LOC", "B-ORG", "I-ORG", "E-ORG", "O", "E-PER"]) == ["B-LOC", "B-ORG", "I-ORG", "I-ORG", "O", "B-PER"]


def test_reads_conll_files_and_converts(tiny_bert, tmp_path):
    text = "-DOCSTART- -X- -X- O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\nGerman JJ I-NP I-MISC\n\n\nPeter NNP I-NP I-PER\nBlackburn NNP I-NP I-PER\n\n-DOCSTART- -X- -X- O\n\nParis NNP I-NP I-LOC\nLondon NNP I-NP B-LOC\n"
    path = tmp_path / "eng.mini"
    path.write_text(text)
    sents = list(read_conll(path))
    assert [w for w, _ in sents] == [f"{path}:3", f"{path}:8", f"{path}:13"]
    dm = dm_for(tiny_bert, tmp_path, train_file=str(path), tag_scheme="iob1")
    assert dm.label_names == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert [r["tokens"] for r in parsed_rows(dm, "train")] == [["EU", "rejects", "German"], ["Peter", "Blackburn"], ["Paris", "London"]]
    names = [[dm.label_names[t] for t in r["tags"]] for r in parsed_rows(dm, "train")]
    assert names == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"], ["B-LOC", "B-LOC"]]
    assert dm.converted["train"] == 4 and dm.label_counts == [1, 2, 0, 1, 0, 1, 0, 1, 1]
    # another tag column (the chunk tags here) and a label set with other types work unchanged
    dm = dm_for(tiny_bert, tmp_path, train_file=str(path), tag_scheme="iob1", tag_column=2)
    assert dm.label_names == ["O", "B-NP", "I-NP", "B-VP", "I-VP"]


def test_hub_sequence_classlabel(tiny_bert, tmp_path):
    """A Hub-style dataset whose tags are a Sequence(ClassLabel) (as eriktks/conll2003), from a local directory."""
    import datasets

    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    feats = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                               "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for split in ("train", "validation", "test"):
        ds = datasets.Dataset.from_dict({"tokens": [["Angela", "Merkel", "in", "Paris"]] * 3, "ner_tags": [[1, 2, 0, 3]] * 3}, features=feats)
        ds.to_parquet(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet")
    dm = dm_for(tiny_bert, tmp_path, dataset_name=str(tmp_path / "hub"))
    assert dm.label_names == names  # the Hub's order, not a sorted one
    assert parsed_rows(dm, "test")[0]["tags"] == [1, 2, 0, 3]


def test_alignment_first_subtoken(tiny_bert, tmp_path):
    # hand-written: [CLS] w0 w1 w1 w1 w2 [SEP]; tags B-PER I-PER O
    word_ids = [None, 0, 1, 1, 1, 2, None]
    tags = [3, 4, 0]
    assert align_labels(word_ids, tags) == [-100, 3, 4, -100, -100, 0, -100]
    assert align_labels(word_ids, [1, 3, 0], True, inside_map(NAMES)) == [-100, 1, 3, 4, 4, 0, -100]  # B-PER → I-PER inside
    assert first_subtokens(word_ids, 4) == [1, 2, 5, -1]  # word 3 was truncated away
    # through the DataModule: real tokenizer, a truncated sentence counted, collate pads labels with -100
    path = tmp_path / "t.conll"
    path.write_text("Merkel I-PER\nvisited O\nWellington I-LOC\n\nParis I-LOC\n\n")
    dm = dm_for(tiny_bert, tmp_path, train_file=str(path), validation_file=str(path), tag_scheme="iob1", max_length=5)
    dm.setup("fit")
    ds = dm.datasets["validation"]
    assert ds["words_cut"] == [1, 0]  # [CLS] mer ##kel visited [SEP]: "Wellington" is cut
    batch = dm.collate([ds[0], ds[1]])
    tok = dm.tokenizer.convert_ids_to_tokens(ds[0]["input_ids"])
    assert tok[1:3] == ["mer", "##kel"]
    assert batch["labels"].tolist() == [[-100, 3, -100, 0, -100], [-100, 1, -100, -100, -100]]
    assert batch["word_starts"].tolist() == [[1, 3, -1], [1, -1, -1]] and batch["n_words"].tolist() == [3, 1]
    assert batch["tags"][0] == [3, 0, 1]  # gold keeps every word: the cut LOC will count as missed


# ---- post-processing ------------------------------------------------------------------------------------------------


def test_viterbi_forbids_invalid_iob2():
    start, trans = allowed_transitions(NAMES)
    assert not start[NAMES.index("I-PER")] and start[NAMES.index("B-PER")]
    assert not trans[NAMES.index("O"), NAMES.index("I-LOC")] and not trans[NAMES.index("B-PER"), NAMES.index("I-LOC")]
    assert trans[NAMES.index("B-LOC"), NAMES.index("I-LOC")] and trans[NAMES.index("I-LOC"), NAMES.index("I-LOC")]
    # Hand-made log-probs for 3 words. Argmax reads O I-PER I-PER (invalid). Valid paths: B-PER I-PER I-PER scores
    # -1.6 -0.2 -0.3 = -2.1; O B-PER I-PER scores -0.3 -1.2 -0.3 = -1.8 (best); O O O scores -0.3 -2.0 -2.0 = -4.3.
    p = {"O": [-0.3, -2.0, -2.0], "B-LOC": [-5] * 3, "I-LOC": [-5] * 3, "B-PER": [-1.6, -1.2, -3.0], "I-PER": [-3.0, -0.2, -0.3]}
    scores = torch.tensor([[p[n][w] for n in NAMES] for w in range(3)]).unsqueeze(0)
    assert scores.argmax(-1).tolist() == [[0, 4, 4]]
    best = viterbi_decode(scores, torch.ones(1, 3, dtype=torch.bool), start, trans)
    assert [NAMES[i] for i in best[0]] == ["O", "B-PER", "I-PER"]
    # brute force over every valid path on random scores, with a shorter second sentence (mask)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 4, 5, generator=g).log_softmax(-1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    got = viterbi_decode(scores, mask, start, trans)
    for b, n in ((0, 4), (1, 2)):
        valid = [p for p in itertools.product(range(5), repeat=n)
                 if start[p[0]] and all(trans[a, c] for a, c in zip(p, p[1:]))]
        want = max(valid, key=lambda p: sum(float(scores[b, i, t]) for i, t in enumerate(p)))
        assert got[b, :n].tolist() == list(want)


def test_word_scores_use_first_subtoken_only():
    # [CLS] w0 w0' w1 [SEP] pad: the continuation sub-token w0' and the specials disagree; only w0, w1 count
    logits = torch.full((1, 6, 5), -5.0)
    logits[0, 1, NAMES.index("B-PER")] = 5.0
    logits[0, 2, NAMES.index("B-LOC")] = 9.0  # a continuation sub-token: ignored
    logits[0, 3, NAMES.index("I-PER")] = 5.0
    scores = word_scores(logits, torch.tensor([[1, 3, -1]]), o_id=0)
    ids, probs = decode(scores, torch.tensor([3]), "argmax", NAMES)
    assert [NAMES[i] for i in ids[0]] == ["B-PER", "I-PER", "O"]  # the word with no sub-token is predicted O
    assert probs[0][2] == pytest.approx(1.0) and 0.99 < probs[0][0] < 1.0


def test_entities_with_character_offsets():
    text = "Angela Merkel visited New Zealand, Reuters EU Acme Corp said."
    words, offsets = split_words(text)
    assert words[:4] == ["Angela", "Merkel", "visited", "New"] and offsets[3] == [22, 25]
    # conlleval grouping (seqeval's get_entities): a stray I-LOC after O opens an entity, I-ORG after I-LOC opens
    # another, B-ORG splits two adjacent ORGs; the entity text runs from its first word's start to its last word's end
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "O", "I-ORG", "B-ORG", "B-ORG", "I-ORG", "O", "O"]
    probs = [0.9, 0.7, 1.0, 0.6, 0.8, 1.0, 0.5, 0.4, 1.0, 0.8, 1.0, 1.0]
    got = [(e["type"], e["text"], e["start"], e["end"], round(e["score"], 6)) for e in to_entities(text, offsets, tags, probs)]
    assert got == [("PER", "Angela Merkel", 0, 13, 0.8), ("LOC", "New Zealand", 22, 33, 0.7), ("ORG", "Reuters", 35, 42, 0.5),
                   ("ORG", "EU", 43, 45, 0.4), ("ORG", "Acme Corp", 46, 55, 0.9)]
    assert to_entities(text, offsets, ["O"] * len(words), [1.0] * len(words)) == []


# ---- metric ---------------------------------------------------------------------------------------------------------


def test_metric_hand_worked():
    # gold: PER(0-1) LOC(3) | ORG(0-1)       pred: PER(0-1) LOC(3-4) | ORG(1) from a stray I-ORG (conlleval: starts one)
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "I-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["O", "I-ORG", "O"]]
    # correct: PER only → P = 1/3, R = 1/3, F1 = 1/3; LOC 0/1, ORG 0/1; words right: 6 of 8
    m = ner_metrics(gold, pred)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(1 / 3)
    assert m["f1/PER"] == 1.0 and m["f1/LOC"] == 0.0 and m["f1/ORG"] == 0.0 and m["accuracy"] == pytest.approx(6 / 8)


def test_metric_matches_conlleval_on_file():
    """tests/fixtures/ner/conlleval_small.txt (word gold pred). By hand, with conlleval's chunk rules:
    gold chunks 8 (PER 1, LOC 4 — "Britain France" are B B, two chunks —, ORG 2, MISC 1);
    guessed 7 (PER 2 — "Bonn" —, LOC 2 — "New" alone and "Britain France" as one —, ORG 2 — the stray I-ORG after O
    opens one —, MISC 1 — "German advice"); correct 3 (PER "Peter Blackburn", ORG "European Commission", ORG "EU").
    conlleval prints: processed 19 tokens with 8 phrases; found: 7 phrases; correct: 3.
    accuracy: 73.68%; precision: 42.86%; recall: 37.50%; FB1: 40.00
    LOC 0.00 / 0.00 / 0.00; MISC 0.00 / 0.00 / 0.00; ORG 100.00 / 100.00 / 100.00; PER 50.00 / 100.00 / 66.67"""
    sents = [r["rows"] for _, r in read_conll(FIXTURES / "conlleval_small.txt")]
    gold = [[row[1] for row in s] for s in sents]
    pred = [[row[2] for row in s] for s in sents]
    m = {k: round(100 * v, 2) for k, v in ner_metrics(gold, pred).items()}
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (73.68, 42.86, 37.50, 40.00)
    assert (m["precision/PER"], m["recall/PER"], m["f1/PER"]) == (50.00, 100.00, 66.67)
    assert m["f1/ORG"] == 100.00 and m["f1/LOC"] == 0.0 and m["f1/MISC"] == 0.0


# ---- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("EU NNP I-NP I-ORG\nrejects VBZ O\n", r"bad.conll:2: 3 columns, but the file's first line \(line 1\) has 4"),
        ("\nEU NNP I-NP I-ORG\nPeter NNP I-NP X-PER\n", r"bad.conll:3: tag 'X-PER' is not in the IOB1 scheme"),
        ("", r"bad.conll: no records \(empty file\)"),
        ("-DOCSTART- -X- -X- O\n\n", r"bad.conll: no records \(empty file\)"),
    ],
)
def test_bad_files_name_file_and_line(tiny_bert, tmp_path, text, message):
    path = tmp_path / "bad.conll"
    path.write_text(text)
    with pytest.raises(TaskheadError, match=message):
        dm_for(tiny_bert, tmp_path, train_file=str(path), tag_scheme="iob1").label_names


def test_test_type_unseen_in_training(tiny_bert, tmp_path):
    (tmp_path / "tr.conll").write_text("Paris I-LOC\n")
    (tmp_path / "te.conll").write_text("Paris I-LOC\n\nthe O\nPeter I-PER\n")
    dm = dm_for(tiny_bert, tmp_path, train_file=str(tmp_path / "tr.conll"), test_file=str(tmp_path / "te.conll"), tag_scheme="iob1")
    with pytest.raises(TaskheadError, match=r"te.conll:4: tag 'B-PER' is not in the training types"):
        dm.label_names


def test_checkpoint_label_order_must_match(tiny_bert):
    module = NerModule(tiny_bert, label_names=NAMES)
    module.on_load_checkpoint({"hyper_parameters": {"label_names": NAMES}})
    with pytest.raises(TaskheadError, match="trained with label_names"):
        module.on_load_checkpoint({"hyper_parameters": {"label_names": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}})


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # eval_step outside a Trainer: the loss metric is read here
def test_eval_loss_is_the_mean_over_every_counted_token(tiny_bert, tmp_path):
    """Two batches with very different tokens per sentence (one long sentence; three one-word ones): val/loss is the
    class-weighted token mean of the whole split, as if computed on all tokens at once, not a mean by sentences."""
    import torch.nn.functional as F

    long = "\n".join(f"{w} {'B-LOC' if i % 3 == 0 else 'O'}" for i, w in enumerate(["Paris", "the", "visited"] * 10))
    (tmp_path / "v.conll").write_text(long + "\n\nParis B-LOC\n\nthe O\n\nPeter B-PER\n")
    dm = dm_for(tiny_bert, tmp_path, validation_file=str(tmp_path / "v.conll"), label_names=NAMES)
    dm.setup("validate")
    rows = sorted((dm.datasets["validation"][i] for i in range(4)), key=lambda f: -len(f["tokens"]))
    batches = [dm.collate(rows[:1]), dm.collate(rows[1:])]
    weights = [1.0, 3.0, 0.5, 2.0, 1.5]
    module = NerModule(tiny_bert, label_names=NAMES, loss={"class_weights": weights}).eval()
    with torch.no_grad():
        for batch in batches:
            module.eval_step(batch, "val")
        logits = torch.cat([module(b["inputs"]).flatten(0, 1) for b in batches])
    labels = torch.cat([b["labels"].flatten() for b in batches])
    expected = F.cross_entropy(logits, labels, weight=torch.tensor(weights), ignore_index=-100)
    assert float(module.eval_loss["val"].compute()) == pytest.approx(float(expected), rel=1e-5)


def test_cli_bad_tag_exits_nonzero(tiny_bert, tmp_path):
    bad = tmp_path / "bad.conll"
    bad.write_text("EU NNP I-NP I-ORG\n\nPeter NNP I-NP X-PER\n")
    proc = run_taskhead("fit", *ner_args(tiny_bert, {"train": str(bad)}, tmp_path))
    assert proc.returncode == 2 and f"{bad}:3: tag 'X-PER'" in proc.stderr, proc.stderr[-2000:]


# ---- end to end -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tiny_bert, ner_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("nerfit")
    args = ner_args(tiny_bert, ner_files, root, "--model.optimizer.lr", "5e-3", "--model.scheduler.warmup_ratio", "0.0",
                    "--trainer.max_epochs", "8", "--trainer.log_every_n_steps", "5")
    cli = run_cli(["fit", *args])
    return cli, args


def test_fit_learns(fitted):
    cli, _ = fitted
    m = cli.trainer.callback_metrics
    assert float(m["val/f1"]) >= 0.9, {k: float(v) for k, v in m.items()}  # types are decided by the words themselves
    for key in ("val/precision", "val/recall", "val/f1/PER", "val/argmax/f1", "val/viterbi/f1", "val/loss"):
        assert key in m, key


def test_test_and_predict(fitted, ner_files):
    cli, args = fitted
    best = cli.trainer.checkpoint_callback.best_model_path
    test = run_cli(["test", *args, "--ckpt_path", best])
    out = Path(test.trainer.log_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/f1"] >= 0.9 and {"test/argmax/f1", "test/viterbi/f1", "test/f1/LOC"} <= set(metrics)
    report = json.loads((out / "ner_report.json").read_text())
    assert report["sentences"] == 40 and report["argmax"]["f1"] == pytest.approx(metrics["test/argmax/f1"])
    assert isinstance(json.loads((out / "test_errors.json").read_text()), list)

    pred = run_cli(["predict", *args, "--ckpt_path", best])
    rows = [json.loads(line) for line in (Path(pred.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["tokens"] == ["Angela", "Merkel", "visited", "Paris", "."]
    ents = [(e["type"], e["text"], e["start"], e["end"]) for e in rows[0]["entities"]]
    assert ents == [("PER", "Angela Merkel", 0, 13), ("LOC", "Paris", 22, 27)]


def test_export_load_and_pipeline_agree(fitted, tmp_path):
    cli, _ = fitted
    out = export_checkpoint(cli.trainer.checkpoint_callback.best_model_path, tmp_path / "export")
    predictor = taskhead.load(out, precision="32-true")
    texts = ["Angela Merkel visited Paris.", "The European Commission met John in London today.", "Reuters reported talks about Berlin"]
    loaded = predictor(texts)
    assert [(e["type"], e["text"]) for e in loaded[0]] == [("PER", "Angela Merkel"), ("LOC", "Paris")]
    one = predictor(texts[0])  # a single string gives its list of entities (unpadded: equal up to float rounding)
    assert [(e["type"], e["start"], e["end"]) for e in one] == [(e["type"], e["start"], e["end"]) for e in loaded[0]]
    assert [e["score"] for e in one] == pytest.approx([e["score"] for e in loaded[0]], abs=1e-5)

    from transformers import pipeline

    pipe = pipeline("token-classification", model=str(out), aggregation_strategy="first", device="cpu")
    for text, ours in zip(texts, loaded):
        theirs = pipe(text)
        assert [(e["entity_group"], e["start"], e["end"]) for e in theirs] == [(e["type"], e["start"], e["end"]) for e in ours]
        for a, b in zip(theirs, ours):
            assert float(a["score"]) == pytest.approx(b["score"], abs=1e-4)


def test_custom_head_viterbi_label_all_tokens(tiny_bert, ner_files, tmp_path):
    args = ner_args(tiny_bert, {"train": ner_files["train"], "validation": ner_files["validation"]}, tmp_path,
                    "--model.head", '{"hidden_sizes": [16], "dropout": 0.0}', "--model.decoding", "viterbi",
                    "--data.label_all_tokens", "true", "--model.loss.class_weights", "balanced",
                    "--trainer.limit_train_batches", "3", "--trainer.max_epochs", "1")
    cli = run_cli(["fit", *args])
    module = cli.model
    assert module.head is not None and module.decoding == "viterbi" and module.class_weight is not None
    assert "val/viterbi/f1" in cli.trainer.callback_metrics
    out = export_checkpoint(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", tmp_path / "export")
    assert (out / "head.safetensors").is_file()
    texts = ["Angela Merkel visited Paris.", "nothing here"]
    module.eval()
    with torch.inference_mode():
        expected = module.predict_raw(taskhead.load(out, precision="32-true").tokenizer, texts)
    assert taskhead.load(out, precision="32-true")(texts) == expected
    assert taskhead.load(out, precision="32-true")("") == []


def test_configs_parse():
    for extra in ([], ["--config", str(ROOT / "configs/offline/conll2003.yaml")]):
        with pytest.raises(SystemExit) as e:
            run_cli(["fit", "--config", str(ROOT / "configs/conll2003.yaml"), *extra, "--print_config"])
        assert e.value.code == 0


@pytest.mark.slow
def test_ddp_validation_equals_single_process(tiny_bert, ner_files, tmp_path):
    """2 CPU processes (gloo): the word-level tag sequences gathered from both ranks score exactly as one process."""
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        root = tmp_path / f"d{devices}"
        args = ner_args(tiny_bert, {"train": ner_files["train"], "validation": ner_files["test"]}, root,
                        "--trainer.devices", str(devices), "--trainer.strategy", strategy, "--data.eval_batch_size", "6")
        proc = run_taskhead("validate", *args, timeout=300)  # a collective called by rank 0 alone hangs: fail instead
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads(next(Path(root / "runs").rglob("metrics.json")).read_text())
    assert "val/f1" in results[1] and "val/viterbi/f1" in results[1] and "val/loss" in results[1]
    for key in results[1]:  # the loss too: a token-weighted mean synced once, not a mean of per-rank means
        assert results[2][key] == pytest.approx(results[1][key], abs=1e-9 if key != "val/loss" else 1e-6), key
