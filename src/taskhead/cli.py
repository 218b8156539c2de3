"""The ``taskhead`` command: LightningCLI's fit / validate / test / predict, plus ``export``.

The YAML names the task's DataModule and LightningModule by ``class_path``; the CLI links what the data knows into
the model (label names, label counts) and what the model knows into the data (which tokenizer, max_length).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from taskhead.core.callbacks import RunArtifacts, RunManifest, Throughput
from taskhead.core.data import TaskDataModule
from taskhead.core.module import TaskModule
from taskhead.errors import TaskheadError


class TaskheadCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.filename": "best-{step}", "checkpoint.save_last": True, "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(RunArtifacts, "artifacts")
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.model_name_or_path")
        parser.link_arguments("data.init_args.max_length", "model.init_args.max_length")
        parser.link_arguments("data.label_names", "model.init_args.label_names", apply_on="instantiate")
        parser.link_arguments("data.label_counts", "model.init_args.label_counts", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        # Always on, whatever the YAML's callback list says: they only observe the run.
        # Rich in a terminal; in a log file (background runs, CI) Rich draws nothing until the end, tqdm prints lines.
        bar = RichProgressBar(leave=True) if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=20)
        extra = [Throughput(), bar]
        if self._get(self.config_init, "trainer").get("logger") is not False:
            extra.append(LearningRateMonitor(logging_interval="step"))
        kwargs.setdefault("callbacks", []).extend(extra)
        return super().instantiate_trainer(**kwargs)


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
    return TaskheadCLI(
        TaskModule,
        TaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunManifest,
        auto_configure_optimizers=False,  # the module builds its own from model.optimizer / model.scheduler
        trainer_defaults={"use_distributed_sampler": False},  # our batch samplers shard by rank themselves
        parser_kwargs={"default_env": False},
        args=args,
    )


def main(argv: list[str] | None = None) -> None:
    try:
        if (sys.argv[1:] if argv is None else argv)[:1] == ["export"]:
            export_main((sys.argv[1:] if argv is None else argv)[1:])
        else:
            run_cli(argv)
    except Exception as e:
        cause = user_error(e)
        if cause is None:
            raise
        print(f"taskhead: error: {cause}", file=sys.stderr)
        sys.exit(2)


def user_error(e: BaseException | None) -> TaskheadError | None:
    """The TaskheadError behind ``e``: jsonargparse wraps errors raised while instantiating classes."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, TaskheadError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":
    main()
