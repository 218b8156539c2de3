"""SageMaker training-container entry point: the job's SM_* environment → a ``taskhead fit`` command line.

SageMaker runs this file in /opt/ml/code (the directory ``launch.py`` staged) once per GPU under torchrun when the
estimator's distribution is ``torch_distributed``, with the hyperparameters as ``--key value`` arguments. Mapping:

    SM_CHANNEL_TRAIN / _VALIDATION / _TEST   the single data file in each channel → --data.{train,validation,test}_file
    SM_NUM_GPUS, SM_HOSTS (LOCAL_WORLD_SIZE)  → --trainer.devices, --trainer.num_nodes, --trainer.accelerator
    SM_OUTPUT_DATA_DIR                        → trainer.default_root_dir (uploaded to S3 as output.tar.gz when the job ends)
    /opt/ml/checkpoints                       → checkpoint dirpath (synced with checkpoint_s3_uri; spot restarts
                                                find last.ckpt there and resume)
    SM_MODEL_DIR                              ← the best checkpoint, exported (``taskhead export``) after fit

The mapping is pure functions of an environment dict, so tests run it with a fake one (tests/test_launch.py).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from taskhead.cli import option_value  # the command line's last --opt value (taskhead.cli imports nothing heavy)

CHANNELS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}
CHECKPOINT_DIR = "/opt/ml/checkpoints"  # the estimator's checkpoint_local_path (launch.py sets the same)


class SetupError(ValueError):
    """A job entry.py cannot map: a data channel without exactly one data file, or no ``--config``."""


def channel_file(channel: str, directory: str | Path) -> str:
    """The one data file in a channel directory (hidden files such as S3 markers ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SetupError(f"channel '{channel}': {directory} is not a directory")
    files = sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if len(files) != 1:
        found = ", ".join(str(p.relative_to(directory)) for p in files[:5]) + (", ..." if len(files) > 5 else "")
        raise SetupError(
            f"channel '{channel}' ({directory}) holds {len(files)} files{f' ({found})' if files else ''}; taskhead reads "
            "exactly one data file per channel: point the channel's S3 URI at a single object"
        )
    return str(files[0])


def data_args(env: Mapping[str, str]) -> list[str]:
    """``--data.<split>_file`` for each channel present; the YAML's Hub dataset is switched off when any is."""
    args = []
    for channel, option in CHANNELS.items():
        directory = env.get(f"SM_CHANNEL_{channel.upper()}")
        if directory:
            args += [f"--data.{option}", channel_file(channel, directory)]
    return ["--data.dataset_name", "null", *args] if args else []


def trainer_args(env: Mapping[str, str]) -> list[str]:
    """Devices and nodes. Under torchrun LOCAL_WORLD_SIZE is the processes per host, which Lightning checks."""
    gpus = int(env.get("SM_NUM_GPUS", "0"))
    hosts = json.loads(env.get("SM_HOSTS", "[]")) or ["localhost"]
    per_host = int(env.get("LOCAL_WORLD_SIZE") or max(gpus, 1))
    args = [
        "--trainer.accelerator", "gpu" if gpus else "cpu",
        "--trainer.devices", str(per_host),
        "--trainer.num_nodes", str(len(hosts)),
    ]
    if per_host * len(hosts) > 1:
        args += ["--trainer.strategy", "ddp"]
    return args


def output_args(env: Mapping[str, str]) -> list[str]:
    """Run directory, checkpoints, and resuming from the last checkpoint a spot interruption left behind."""
    return [
        "--trainer.default_root_dir", env.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"),
        "--checkpoint.dirpath", CHECKPOINT_DIR,
        "--last_checkpoint.every_n_steps", "500",  # a spot interruption loses at most this many steps
        "--ckpt_path", "last",  # none on a first start: training starts fresh
    ]


def configs_first(user_args: list[str]) -> tuple[list[str], list[str]]:
    """Split ``--config a,b`` out of the hyperparameters. They must come before every option: a YAML read after an
    option overrides it, and SageMaker orders hyperparameters its own way. A comma composes several configs."""
    configs, rest, i = [], [], 0
    while i < len(user_args):
        arg = user_args[i]
        if arg == "--config" and i + 1 < len(user_args):
            configs += [a for c in user_args[i + 1].split(",") if c for a in ("--config", c)]
            i += 2
            continue
        if arg.startswith("--config="):
            configs += [a for c in arg.split("=", 1)[1].split(",") if c for a in ("--config", c)]
        else:
            rest.append(arg)
        i += 1
    return configs, rest


def build_argv(env: Mapping[str, str], user_args: list[str]) -> list[str]:
    """The full ``taskhead`` argv. Hyperparameters go last, so they override the environment's values."""
    configs, rest = configs_first(user_args)
    if not configs:
        raise SetupError("no --config hyperparameter: pass e.g. hyperparameters={'config': 'configs/imdb.yaml'}")
    return ["fit", *configs, *data_args(env), *trainer_args(env), *output_args(env), *rest]


def best_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint to export: the single ``best-*.ckpt`` (save_top_k 1, the default), else ``last.ckpt``."""
    ckpt_dir = Path(ckpt_dir)
    best = sorted(ckpt_dir.glob("best-*.ckpt"))
    if len(best) == 1:
        return best[0]
    last = ckpt_dir / "last.ckpt"
    return last if last.is_file() else None


def main(argv: list[str] | None = None, env: Mapping[str, str] = os.environ) -> None:
    try:
        taskhead_argv = build_argv(env, sys.argv[1:] if argv is None else argv)
    except SetupError as e:
        print(f"entry.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    rank0 = env.get("RANK", "0") == "0"  # torchrun sets RANK; every process runs this file
    if rank0:
        print("taskhead " + " ".join(taskhead_argv), flush=True)

    from taskhead.cli import main as taskhead_main

    taskhead_main(taskhead_argv)
    model_dir = env.get("SM_MODEL_DIR")
    if model_dir and rank0:  # every rank returns here after fit; rank 0 exports once
        ckpt_dir = option_value(taskhead_argv, "--checkpoint.dirpath", CHECKPOINT_DIR)
        ckpt = best_checkpoint(ckpt_dir)
        if ckpt is None:
            print(f"entry.py: no checkpoint in {ckpt_dir}; nothing exported to {model_dir}", file=sys.stderr)
            return
        taskhead_main(["export", "--ckpt_path", str(ckpt), "--out", model_dir])


if __name__ == "__main__":
    main()
