"""taskhead tune: an Optuna study in a real SQLite database, each trial a real fit, best.yaml that reproduces the best."""

from __future__ import annotations

import re
import sqlite3

import pytest
import yaml

from taskhead.errors import TaskheadError
from taskhead.tune import as_option, parse_space, trial_value, trials_table

from conftest import ROOT, run_taskhead

optuna = pytest.importorskip("optuna")


def test_space_file_errors_name_the_option(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("model.optimizer.lr: {type: float, low: 1e-3, high: 1e-5}\n")
    with pytest.raises(TaskheadError, match=r"space.yaml: model.optimizer.lr: a float needs numbers 'low' <= 'high'"):
        parse_space(bad)
    bad.write_text("data.batch_size: {type: choice, choices: [8, 16]}\n")
    with pytest.raises(TaskheadError, match=r"data.batch_size: needs 'type', one of float, int, categorical"):
        parse_space(bad)
    assert as_option(3e-4) == "0.0003" and as_option([256]) == "[256]" and as_option("cosine") == "cosine"


def test_trial_value_is_the_best_reported():
    trial = optuna.trial.create_trial(params={}, distributions={}, value=0.5, intermediate_values={2: 0.6, 4: 0.8, 6: 0.7})
    assert trial_value(trial, "maximize") == 0.8 and trial_value(trial, "minimize") == 0.6
    assert "| trial | state" in trials_table([trial], "val/acc")


def test_search_in_sqlite_and_best_yaml_reproduces(tiny_bert, review_files, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("model.optimizer.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}\n"
                     "model.scheduler.name: {type: categorical, choices: [linear, constant]}\n")
    root, db = tmp_path / "root", tmp_path / "study.db"
    fit = ["--config", str(ROOT / "configs/imdb.yaml"), "--model.model_name_or_path", tiny_bert,
           "--data.train_file", review_files["train"], "--data.cache_dir", str(tmp_path / "cache"),
           "--data.batch_size", "16", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
           "--trainer.enable_model_summary", "false", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root)]
    tune = ["--tune.space", str(space), "--tune.n_trials", "3", "--tune.metric", "val/acc", "--tune.direction",
            "maximize", "--tune.storage", f"sqlite:///{db}", "--tune.study_name", "imdb-tiny", "--tune.pruner", "none"]
    proc = run_taskhead("tune", *fit, *tune, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # the study is in the database: three finished trials with their values and parameters
    with sqlite3.connect(db) as con:
        states = [s for (s,) in con.execute("select state from trials order by number")]
        values = [v for (v,) in con.execute("select value from trial_values order by trial_id")]
    assert states == ["COMPLETE"] * 3 and len(values) == 3
    study = optuna.load_study(study_name="imdb-tiny", storage=f"sqlite:///{db}")
    assert study.best_value == max(values)
    assert re.search(r"\| trial \| state +\| val/acc", proc.stdout)
    # best.yaml is a complete config: fit from it alone gives the best trial's value again (same seed, same data)
    best = root / "best.yaml"
    config = yaml.safe_load(best.read_text())
    assert config["model"]["init_args"]["optimizer"]["lr"] == pytest.approx(study.best_params["model.optimizer.lr"])
    assert "TrialPruning" not in best.read_text()
    again = run_taskhead("fit", "--config", str(best), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    m = re.search(r"\[fit\] best val/acc (\d\.\d{4})", again.stdout + again.stderr)
    assert m and float(m[1]) == pytest.approx(study.best_value, abs=1e-4)
    # a second command on the same study adds only what is missing
    more = run_taskhead("tune", *fit, *[a if a != "3" else "4" for a in tune], timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "3 trial(s) already there" in more.stdout and len(optuna.load_study(study_name="imdb-tiny", storage=f"sqlite:///{db}").trials) == 4
