"""Evaluation under full sharding on CPU (2 processes, gloo), where every forward is a collective: a rank with one eval
batch more than the other waits in an all-gather until the collective timeout. The eval sampler gives every rank
the same number of batches (core/sampling.py), so validation finishes with the single-process metrics.

Lightning 2.6 refuses ``strategy="fsdp"`` on CPU ("The strategy `fsdp` requires a GPU accelerator"), and torch's
FSDP1 does too ("FSDP needs a non-CPU accelerator device"); FSDP2 (``fully_shard``, through Lightning's
``ModelParallelStrategy`` and a ``configure_model``) runs on CPU, so that is what this test shards with."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, make_reviews, write_jsonl

SCRIPT = '''
import datetime, json, sys
import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from taskhead.tasks.classification import ClassificationDataModule, ClassificationModule


class Sharded(ClassificationModule):
    def configure_model(self):  # FSDP2: each encoder layer its own unit, then the rest
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


model_dir, train, val, cache, devices, out = sys.argv[1:]
devices = int(devices)
dm = ClassificationDataModule(model_name_or_path=model_dir, train_file=train, validation_file=val, label_names=["neg", "pos"],
                              cache_dir=cache, eval_batch_size=16)
torch.manual_seed(0)  # the new head: the same weights in every process
module = (Sharded if devices > 1 else ClassificationModule)(model_dir, label_names=["neg", "pos"])
strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=datetime.timedelta(seconds=30)) \\
    if devices > 1 else "auto"
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, precision="32-true", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    use_distributed_sampler=False)
metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
if trainer.global_rank == 0:
    sharded = type(module.model).__name__.startswith("FSDP")
    open(out, "w").write(json.dumps({"metrics": metrics, "sharded": sharded, "batches": len(trainer.val_dataloaders)}))
'''


def test_sharded_validation_on_cpu_equals_single_process(tiny_bert, tmp_path):
    # 75 examples in batches of 16: 5 batches, which 2 ranks cannot share equally (3 + 2 hung before the fix)
    val = write_jsonl(tmp_path / "val.jsonl", make_reviews(75, 7))
    train = write_jsonl(tmp_path / "train.jsonl", make_reviews(20, 8))
    script = tmp_path / "sharded_validate.py"
    script.write_text(SCRIPT)
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"metrics-{devices}.json"
        proc = subprocess.run([sys.executable, str(script), tiny_bert, str(train), str(val), str(tmp_path / "cache"),
                               str(devices), str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads(out.read_text())
    assert results[2]["sharded"] and not results[1]["sharded"]
    assert results[1]["batches"] == 5 and results[2]["batches"] == 3  # 6 smaller batches, 3 a rank
    single, sharded = results[1]["metrics"], results[2]["metrics"]
    assert set(single) == set(sharded) and "val/acc" in single
    for key, value in single.items():
        assert sharded[key] == pytest.approx(value, abs=1e-6), key
