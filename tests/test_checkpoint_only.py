"""test / predict / export of a full fine-tune need only its checkpoint: the checkpoint holds the model's config and
tokenizer files (TaskModule.source_files), the module is built from them (no pretrained weights read, no "newly
initialised" report) and the checkpoint's weights are loaded once. A LoRA checkpoint holds only adapters: it needs
its base model, by design."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import taskhead
from taskhead.cli import run_cli
from taskhead.core.export import export_checkpoint

from conftest import cli_args, run_taskhead
from test_seq2seq import cli, pair_files, tiny_llama  # noqa: F401 (the seq2seq suite's fixtures: a Llama with an LM head)

TEXTS = ["a wonderful superb film", "dull and awful plot", "the story was quite moving"]


@pytest.mark.parametrize("head", [None, "{pooling: mean, hidden_sizes: [8]}"])
def test_export_test_and_predict_without_the_base_model(tiny_bert, review_files, tmp_path, head):
    base = tmp_path / "base-model"  # model_name_or_path: a local directory that is gone after the fit
    shutil.copytree(tiny_bert, base)
    extra = ["--model.head", head] if head else []
    args = cli_args(str(base), {"train": review_files["train"]}, tmp_path, "--trainer.max_steps", "3", *extra)
    cli = run_cli(["fit", *args])
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    before = export_checkpoint(ckpt, tmp_path / "export-before")

    shutil.rmtree(base)
    after = export_checkpoint(ckpt, tmp_path / "export-after")
    for name in ("model.safetensors", *(["head.safetensors"] if head else [])):
        a, b = load_file(before / name), load_file(after / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((before / "config.json").read_text()) == json.loads((after / "config.json").read_text())
    expected = taskhead.load(before, precision="32-true")(TEXTS)
    assert taskhead.load(after, precision="32-true")(TEXTS) == expected

    proc = run_taskhead("test", "--ckpt_path", str(ckpt), "--data.test_file", review_files["test"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "newly initialised" not in proc.stderr + proc.stdout
    assert "test/acc" in json.loads(next(Path(cli.trainer.log_dir).glob("metrics*.json")).read_text())

    predict = tmp_path / "texts.jsonl"
    predict.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    run_cli(["predict", "--ckpt_path", str(ckpt), "--data.predict_file", str(predict)])
    rows = [json.loads(line) for line in next(Path(cli.trainer.log_dir).glob("predictions*.jsonl")).read_text().splitlines()]
    assert [r["label"] for r in rows] == [e["label"] for e in expected]
    assert [r["score"] for r in rows] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["taskhead"]["source"]
    assert stored["model_name_or_path"] == str(base) and {"config.json", "tokenizer.json"} <= stored["files"].keys()


def test_a_model_built_for_a_checkpoint_reads_no_pretrained_weights(tiny_bert, review_files, tmp_path, monkeypatch):
    """Inside ``checkpoint_source`` the backbone is built from the stored config: ``from_pretrained`` is never called
    for the model, so its weights are read once (from the checkpoint), and a deleted base directory does not matter."""
    from transformers import PreTrainedModel

    from taskhead.core.export import checkpoint_source
    from taskhead.tasks.classification import ClassificationModule

    cli = run_cli(["fit", *cli_args(tiny_bert, {"train": review_files["train"]}, tmp_path, "--trainer.max_steps", "1")])
    ckpt = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    real = PreTrainedModel.from_pretrained.__func__
    calls = []
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: calls.append(a) or real(cls, *a, **k)))
    with checkpoint_source(ckpt):
        module = ClassificationModule(**{k: v for k, v in ckpt["hyper_parameters"].items() if k != "_class_path"})
    assert calls == []
    module.load_state_dict(ckpt["state_dict"])
    for name, value in cli.model.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name


@pytest.mark.parametrize("arch", ["encoder_decoder", "causal"])
def test_seq2seq_export_and_test_without_the_base_model(arch, request, pair_files, tmp_path):
    """Seq2seq builds its own generator (tasks/seq2seq_models.py) through the same loaders: BERT2BERT (stored as an
    EncoderDecoderModel config) and a decoder-only model with its generation config."""
    source = request.getfixturevalue({"encoder_decoder": "tiny_bert", "causal": "tiny_llama"}[arch])
    base = tmp_path / "base-model"
    shutil.copytree(source, base)
    fit = run_cli(["fit", *cli(str(base), arch, {"train": pair_files["train"]}, tmp_path)])
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    before = export_checkpoint(ckpt, tmp_path / "export-before")
    docs = [json.loads(line)["document"] for line in Path(pair_files["predict"]).read_text().splitlines()]
    expected = taskhead.load(before, precision="32-true")(docs)

    shutil.rmtree(base)
    after = export_checkpoint(ckpt, tmp_path / "export-after")
    assert taskhead.load(after, precision="32-true")(docs) == expected
    assert json.loads((after / "generation_config.json").read_text()) == json.loads((before / "generation_config.json").read_text())
    proc = run_taskhead("test", "--ckpt_path", str(ckpt), "--data.test_file", pair_files["test"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "newly initialised" not in proc.stderr + proc.stdout


def test_hparams_of_an_older_taskhead_still_build_their_task():
    # checkpoints and exports written before the one data→model link carry label_names/label_counts for every task
    from taskhead.tasks.multiple_choice import MultipleChoiceModule
    from taskhead.tasks.qa import QAModule
    from taskhead.tasks.seq2seq import Seq2SeqModule

    old = {"model_name_or_path": "m", "label_names": None, "label_counts": [3, 4], "optimizer": {"lr": 1e-4},
           "max_length": 128, "peft": None}
    for cls in (QAModule, Seq2SeqModule, MultipleChoiceModule):
        assert cls.known_hparams(old) == {"model_name_or_path": "m", "optimizer": {"lr": 1e-4}, "max_length": 128,
                                          "peft": None}
    from taskhead.tasks.classification import ClassificationModule

    assert ClassificationModule.known_hparams(old) == old  # it takes both
