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
