"""The ``taskhead`` command: LightningCLI's fit / validate / test / predict, plus ``export``.

This module imports nothing heavy at import time: ``taskhead --help`` answers at once, and torch, Lightning and
transformers load only for the subcommand that runs (``taskhead.lightning_cli``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from taskhead.errors import TaskheadError, user_error

SUBCOMMANDS = {
    "fit": "Train (and validate) a model: taskhead fit --config configs/imdb.yaml",
    "validate": "Score the validation split: taskhead validate --ckpt_path CKPT",
    "test": "Score the test split, write metrics.json: taskhead test --ckpt_path CKPT",
    "predict": "Predict on a file, write predictions.jsonl: taskhead predict --ckpt_path CKPT --data.predict_file F",
    "export": "Checkpoint → Hugging Face directory (safetensors): taskhead export --ckpt_path CKPT --out DIR",
    "tune": "Optuna search over any fit option: taskhead tune --config C --tune.space S --tune.metric val/acc",
}

HELP = """usage: taskhead {fit,validate,test,predict,export,tune} [options]

Fine-tune pretrained Hugging Face transformers with PyTorch Lightning: heads, losses, schedules and official
metrics from YAML.

subcommands:
%s

`taskhead SUBCOMMAND --help` lists every option of a subcommand; `--print_config` prints the resolved config.
validate/test/predict/export need only --ckpt_path: the run's saved config supplies the rest.
"""


def print_help() -> None:
    width = max(map(len, SUBCOMMANDS))
    print(HELP % "\n".join(f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()))


def option_value(argv: list[str], option: str, default: str | None = None) -> str | None:
    """The value the CLI will use for ``option`` given on the command line: its last ``--opt value`` / ``--opt=value``."""
    value = default
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


def run_config_for(argv: list[str]) -> list[str]:
    """``validate|test|predict --ckpt_path <run>/checkpoints/x.ckpt``: put the run's saved ``config.yaml`` first, so the
    checkpoint alone is enough; the user's own ``--config`` files and options, which come after it, still win."""
    if not argv or argv[0] not in ("validate", "test", "predict"):
        return argv
    ckpt = option_value(argv, "--ckpt_path")
    if not ckpt or "://" in ckpt:
        return argv
    path = Path(ckpt)
    config = path.parent.parent / "config.yaml"
    if path.parent.name != "checkpoints" or not config.is_file():
        return argv
    return [argv[0], "--config", str(config), *argv[1:]]


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="taskhead export", description="Checkpoint → Hugging Face directory (safetensors).",
                                     allow_abbrev=False)
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by taskhead fit")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--push_to_hub", metavar="OWNER/NAME", default=None,
                        help="also upload the export (with its model card) to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: create the Hub repo private")
    parser.add_argument("--merge", type=lambda v: {"true": True, "false": False}[v.lower()], default=True,
                        metavar="{true,false}", help="LoRA runs: merge the adapters into the weights (default) or "
                        "write an adapter directory that loads on top of the base model")
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private needs --push_to_hub")
    from taskhead.core.export import export_checkpoint

    out = export_checkpoint(args.ckpt_path, args.out, push_to_hub=args.push_to_hub, private=args.private,
                            merge=args.merge)
    print(f"exported to {out}; load with taskhead.load('{out}')")


def run_cli(args: list[str] | None = None):
    """Run a LightningCLI subcommand in this process (tests and benchmarks call it directly)."""
    from taskhead.lightning_cli import run_cli as _run_cli

    return _run_cli(run_config_for(list(sys.argv[1:] if args is None else args)))


def main(argv: list[str] | None = None) -> None:
    """The console command. A user error (TaskheadError, or a config/option jsonargparse rejects) prints one line,
    ``taskhead: error: ...``, and exits with status 2; a run stopped by SIGTERM/SIGINT exits 143/130 after writing
    last.ckpt; anything else is a bug and keeps its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help()
        return
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"taskhead {version('taskhead')}")
        return
    try:
        if argv[0] == "export":
            export_main(argv[1:])
        elif argv[0] == "tune":
            from taskhead.tune import tune_main

            tune_main(argv[1:])
        elif argv[0] not in SUBCOMMANDS:
            raise TaskheadError(f"unknown subcommand '{argv[0]}' (choose from {', '.join(SUBCOMMANDS)}; taskhead --help)")
        else:
            run_cli(argv)
    except SystemExit as e:
        if type(e).__name__ != "SIGTERMException":
            raise
        name, stage = getattr(e, "signal_name", "SIGTERM"), getattr(e, "stage", "fit")
        last = getattr(e, "last_checkpoint", None)
        saved = f"last.ckpt written: {last}; resume with --ckpt_path last" if last else "no last.ckpt (checkpointing is off)"
        if stage == "fit":
            print(f"taskhead: stopped by {name} at step {getattr(e, 'global_step', '?')}; {saved}", file=sys.stderr)
        else:
            print(f"taskhead: stopped by {name} during {stage}; nothing written", file=sys.stderr)
        sys.exit(130 if name == "SIGINT" else 143)
    except Exception as e:
        cause = user_error(e, argv)
        if cause is None:
            raise
        print(f"taskhead: error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
