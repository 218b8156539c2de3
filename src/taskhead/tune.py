"""``taskhead tune``: hyper-parameter search with Optuna over any option of ``taskhead fit``.

Each trial is an ordinary ``taskhead fit`` run in a fresh process (its own run directory; nothing of one trial's
memory survives into the next) with the trial's values as command-line options. The trial reports every validation of
``--tune.metric`` to the study from inside the run (``PruneOnPlateau`` below, a few lines written by hand because
Optuna's Lightning callback expects the trial object in the same process: ``TrialPruning``), so Optuna's pruner can stop a poor trial
early; the trial's value is the best value it reported. The study lives in Optuna's storage: with a database
(``--tune.storage sqlite:///study.db`` or a PostgreSQL/MySQL URL) a crashed search resumes and several machines can
share one study by running the same command. At the end ``best.yaml`` (under ``--trainer.default_root_dir``) is the best
trial's complete config: ``taskhead fit --config best.yaml`` reproduces it.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

from taskhead.cli import option_value
from taskhead.errors import TaskheadError

DISTRIBUTIONS = ("float", "int", "categorical")


def parse_space(path: str | Path) -> dict[str, dict]:
    """``space.yaml``: dotted option → ``{type: float|int|categorical, low, high, log, step, choices}``."""
    path = Path(path)
    try:
        space = yaml.safe_load(path.read_text())
    except OSError:
        raise TaskheadError(f"{path}: file not found (--tune.space)") from None
    except yaml.YAMLError as e:
        raise TaskheadError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(space, dict) or not space:
        raise TaskheadError(f"{path}: expected a mapping of options to distributions, e.g. 'model.optimizer.lr: "
                            "{type: float, low: 1e-5, high: 3e-4, log: true}'")
    for key, spec in space.items():
        where = f"{path}: {key}"
        if not isinstance(spec, dict) or spec.get("type") not in DISTRIBUTIONS:
            raise TaskheadError(f"{where}: needs 'type', one of {', '.join(DISTRIBUTIONS)}")
        if spec["type"] == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise TaskheadError(f"{where}: a categorical needs a non-empty 'choices' list")
        elif not all(isinstance(spec.get(k), int | float) for k in ("low", "high")) or spec["low"] > spec["high"]:
            raise TaskheadError(f"{where}: a {spec['type']} needs numbers 'low' <= 'high'")
    return space


def suggest(trial, space: dict[str, dict]) -> dict[str, Any]:
    values = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")),
                                              step=spec.get("step"))
        elif spec["type"] == "int":
            values[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")),
                                            step=int(spec.get("step") or 1))
        else:
            values[key] = trial.suggest_categorical(key, spec["choices"])
    return values


def as_option(value: Any) -> str:
    """A value as jsonargparse reads it on the command line (YAML flow style)."""
    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


class TrialPruning(Callback):
    """Inside a trial's run: report ``metric`` after every validation to the trial in the study's storage, and stop the
    run when the pruner says so (the parent process then marks the trial pruned).

    Args:
        storage: The study's Optuna storage URL.
        study_name: The study.
        trial_id: The trial's id in the storage.
        metric: The validation metric to report.
    """

    def __init__(self, storage: str, study_name: str, trial_id: int, metric: str) -> None:
        import optuna

        self.trial = optuna.trial.Trial(optuna.load_study(study_name=study_name, storage=storage), trial_id)
        self.metric = metric

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics or not trainer.is_global_zero:
            return
        self.trial.report(float(trainer.callback_metrics[self.metric]), step=trainer.global_step)
        finished = trainer.global_step >= trainer.estimated_stepping_batches  # the last validation: nothing left to save
        if not finished and self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_step", trainer.global_step)
            trainer.should_stop = True


def trial_value(trial, direction: str) -> float | None:
    values = [v for v in trial.intermediate_values.values() if v is not None and not math.isnan(v)]
    if not values:
        return None
    return max(values) if direction == "maximize" else min(values)


def best_config(run_dir: Path) -> dict:
    """The trial run's saved config, minus what belongs to the search (its pruning callback, its resume path)."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    config["trainer"]["callbacks"] = [c for c in callbacks if "TrialPruning" not in str(c.get("class_path"))] or None
    config["ckpt_path"] = None
    return config


def tune_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="taskhead tune", allow_abbrev=False,
                                     description="Optuna search over taskhead fit options; every other option goes to fit.")
    parser.add_argument("--tune.space", dest="space", required=True, help="YAML: dotted option → distribution")
    parser.add_argument("--tune.n_trials", dest="n_trials", type=int, default=20, help="trials in the study (all workers)")
    parser.add_argument("--tune.metric", dest="metric", required=True, help="validation metric, e.g. val/acc")
    parser.add_argument("--tune.direction", dest="direction", choices=("maximize", "minimize"), default="maximize")
    parser.add_argument("--tune.storage", dest="storage", default=None,
                        help="Optuna storage URL (sqlite:///study.db, postgresql://...); default: sqlite in the root dir")
    parser.add_argument("--tune.study_name", dest="study_name", default=None, help="default: the run name or 'taskhead'")
    parser.add_argument("--tune.seed", dest="seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--tune.pruner", dest="pruner", choices=("median", "none"), default="median")
    args, fit_args = parser.parse_known_args(argv)
    bad = [a for a in fit_args if a.startswith("--tune.")]
    if bad:
        raise TaskheadError(f"{bad[0]}: unknown option (see taskhead tune --help)")
    try:
        import optuna
    except ImportError:
        raise TaskheadError("taskhead tune needs Optuna: pip install -e '.[tracking]' (or pip install optuna)") from None

    space = parse_space(args.space)
    root = Path(option_value(fit_args, "--trainer.default_root_dir") or "runs")
    name = args.study_name or option_value(fit_args, "--name") or "tune"
    root.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{(root / f'{name}-study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if args.pruner == "median" else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=name, storage=storage, direction=args.direction, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=args.seed), pruner=pruner)
    print(f"[tune] study '{name}' in {storage}: {len(study.trials)} trial(s) already there", flush=True)
    runs: dict[int, Path] = {}
    while True:
        done = [t for t in study.trials if t.state.is_finished() or t.state == optuna.trial.TrialState.RUNNING]
        if len(done) >= args.n_trials:
            break
        trial = study.ask()
        values = suggest(trial, space)
        run_name = f"{name}-trial{trial.number}"
        prune = {"class_path": "taskhead.tune.TrialPruning",
                 "init_args": {"storage": storage, "study_name": name, "trial_id": trial._trial_id, "metric": args.metric}}
        overrides = [x for key, value in values.items() for x in (f"--{key}", as_option(value))]
        cmd = [sys.executable, "-m", "taskhead.cli", "fit", *fit_args, *overrides, "--name", run_name,
               "--trainer.default_root_dir", str(root), f"--trainer.callbacks+={yaml.safe_dump(prune, default_flow_style=True).strip()}"]
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"[tune] trial {trial.number}: {shown}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        trial_run = latest_run(root / run_name)
        frozen = study._storage.get_trial(trial._trial_id)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            print(f"[tune] trial {trial.number} failed (exit {proc.returncode}): {tail}", flush=True)
            if proc.returncode == 2:  # a user error (bad option, file): every trial would fail the same way
                raise TaskheadError(f"trial {trial.number}: {tail.removeprefix('taskhead: error: ')}")
            continue
        value = trial_value(frozen, args.direction)
        if trial_run is not None:
            runs[trial.number] = trial_run
            trial.set_user_attr("run_dir", str(trial_run))
        if "pruned_at_step" in frozen.user_attrs:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            print(f"[tune] trial {trial.number} pruned at step {frozen.user_attrs['pruned_at_step']} "
                  f"(best {args.metric} {value})", flush=True)
        elif value is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            print(f"[tune] trial {trial.number}: {args.metric} was never logged (is it a validation metric?)", flush=True)
        else:
            study.tell(trial, value)
            print(f"[tune] trial {trial.number}: {args.metric} {value:.4f}", flush=True)
    finish(study, args, root)


def finish(study, args, root: Path) -> None:
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    print(trials_table(study.trials, args.metric), flush=True)
    if not complete:
        raise TaskheadError(f"no trial of study '{study.study_name}' completed: nothing to write")
    best = study.best_trial
    run_dir = Path(best.user_attrs.get("run_dir", ""))
    if not (run_dir / "config.yaml").is_file():
        raise TaskheadError(f"best trial {best.number}: its run directory {run_dir} is gone: cannot write best.yaml")
    out = root / "best.yaml"
    header = (f"# taskhead tune: best of study '{study.study_name}' (trial {best.number}, {args.metric} {best.value:.4f})\n"
              f"# reproduce: taskhead fit --config {out}\n")
    out.write_text(header + yaml.safe_dump(best_config(run_dir), sort_keys=False))
    print(f"[tune] best trial {best.number}: {args.metric} {best.value:.4f} → {out}", flush=True)


def trials_table(trials, metric: str) -> str:
    keys = sorted({k for t in trials for k in t.params})
    head = ["trial", "state", metric, *keys]
    rows = [[str(t.number), t.state.name.lower(), "" if t.value is None else f"{t.value:.4f}",
             *[format_value(t.params.get(k)) for k in keys]] for t in trials]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def format_value(v: Any) -> str:
    return "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def latest_run(runs: Path) -> Path | None:
    versions = sorted(runs.glob("version_*"), key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else -1)
    return versions[-1] if versions else None
