"""Experiment trackers as --trainer.logger (MLflow with a real SQLite store, W&B offline, CSV): they log beside the
run directory, which stays <root>/<name>/version_N with its manifest, metrics.json and last.ckpt."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_taskhead


def fit_args(tiny_bert, review_files, root, logger: str, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/imdb.yaml"), "--model.model_name_or_path", tiny_bert,
            "--data.train_file", review_files["train"], "--data.cache_dir", str(root / "cache"), "--data.batch_size", "16",
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.enable_model_summary", "false",
            "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "2", "--trainer.default_root_dir", str(root),
            "--trainer.logger", logger, *extra]


def assert_run_directory(root):
    run = root / "train" / "version_0"
    assert (run / "manifest.json").is_file() and (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file() and list(run.glob("events.out.tfevents.*"))
    return run


def test_mlflow_sqlite_store_holds_the_runs_metrics_and_params(tiny_bert, review_files, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    db = tmp_path / "mlflow.db"
    logger = ("{class_path: lightning.pytorch.loggers.MLFlowLogger, init_args: "
              f"{{experiment_name: taskhead-test, tracking_uri: 'sqlite:///{db}'}}}}")
    proc = run_taskhead(*fit_args(tiny_bert, review_files, tmp_path, logger))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_run_directory(tmp_path)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("taskhead-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert {"train/loss", "val/acc", "val/loss"} <= set(run.data.metrics)
    assert run.data.params["optimizer/lr"] == "5e-05" and run.data.params["label_names"] == "['neg', 'pos']"
    # the tracker sees the same resume: a second command continues the run directory and its MLflow run goes on
    proc = run_taskhead(*fit_args(tiny_bert, review_files, tmp_path, logger, "--ckpt_path", "last", "--trainer.max_steps", "6"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "train" / "version_1").exists()


def test_wandb_offline_and_csv(tiny_bert, review_files, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_dir = tmp_path / "wandb-logs"
    loggers = ("[{class_path: lightning.pytorch.loggers.WandbLogger, init_args: "
               f"{{project: taskhead-test, offline: true, save_dir: '{wandb_dir}'}}}}, "
               f"{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: '{tmp_path / 'csv'}'}}}}]")
    proc = run_taskhead(*fit_args(tiny_bert, review_files, tmp_path, loggers), env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = assert_run_directory(tmp_path)
    assert json.loads((run / "manifest.json").read_text())["stage"] == "fit"
    offline_runs = list(wandb_dir.rglob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb")), list(wandb_dir.rglob("*"))[:20]
    (metrics_csv,) = (tmp_path / "csv").rglob("metrics.csv")
    header = metrics_csv.read_text().splitlines()[0].split(",")
    assert "val/acc" in header and "train/loss" in header
