"""The ``taskhead`` command: LightningCLI's fit / validate / test / predict, plus ``export``.

The YAML names the task's DataModule and LightningModule by ``class_path``; the CLI links what the data knows into
the model (label names, label counts) and what the model knows into the data (which tokenizer, max_length).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from taskhead.core.callbacks import AtomicCheckpointIO, LastCheckpoint, RunArtifacts, RunManifest, Throughput
from taskhead.core.data import TaskDataModule
from taskhead.core.module import TaskModule
from taskhead.errors import TaskheadError, user_error


class TaskheadCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # best-{step}.ckpt by the monitored metric; last.ckpt (newest state, for --ckpt_path last) comes from LastCheckpoint
        parser.set_defaults({"checkpoint.filename": "best-{step}", "checkpoint.save_last": False, "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(RunArtifacts, "artifacts")
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.model_name_or_path")
        parser.link_arguments("data.init_args.max_length", "model.init_args.max_length")
        parser.link_arguments("data.label_names", "model.init_args.label_names", apply_on="instantiate")
        parser.link_arguments("data.label_counts", "model.init_args.label_counts", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        if ckpt not in (None, "last", "best", "hpc") and "://" not in ckpt and not Path(ckpt).is_file():
            raise TaskheadError(f"{ckpt}: file not found (--ckpt_path)")  # before any run directory is made
        if ckpt == "last" and cfg.checkpoint.dirpath is None and cfg.last_checkpoint.dirpath is None:
            if resolve_last_checkpoint(cfg, resume=self.subcommand == "fit"):
                self.save_config_kwargs["overwrite"] = True  # the resumed run's config.yaml replaces the first one's

    def instantiate_trainer(self, **kwargs):
        trainer_cfg = self._get(self.config_init, "trainer")
        # Always on, whatever the YAML's callback list says: they only observe the run.
        # Rich in a terminal; in a log file (background runs, CI) Rich draws nothing until the end, tqdm prints lines.
        extra = [Throughput()]
        if trainer_cfg.get("enable_progress_bar") is not False:
            extra.append(RichProgressBar(leave=True) if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=20))
        if trainer_cfg.get("logger") is not False:
            extra.append(LearningRateMonitor(logging_interval="step"))
        kwargs["callbacks"] = [*as_list(trainer_cfg.get("callbacks")), *extra]
        if not trainer_cfg.get("plugins") and not any(s in str(trainer_cfg.get("strategy")).lower() for s in ("deepspeed", "fsdp")):
            kwargs["plugins"] = [AtomicCheckpointIO()]  # sharded strategies write checkpoint directories their own way
        return super().instantiate_trainer(**kwargs)


def as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


def resolve_last_checkpoint(cfg, resume: bool) -> bool:
    """``--ckpt_path last`` → the newest ``last.ckpt`` among this config's earlier runs (``<save_dir>/<name>/version_*``).

    Lightning's own "last" looks only in the new run's (empty) version directory. For ``fit`` the run also continues
    in that version directory, so TensorBoard shows one curve. No earlier run: ``fit`` starts fresh (a first SLURM job
    and its requeues use the same command); the other subcommands stop. Returns whether a run continues in place.
    """
    logger = cfg.trainer.get("logger")
    init = logger.get("init_args") if hasattr(logger, "get") else None
    if init is None or init.get("save_dir") is None or init.get("version") is not None:
        return False  # no logger, or the version is pinned: Lightning's own lookup in that directory
    runs = Path(init.save_dir) / (init.get("name") or "lightning_logs")
    found = sorted(runs.glob(f"version_*/checkpoints/{LastCheckpoint.FILENAME}"), key=lambda p: p.stat().st_mtime)
    if not found:
        if not resume:
            raise TaskheadError(f"--ckpt_path last: no last.ckpt under {runs}/version_*/checkpoints")
        print(f"[resume] no last.ckpt under {runs}/version_*/checkpoints: starting a new run", file=sys.stderr)
        cfg.ckpt_path = None
        return False
    cfg.ckpt_path = str(found[-1])
    print(f"[resume] --ckpt_path last → {cfg.ckpt_path}", file=sys.stderr)
    if resume:
        init.version = found[-1].parents[1].name
    return resume


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="taskhead export", description="Checkpoint → Hugging Face directory (safetensors).")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by taskhead fit")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    from taskhead.core.export import export_checkpoint

    out = export_checkpoint(args.ckpt_path, args.out)
    print(f"exported to {out}; load with taskhead.load('{out}')")


def run_cli(args: list[str] | None = None) -> TaskheadCLI:
    warnings.filterwarnings("ignore", message=".*custom batch sampler.*")  # ours returns every index, sorted
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")  # main(argv) in Python
    warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")  # on_nonfinite_loss: skip, counted
    return TaskheadCLI(
        TaskModule,
        TaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunManifest,
        auto_configure_optimizers=False,  # the module builds its own from model.optimizer / model.scheduler
        trainer_defaults={"use_distributed_sampler": False},  # our batch samplers shard by rank themselves
        parser_kwargs={"default_env": False, "exit_on_error": False},  # parse errors raise: main() prints one line
        args=args,
    )


def main(argv: list[str] | None = None) -> None:
    """The console command. A user error (TaskheadError, or a config/option jsonargparse rejects) prints one line,
    ``taskhead: error: ...``, and exits with status 2; anything else is a bug and keeps its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["export"]:
            export_main(argv[1:])
        else:
            run_cli(argv)
    except Exception as e:
        cause = user_error(e, argv)
        if cause is None:
            raise
        print(f"taskhead: error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
