"""Validation under DDP (2 CPU processes, gloo) gives exactly the single-process metrics: the eval sampler shards
batches without the distributed sampler's repeated padding samples, and torchmetrics sums states across ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli_args, make_reviews, run_taskhead, write_jsonl


def test_ddp_validation_equals_single_process(tiny_bert, tmp_path):
    # 75 examples: not a multiple of 2 ranks x batch size, so padding or dropping would show
    val = write_jsonl(tmp_path / "val.jsonl", make_reviews(75, 7))
    train = write_jsonl(tmp_path / "train.jsonl", make_reviews(20, 8))
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        root = tmp_path / f"d{devices}"
        args = cli_args(tiny_bert, {"train": str(train), "validation": str(val)}, root,
                        "--trainer.devices", str(devices), "--trainer.strategy", strategy, "--data.eval_batch_size", "8")
        proc = run_taskhead("validate", *args, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics_file = next(Path(root / "runs").rglob("metrics.json"))
        results[devices] = json.loads(metrics_file.read_text())
    assert set(results[1]) == set(results[2]) and "val/acc" in results[1]
    for key, value in results[1].items():
        assert results[2][key] == pytest.approx(value, abs=1e-6), key


def test_local_rank_zero_tokenises_once_for_all_ranks(tiny_bert, review_files, tmp_path, monkeypatch):
    """Under DDP, prepare_data (local rank 0, while the other ranks wait) fills the tokenisation cache; every rank's
    setup then reads it, and rank 0's own setup does not build the splits a second time."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from taskhead.tasks.classification import ClassificationDataModule

    calls = []
    real = ClassificationDataModule.encode
    monkeypatch.setattr(ClassificationDataModule, "encode", lambda self, batch: calls.append(len(batch["text"])) or real(self, batch))

    def datamodule():
        dm = ClassificationDataModule(model_name_or_path=tiny_bert, train_file=review_files["train"],
                                      label_names=["neg", "pos"], cache_dir=str(tmp_path / "cache"))
        dm.trainer = SimpleNamespace(world_size=2, global_rank=0, state=SimpleNamespace(fn=TrainerFn.FITTING))
        return dm

    rank0 = datamodule()
    rank0.prepare_data()
    assert sum(calls) == 192  # train + held-out validation, tokenised once
    rank0.setup("fit")
    other = datamodule()
    other.setup("fit")
    assert sum(calls) == 192  # neither rank tokenises again
    assert len(other.datasets["train"]) == len(rank0.datasets["train"])
    assert len(rank0.datasets["train"]) + len(rank0.datasets["validation"]) == 192


def test_too_few_eval_batches_for_the_ranks_is_one_clear_error(tiny_bert, review_files, tmp_path):
    """19 held-out examples in one batch of 32 leave a second rank nothing: Lightning would raise its own zero-length
    error on that rank alone; every rank raises this instead."""
    from types import SimpleNamespace

    from taskhead.errors import TaskheadError
    from taskhead.tasks.classification import ClassificationDataModule

    dm = ClassificationDataModule(model_name_or_path=tiny_bert, train_file=review_files["train"], label_names=["neg", "pos"],
                                  cache_dir=str(tmp_path / "cache"), batch_size=16)
    dm.setup("fit")
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        with pytest.raises(TaskheadError, match=r"the validation split has 20 examples: 1 batch\(es\) of "
                                                 r"--data.eval_batch_size 32 cannot give each of the 2 ranks one; "
                                                 r"set --data.eval_batch_size 10 or less"):
            dm.val_dataloader()
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    dm.hparams.eval_batch_size = 10
    assert len(dm.val_dataloader()) == 1


@pytest.mark.parametrize("checkpointing", ["false", "true"], ids=["lora", "lora+gradient_checkpointing"])
def test_lora_under_ddp_trains_every_adapter_saves_only_them_and_tests(checkpointing, tiny_llama, review_files, tmp_path):
    """LoRA on a decoder-only classifier with 2 CPU processes (gloo), with and without non-reentrant gradient
    checkpointing: DDP registers only the trainable weights, every adapter gets a gradient on both ranks (a LoRA B
    matrix starts at zero and stays zero without one), the checkpoint holds only adapters + head and their Adam
    moments, and it loads for ``test`` on top of the base."""
    import torch

    from test_peft import LORA

    args = cli_args(tiny_llama, {"train": review_files["train"], "test": review_files["test"]}, tmp_path,
                    "--config", LORA, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--model.gradient_checkpointing", checkpointing, "--trainer.max_steps", "4",
                    "--data.eval_batch_size", "8", "--model.optimizer.lr", "3e-3")
    proc = run_taskhead("fit", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last, = (tmp_path / "runs").rglob("last.ckpt")
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all(".lora_" in k or ".score.modules_to_save." in k for k in keys), keys[:5]
    assert len(ckpt["optimizer_states"][0]["state"]) == len(keys)
    lora_b = {k: v for k, v in ckpt["state_dict"].items() if ".lora_B." in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values()), [k for k, v in lora_b.items() if v.abs().sum() == 0]
    assert ckpt["global_step"] == 4
    proc = run_taskhead("test", "--ckpt_path", str(last), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((last.parent.parent / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0
