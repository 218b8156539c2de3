"""``model.optimizer.freeze_backbone_steps`` under DDP (2 CPU processes, gloo): the backbone stays bit-identical through
the frozen steps and trains after them. DDP registers its gradient hooks when it wraps the model, so flipping
``requires_grad`` afterwards breaks its reduction; under a distributed strategy the frozen phase drops the backbone's
gradients before the optimiser step instead (TaskModule.on_before_optimizer_step), which is the same update."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest

import torch

from taskhead.cli import run_cli
from taskhead.tasks.classification import ClassificationModule

from conftest import cli_args, run_taskhead

FREEZE = ["--model.optimizer.freeze_backbone_steps", "2", "--model.optimizer.lr", "1e-3",
          "--model.scheduler.name", "constant", "--model.scheduler.warmup_ratio", "0.0",
          "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", "--checkpoint.monitor", "null",
          "--checkpoint.save_top_k", "-1", "--checkpoint.every_n_train_steps", "1"]


def weights_at(run_root: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = next(run_root.rglob(f"best-step={step}.ckpt"))
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model.bert."): v for k, v in state.items() if k.startswith("model.bert.")}


def assert_frozen_then_trained(initial: dict[str, torch.Tensor], root: Path) -> None:
    at = {step: weights_at(root, step) for step in (1, 2, 3, 4)}
    for step in (1, 2):  # frozen: every backbone weight bit-identical to the pretrained one; the head trains
        frozen = backbone(at[step])
        assert frozen.keys() == initial.keys()
        assert [k for k in initial if not torch.equal(initial[k], frozen[k])] == [], step
    assert not torch.equal(at[1]["model.classifier.weight"], at[2]["model.classifier.weight"])
    for step in (3, 4):
        trained = backbone(at[step])
        assert not torch.equal(initial["encoder.layer.0.attention.self.query.weight"],
                               trained["encoder.layer.0.attention.self.query.weight"]), step


def test_freeze_backbone_steps_under_ddp(tiny_bert, review_files, tmp_path):
    initial = ClassificationModule(tiny_bert, label_names=["neg", "pos"]).model.bert.state_dict()
    args = cli_args(tiny_bert, {"train": review_files["train"]}, tmp_path, *FREEZE,
                    "--trainer.devices", "2", "--trainer.strategy", "ddp")
    proc = run_taskhead("fit", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 0: backbone frozen" in proc.stderr + proc.stdout and "step 2: backbone unfrozen" in proc.stderr + proc.stdout
    assert_frozen_then_trained(initial, tmp_path / "runs")


def test_freezing_by_dropping_gradients_equals_requires_grad(tiny_bert, review_files, tmp_path, monkeypatch):
    """One process, both ways: flipping ``requires_grad`` (what one process does: it saves the backbone's backward)
    and dropping the backbone's gradients before the step (what a distributed strategy does) give bit-identical
    weights at every step, AdamW moments included (compared through the last checkpoint's optimizer state)."""
    runs = {}
    for way in ("requires_grad", "drop_grads"):
        if way == "drop_grads":
            monkeypatch.setattr(ClassificationModule, "freeze_by_dropping_grads", lambda self: True)
        root = tmp_path / way
        cli = run_cli(["fit", *cli_args(tiny_bert, {"train": review_files["train"]}, root, *FREEZE)])
        assert all(p.requires_grad for p in cli.model.parameters())
        runs[way] = root
    initial = ClassificationModule(tiny_bert, label_names=["neg", "pos"]).model.bert.state_dict()
    for way, root in runs.items():
        assert_frozen_then_trained(initial, root)
    for step in (1, 2, 3, 4):
        a, b = weights_at(runs["requires_grad"], step), weights_at(runs["drop_grads"], step)
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], step
    last = [torch.load(next(root.rglob("last.ckpt")), map_location="cpu", weights_only=True)["optimizer_states"][0]["state"]
            for root in runs.values()]
    assert last[0].keys() == last[1].keys()
    for i in last[0]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(last[0][i][name], last[1][i][name]), (i, name)


def test_freeze_backbone_steps_under_ddp_with_lora(tiny_llama, review_files, tmp_path):
    """Under LoRA the frozen "backbone" is the adapters: untouched through the frozen steps (lora_B stays zero, as
    initialised), trained after; the task head trains throughout."""
    args = cli_args(tiny_llama, {"train": review_files["train"]}, tmp_path, *FREEZE, "--config", "configs/peft/lora.yaml",
                    "--model.optimizer.lr", "1e-2", "--data.batch_size", "4", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    proc = run_taskhead("fit", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    at = {step: weights_at(tmp_path / "runs", step) for step in (1, 2, 3, 4)}
    adapters = [k for k in at[1] if ".lora_A." in k or ".lora_B." in k]
    head = next(k for k in at[1] if ".modules_to_save." in k and k.endswith("weight"))
    assert adapters and all(torch.equal(at[1][k], at[2][k]) for k in adapters)
    assert all(not at[2][k].any() for k in adapters if ".lora_B." in k)
    assert not torch.equal(at[1][head], at[2][head])
    assert any(at[4][k].any() for k in adapters if ".lora_B." in k)


@pytest.mark.parametrize("strategy, kwargs", [("FSDPStrategy", {"use_orig_params": False}), ("DeepSpeedStrategy", {})])
def test_freezing_where_the_optimiser_sees_no_per_weight_gradient_is_refused(tiny_bert, strategy, kwargs):
    """Flat FSDP units and DeepSpeed's engine own the gradients: dropping a weight's ``.grad`` would not freeze it."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import Precision

    from taskhead.errors import TaskheadError

    m = ClassificationModule(tiny_bert, label_names=["neg", "pos"], optimizer={"freeze_backbone_steps": 2})
    m._trainer = SimpleNamespace(precision_plugin=Precision(), estimated_stepping_batches=10, world_size=2,
                                 strategy=type(strategy, (), {"kwargs": kwargs})())
    with pytest.raises(TaskheadError, match="freeze_backbone_steps needs each weight's own gradient"):
        m.configure_optimizers()
    m.optim_cfg = dataclasses.replace(m.optim_cfg, freeze_backbone_steps=0)
    m.configure_optimizers()
