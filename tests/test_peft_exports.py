"""LoRA through the command line and the exports: checkpoints that hold only the trained weights (and resume
exactly), merged and adapter exports that agree with each other, with transformers.pipeline and with plain peft."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

import taskhead  # noqa: E402
from taskhead.core.pretrained import load_tokenizer  # noqa: E402
from taskhead.errors import TaskheadError  # noqa: E402
from taskhead.tasks.classification import ClassificationModule  # noqa: E402

from conftest import ROOT, cli_args, run_taskhead  # noqa: E402
from test_peft import LORA, encode, lora_modules  # noqa: E402
from taskhead.core.peft import unwrap  # noqa: E402


# ---- the CLI: fit, test, checkpoints, exports --------------------------------------------------------------------------


def predictions(path: str, texts: list[str]) -> list[list[float]]:
    return [[r["probabilities"][k] for k in ("neg", "pos")] for r in taskhead.load(path, precision="32-true")(texts)]


def test_lora_fit_test_export_merged_and_adapter_agree(tiny_llama, review_files, tmp_path):
    """A decoder-only classifier with LoRA through the CLI. Its checkpoints hold only the adapters and the head (and
    their optimiser state); the merged export loads in transformers.pipeline with its pad id; the adapter export loads
    in taskhead.load and in plain peft on a fresh base with the trained head (peft #310: a head left out of
    modules_to_save comes back random). All four give the same probabilities."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from taskhead.core.export import export_checkpoint

    files = {"train": review_files["train"], "test": review_files["test"]}
    args = cli_args(tiny_llama, files, tmp_path, "--config", LORA, "--trainer.max_epochs", "3", "--model.optimizer.lr", "3e-3")
    proc = run_taskhead("fit", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line, = [x for x in proc.stderr.splitlines() if "trainable params:" in x]
    assert " of " in line and "%" in line and "(LoRA)" in line
    last, = (tmp_path / "runs").rglob("last.ckpt")
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all(".lora_" in k or ".score.modules_to_save." in k for k in keys)
    assert len(ckpt["optimizer_states"][0]["state"]) == len(keys)  # Adam moments for the trained weights only
    assert ckpt["taskhead"]["base_model"]["model_name_or_path"] == tiny_llama
    best, = (tmp_path / "runs").rglob("best-*.ckpt")
    proc = run_taskhead("test", "--ckpt_path", str(best))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((best.parent.parent / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.6  # it learned: the comparisons below can fail

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    export_checkpoint(best, merged)
    export_checkpoint(best, adapter, merge=False)
    assert json.loads((merged / "config.json").read_text())["pad_token_id"] == load_tokenizer(tiny_llama).pad_token_id
    assert not (merged / "adapter_config.json").exists()
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    assert any(".score.modules_to_save." in k or k.endswith("score.weight") for k in load_file(adapter / "adapter_model.safetensors"))
    assert "merged into the weights" in (merged / "README.md").read_text()
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "this directory is the adapter" in card

    texts = ["the film was great and moving", "awful boring plot", "really quite dull", "superb"]
    via_merged, via_adapter = predictions(str(merged), texts), predictions(str(adapter), texts)
    pipe = pipeline("text-classification", model=str(merged), top_k=None)
    via_pipeline = [[next(s["score"] for s in row if s["label"] == k) for k in ("neg", "pos")] for row in pipe(texts)]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2, pad_token_id=0)
    plain = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        via_peft = plain(**AutoTokenizer.from_pretrained(adapter)(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    for other in (via_adapter, via_pipeline, via_peft.tolist()):
        torch.testing.assert_close(torch.tensor(other), torch.tensor(via_merged), rtol=1e-4, atol=1e-5)
    assert max(abs(a - b) for a, b in via_merged) > 0.05  # not a constant: the head was trained and kept


def test_a_lora_checkpoint_refuses_other_base_weights(tiny_llama, tmp_path):
    m = ClassificationModule(tiny_llama, label_names=["neg", "pos"], peft={"r": 2})
    checkpoint = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(checkpoint)
    assert all("lora_" in k or ".modules_to_save." in k for k in checkpoint["state_dict"])
    other = {"state_dict": dict(checkpoint["state_dict"]), "taskhead": dict(checkpoint["taskhead"])}
    other["taskhead"]["base_model"] = {**other["taskhead"]["base_model"], "fingerprint": "0" * 16}
    with pytest.raises(TaskheadError, match="other base weights"):
        ClassificationModule(tiny_llama, label_names=["neg", "pos"], peft={"r": 2}).on_load_checkpoint(other)
    with pytest.raises(TaskheadError, match="model.peft is null"):
        ClassificationModule(tiny_llama, label_names=["neg", "pos"]).on_load_checkpoint(checkpoint)
    fresh = ClassificationModule(tiny_llama, label_names=["neg", "pos"], peft={"r": 2})
    fresh.on_load_checkpoint(checkpoint)  # the base weights are filled in: a strict load succeeds
    fresh.load_state_dict(checkpoint["state_dict"])


def test_lora_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tiny_llama, review_files, tmp_path):
    """tests/test_faults.py's exact-resume test, under LoRA: the checkpoint lacks the frozen base (filled in from
    model_name_or_path on load), LoRA dropout draws continue from the saved RNG, and the adapters' Adam state resumes."""
    import os
    import signal

    files = {"train": review_files["train"]}  # 173 training examples → 11 batches of 16 per epoch
    fast = ("--config", LORA, "--last_checkpoint.every_n_steps", "3", "--model.optimizer.lr", "3e-3",
            "--model.scheduler.warmup_ratio", "0", "--trainer.max_epochs", "4")
    env_path = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}

    def last_checkpoint(root):
        path, = (root / "runs").rglob("last.ckpt")
        return torch.load(path, map_location="cpu", weights_only=True)

    def final_val_acc(ckpt):
        state, = (v for k, v in ckpt["callbacks"].items() if "'monitor': 'val/acc'" in k)
        return float(state["current_score"])

    straight = tmp_path / "straight"
    proc = run_taskhead("fit", *cli_args(tiny_llama, files, straight, *fast))
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    args = cli_args(tiny_llama, files, killed, *fast)
    kill = '{"class_path": "test_faults.KillAtStep", "init_args": {"step": 16}}'
    proc = run_taskhead("fit", *args, f"--trainer.callbacks+={kill}", env=env_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert last_checkpoint(killed)["global_step"] == 15
    proc = run_taskhead("fit", *args, "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, reference = last_checkpoint(killed), last_checkpoint(straight)

    assert resumed["global_step"] == reference["global_step"] == 44
    assert all("lora_" in k or ".modules_to_save." in k for k in reference["state_dict"])  # adapters + head only
    assert final_val_acc(reference) > 0.6  # it learned something, so the comparison can fail
    assert final_val_acc(resumed) == pytest.approx(final_val_acc(reference), abs=1e-3)
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_custom_head_with_lora_exports_merged_and_adapter_alike(tiny_llama, tmp_path):
    """A custom head lives outside the HF model: it trains in full and is exported as head.safetensors beside both
    the merged model and the adapter."""
    m = ClassificationModule(tiny_llama, label_names=["neg", "pos"], head={"hidden_sizes": [8]}, peft={"r": 2})
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero (then merging changes nothing): make the adapters matter
    texts = ["the film was great", "awful and boring plot"]
    m.eval()
    with torch.no_grad():
        want = m(encode(tiny_llama, texts)).softmax(-1)
    tok = load_tokenizer(tiny_llama)
    m.export(tmp_path / "adapter", tok, merge=False)
    m.export(tmp_path / "merged", tok)  # merges in place: after the adapter export
    for kind in ("adapter", "merged"):
        assert (tmp_path / kind / "head.safetensors").is_file()
        got = torch.tensor(predictions(str(tmp_path / kind), texts))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=kind)
    base = ClassificationModule(tiny_llama, label_names=["neg", "pos"], head={"hidden_sizes": [8]}).eval()
    base.head.load_state_dict(m.head.state_dict())
    with torch.no_grad():
        assert not torch.allclose(base(encode(tiny_llama, texts)).softmax(-1), want, atol=1e-3)  # the adapters count


def test_causal_seq2seq_with_lora_adapts_the_body_not_the_lm_head(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from taskhead.tasks.seq2seq import Seq2SeqModule

    m = Seq2SeqModule(tiny_llama, architecture="causal", metric="bleu", peft={"r": 2})
    wrapped = lora_modules(m.model)
    assert wrapped and not [n for n in wrapped if "lm_head" in n]
    assert all("lora_" in n for n, p in m.named_parameters() if p.requires_grad)
    assert m.backbone is unwrap(m.model).base_model
    ids = load_tokenizer(tiny_llama)(["the film was"], return_tensors="pt")
    assert m.model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3
    m.export(tmp_path / "merged", load_tokenizer(tiny_llama))
    assert (tmp_path / "merged" / "generation_config.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.pad_token_id is not None
