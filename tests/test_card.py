"""Model cards and Hub push: a short real fit → export → ``huggingface_hub.ModelCard`` parses the README and its
numbers equal the checkpoint's and metrics.json's; the card logic by hand on plain dicts; the push up to the network
call (HfApi replaced), and the offline error before any work."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from taskhead.cli import run_cli
from taskhead.core.card import render_card, task_kind
from taskhead.core.run_facts import base_card_metadata, find_test_metrics, is_hub_id
from taskhead.core.export import export_checkpoint, push_to_hub
from taskhead.errors import TaskheadError

from conftest import MINILM, cli_args


@pytest.fixture(scope="module")
def run(tiny_bert, review_files, tmp_path_factory):
    """fit (2 epochs of 2 steps, each validated) then test on the best checkpoint: (fit run dir, best ckpt, metrics.json)."""
    root = tmp_path_factory.mktemp("card")
    args = cli_args(tiny_bert, {"train": review_files["train"], "test": review_files["test"]}, root,
                    "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "2")
    fit = run_cli(["fit", *args])
    best = Path(fit.trainer.checkpoint_callback.best_model_path)
    test = run_cli(["test", *args, "--ckpt_path", str(best)])
    return Path(fit.trainer.log_dir), best, Path(test.trainer.log_dir) / "metrics.json"


def load_card(out: Path) -> ModelCard:
    card = ModelCard.load(out / "README.md")
    front = (out / "README.md").read_text().split("---\n")[1]
    assert yaml.safe_load(front) == yaml.safe_load(card.data.to_yaml())  # what was written is what parses back
    return card


def by_name(card: ModelCard) -> dict[str, tuple[str, float]]:
    return {r.metric_name: (r.dataset_split, r.metric_value) for r in card.data.eval_results or []}


def test_export_card_parses_with_the_runs_numbers(run, review_files, tmp_path):
    fit_dir, best, metrics_file = run
    out = export_checkpoint(best, tmp_path / "tiny-imdb")
    card = load_card(out)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert "taskhead" in data.tags and data.base_model is None  # a local directory is no Hub base_model
    # the best checkpoint is weights-only; the ModelCheckpoint's own record of its score is in last.ckpt
    last = torch.load(Path(best).parent / "last.ckpt", weights_only=True)
    state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    metrics = json.loads(metrics_file.read_text())
    results = by_name(card)
    assert results["val/acc"] == ("validation", float(state["best_k_models"][str(best)]))
    for key in ("test/acc", "test/f1_macro", "test/loss"):
        assert results[key] == ("test", metrics[key])
    assert "test/f1/pos" not in results and "| `test/f1/pos` |" in card.text  # per-label: in the text only
    train_sha = hashlib.sha256(Path(review_files["train"]).read_bytes()).hexdigest()
    assert f"| train | `train.jsonl` | `{train_sha}` |" in card.text
    assert "`neg`, `pos`" in card.text and "taskhead.load(" in card.text and 'pipeline("text-classification"' in card.text
    assert (fit_dir / "config.yaml").read_text().strip() in card.text
    assert "license could not be read" in card.text


def test_last_checkpoint_claims_neither_its_score_nor_anothers_test(run, tmp_path):
    """last.ckpt's own validation score is not recorded, and the test run scored best-*.ckpt: neither goes in."""
    fit_dir, _, _ = run
    card = load_card(export_checkpoint(fit_dir / "checkpoints" / "last.ckpt", tmp_path / "last"))
    assert card.data.eval_results is None
    assert "own validation score was not recorded" in card.text and "No test metrics were found" in card.text


def test_checkpoint_without_run_directory(run, tmp_path):
    _, best, _ = run
    lone = tmp_path / "model.ckpt"
    shutil.copy(best, lone)
    card = load_card(export_checkpoint(lone, tmp_path / "out"))
    assert "sha256 of the data files: unknown" in card.text and "No `config.yaml` beside the checkpoint" in card.text
    assert "train.jsonl" in card.text and "label_names:" in card.text  # from the checkpoint's own hyper-parameters
    # a best checkpoint carries its own validation scores (saved right after its validation), wherever it is copied
    assert card.data.pipeline_tag == "text-classification"
    assert by_name(card)["val/acc"] == ("validation", float(best.stem.rsplit("=", 1)[1])) and "test/acc" not in by_name(card)


# ---- the card from hand-written facts ---------------------------------------------------------------------------------

FACTS = {
    "task": "taskhead.tasks.classification.ClassificationModule",
    "source": "distilbert-base-uncased",
    "base_model": "distilbert-base-uncased",
    "base": {"license": "apache-2.0"},
    "hparams": {"label_names": ["neg", "pos"], "head": None, "max_length": 512},
    "data": {"dataset_name": "stanfordnlp/imdb", "val_split": 0.1, "seed": 42},
    "checkpoint": {"name": "best-1.ckpt", "epoch": 1, "global_step": 100},
    "manifest": None,
    "config_yaml": "seed_everything: 42\n",
    "validation": {"monitor": "val/acc", "value": 0.875, "mode": "max", "own": True, "best": "best-1.ckpt"},
    "test_metrics": {"test/acc": 0.8125, "test/f1/pos": 0.8},
    "test_metrics_file": "runs/imdb/version_1/metrics.json",
}


def test_card_from_facts_hub_base():
    card = ModelCard(render_card(FACTS, "imdb-distilbert", "out", repo_id="me/imdb-distilbert"))
    d = card.data
    assert (d.base_model, d.license, d.datasets, d.pipeline_tag) == ("distilbert-base-uncased", "apache-2.0", ["stanfordnlp/imdb"], "text-classification")
    assert by_name(card) == {"val/acc": ("validation", 0.875), "test/acc": ("test", 0.8125)}
    assert {r.dataset_type for r in d.eval_results} == {"stanfordnlp/imdb"} and d.model_name == "imdb-distilbert"
    assert 'snapshot_download("me/imdb-distilbert")' in card.text and "license could not be read" not in card.text


@pytest.mark.parametrize(
    "task, hparams, expected",
    [
        ("classification.ClassificationModule", {"head": {"pooling": "mean"}}, ("text-classification", None)),
        ("ner.NerModule", {"head": None}, ("token-classification", "token-classification")),
        ("qa.QAModule", {"head": None}, ("question-answering", "question-answering")),
        ("multiple_choice.MultipleChoiceModule", {"head": None}, ("multiple-choice", None)),
        ("seq2seq.Seq2SeqModule", {"metric": "rouge", "architecture": "seq2seq"}, ("summarization", "summarization")),
        ("seq2seq.Seq2SeqModule", {"metric": "bleu", "architecture": "causal"}, ("translation", "text-generation")),
    ],
)
def test_pipeline_tag_only_where_transformers_loads_the_head(task, hparams, expected):
    facts = {**FACTS, "task": f"taskhead.tasks.{task}", "hparams": hparams}
    kind, _, pipeline = task_kind(facts)
    assert (kind, pipeline) == expected
    card = ModelCard(render_card(facts, "m", "out"))
    assert card.data.pipeline_tag == expected[1] and expected[0] in card.data.tags
    assert ("custom-head" in card.data.tags) == (hparams.get("head") is not None)


def test_base_license_from_the_base_models_own_card(tmp_path, tiny_bert):
    (tmp_path / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# a base\n")
    assert base_card_metadata(str(tmp_path)) == {"license": "mit"}
    assert base_card_metadata(tiny_bert) == {}  # no card: no license, never a guess
    assert base_card_metadata(MINILM) == {"license": "apache-2.0"}  # the packaged model's real card
    assert base_card_metadata("no-such-org/no-such-model") == {}  # offline, not cached
    assert is_hub_id("distilbert-base-uncased") and is_hub_id("Helsinki-NLP/opus-mt-en-ro")
    assert not is_hub_id(tiny_bert) and not is_hub_id(MINILM) and not is_hub_id("./model")


def test_test_metrics_only_from_runs_that_tested_this_checkpoint(tmp_path):
    ckpt = tmp_path / "version_0" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    run = ckpt.parent.parent

    def tested(name: str, ckpt_path: Path | None, metrics: dict) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"stage": "test", "config": yaml.safe_dump({"ckpt_path": str(ckpt_path)})}))
        (d / "metrics.json").write_text(json.dumps(metrics))
        return d / "metrics.json"

    assert find_test_metrics(ckpt, run) == ({}, None)
    tested("version_1", tmp_path / "other.ckpt", {"test/acc": 0.1})  # another checkpoint's test
    ours = tested("version_2", ckpt, {"test/acc": 0.7, "val/acc": 0.9})
    assert find_test_metrics(ckpt, run) == ({"test/acc": 0.7}, ours)
    os.utime(ours, (ckpt.stat().st_mtime - 60,) * 2)  # scored before the checkpoint was overwritten: stale
    assert find_test_metrics(ckpt, run) == ({}, None)


# ---- push ------------------------------------------------------------------------------------------------------------


class FakeHfApi:
    """Records what would go to the Hub; ``files`` is the folder's content at upload time."""

    calls: list = []
    existing: SimpleNamespace | None = None
    whoami_error: Exception | None = None

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def whoami(self):
        if self.whoami_error:
            raise self.whoami_error
        return {"name": "me"}

    def repo_info(self, repo_id):
        if self.existing is None:
            from huggingface_hub.errors import RepositoryNotFoundError

            err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response
            Exception.__init__(err, f"404 {repo_id}")
            raise err
        return self.existing

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, commit_message=None):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, folder_path, files, commit_message))


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    return FakeHfApi


@pytest.mark.parametrize("private", [False, True])
def test_push_uploads_the_export_with_its_card(run, tmp_path, online, private):
    _, best, _ = run
    out = export_checkpoint(best, tmp_path / "out", push_to_hub="me/tiny-imdb", private=private)
    create = [c for c in online.calls if c[0] == "create_repo"]
    upload = [c for c in online.calls if c[0] == "upload_folder"]
    assert create == [("create_repo", "me/tiny-imdb", private, True)]
    assert len(upload) == 1 and upload[0][2] == str(out) and ("init", "hf_fake") in online.calls
    assert {"README.md", "model.safetensors", "taskhead.json", "config.json", "tokenizer.json"} <= set(upload[0][3])
    card = load_card(out)
    assert card.data.model_name == "tiny-imdb" and 'snapshot_download("me/tiny-imdb")' in card.text


def test_private_push_refuses_an_existing_public_repo(run, tmp_path, online, monkeypatch):
    _, best, _ = run
    monkeypatch.setattr(FakeHfApi, "existing", SimpleNamespace(private=False))
    with pytest.raises(TaskheadError, match="exists and is public"):
        export_checkpoint(best, tmp_path / "out", push_to_hub="me/tiny-imdb", private=True)
    assert not (tmp_path / "out").exists()


def test_offline_push_fails_before_any_work(run, tmp_path, monkeypatch):
    _, best, _ = run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskheadError, match=r"push to the Hub \(me/x\): the Hub is switched off here \(HF_HUB_OFFLINE"):
        export_checkpoint(best, tmp_path / "out", push_to_hub="me/x")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "repo_id, setup, message",
    [
        ("not a repo", None, "not a valid model repo id"),
        ("me/x", "no_token", "no Hugging Face token"),
        ("me/x", "no_network", r"cannot reach https://huggingface.co \(ConnectionError: Network is unreachable\)"),
        ("me/x", "bad_token", r"token was rejected \(401\)"),
    ],
    ids=["bad-id", "no-token", "no-network", "bad-token"],
)
def test_push_preflight_errors_before_any_work(run, tmp_path, online, monkeypatch, repo_id, setup, message):
    import huggingface_hub

    _, best, _ = run
    if setup == "no_token":
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    if setup == "no_network":
        monkeypatch.setattr(FakeHfApi, "whoami_error", ConnectionError("Network is unreachable"))
    if setup == "bad_token":
        error = OSError("Invalid user token.")
        error.response = SimpleNamespace(status_code=401)  # as huggingface_hub's HfHubHTTPError carries it
        monkeypatch.setattr(FakeHfApi, "whoami_error", error)
    with pytest.raises(TaskheadError, match=message):
        export_checkpoint(best, tmp_path / "out", push_to_hub=repo_id)
    assert not (tmp_path / "out").exists() and not [c for c in online.calls if c[0] != "init"]


def test_push_an_existing_export(run, tmp_path, online):
    _, best, _ = run
    with pytest.raises(TaskheadError, match="not a taskhead export"):
        push_to_hub(tmp_path, "me/x")
    out = export_checkpoint(best, tmp_path / "out")
    assert push_to_hub(out, "me/x") == "https://huggingface.co/me/x"
    assert [c[0] for c in online.calls if c[0] != "init"] == ["create_repo", "upload_folder"]


# ---- a second task: NER ------------------------------------------------------------------------------------------------


def conll(n: int) -> str:
    """``n`` IOB2 sentences in CoNLL layout (word POS chunk NER), entities decided by the words themselves."""
    rows = [("Angela", "B-PER"), ("Merkel", "I-PER"), ("visited", "O"), ("Paris", "B-LOC"), ("today", "O")]
    return "".join("\n".join(f"{w} NNP I-NP {t}" for w, t in rows[i % 2 :]) + "\n\n" for i in range(n))


def test_ner_export_card(tiny_bert, tmp_path):
    files = {}
    for split, n in (("train", 32), ("validation", 8), ("test", 8)):
        files[split] = str(tmp_path / f"{split}.conll")
        Path(files[split]).write_text(conll(n))
    args = cli_args(tiny_bert, files, tmp_path, "--trainer.limit_train_batches", "1", "--trainer.max_epochs", "1",
                    config="conll2003.yaml")
    best = Path(run_cli(["fit", *args]).trainer.checkpoint_callback.best_model_path)
    metrics_dir = Path(run_cli(["test", *args, "--ckpt_path", str(best)]).trainer.log_dir)
    card = load_card(export_checkpoint(best, tmp_path / "ner-export"))
    assert card.data.pipeline_tag == "token-classification" and "token-classification" in card.data.tags
    # the best checkpoint is weights-only; the ModelCheckpoint's own record of its score is in last.ckpt
    last = torch.load(Path(best).parent / "last.ckpt", weights_only=True)
    state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    metrics = json.loads((metrics_dir / "metrics.json").read_text())
    results = by_name(card)
    scores = {Path(k).name: float(v) for k, v in state["best_k_models"].items()}
    assert results["val/f1"] == ("validation", scores[best.name]), scores
    assert results["test/f1"] == ("test", metrics["test/f1"]) and "test/argmax/f1" not in results
    assert "`B-PER`, `I-PER`" in card.text and 'aggregation_strategy="first"' in card.text


@pytest.mark.parametrize("problem_type, shown", [("single_label", '"probabilities"'), ("multi_label", '"labels"'),
                                                 ("regression", '[{"score"}]')])
def test_usage_example_follows_the_problem_type(problem_type, shown):
    facts = {"task": "taskhead.tasks.classification.ClassificationModule", "source": "x",
             "hparams": {"problem_type": problem_type, "head": None}}
    assert shown in render_card(facts, "m", "out")
