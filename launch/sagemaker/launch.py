"""Submit ``taskhead fit`` as a SageMaker training job (PyTorch DLC, torchrun across all GPUs of all instances).

    pip install "sagemaker>=2.200,<3"          # on the machine that submits; SDK v3 dropped the Estimator classes
    python launch/sagemaker/launch.py --role arn:aws:iam::123456789012:role/SageMakerRole \\
        --train s3://bucket/imdb/train.jsonl --test s3://bucket/imdb/test.jsonl \\
        --instance-type ml.g5.12xlarge --instance-count 2 --config configs/imdb.yaml \\
        --trainer.max_epochs 2 --data.batch_size 32          # any other option goes to taskhead fit

It stages a small source directory (entry.py, the taskhead package, configs/, requirements.txt), not the whole
repository, and starts the job without waiting (``--wait`` to stream its logs). Inside the container entry.py maps the
channels, hosts and output directories onto taskhead's options. Model artefacts: the exported best checkpoint in the
job's model.tar.gz; TensorBoard logs and metrics.json in output.tar.gz; checkpoints in --checkpoint-s3-uri.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CHANNELS = ("train", "validation", "test")
CHECKPOINT_DIR = "/opt/ml/checkpoints"  # entry.CHECKPOINT_DIR
# The DLC provides torch (built for its CUDA); reinstalling it from requirements.txt would replace it.
PROVIDED_BY_CONTAINER = {"torch"}


def requirements(root: Path = ROOT) -> list[str]:
    """taskhead's runtime dependencies from pyproject.toml, less those the PyTorch container provides."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() not in PROVIDED_BY_CONTAINER]


def stage_source(dest: Path, root: Path = ROOT) -> Path:
    """Write the job's source_dir: entry.py, taskhead/ (importable from /opt/ml/code), configs/, requirements.txt.

    No setup.py: SageMaker's torch_distributed launcher refuses entry points that are Python packages.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(HERE / "entry.py", dest / "entry.py")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root / "src" / "taskhead", dest / "taskhead", ignore=skip, dirs_exist_ok=True)
    shutil.copytree(root / "configs", dest / "configs", ignore=skip, dirs_exist_ok=True)
    (dest / "requirements.txt").write_text("\n".join(requirements(root)) + "\n")
    return dest


def hyperparameters(config: str, taskhead_args: list[str]) -> dict[str, str]:
    """``--config`` plus pass-through ``--key value`` options, as the string hyperparameters SageMaker hands back to
    entry.py as ``--key value`` (entry.py puts the configs first again)."""
    hp = {"config": config}
    i = 0
    while i < len(taskhead_args):
        arg = taskhead_args[i]
        if not arg.startswith("--"):
            raise SystemExit(f"launch.py: error: expected --option value, got '{arg}'")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(taskhead_args):
            key, value = arg[2:], taskhead_args[i + 1]
            i += 2
        else:
            raise SystemExit(f"launch.py: error: {arg} needs a value")
        hp[key] = value
    return hp


def build_estimator(args: argparse.Namespace, source_dir: Path, hp: dict[str, str]):
    """The ``sagemaker.pytorch.PyTorch`` estimator and its input channels. Imports the SDK here only."""
    try:
        from sagemaker.inputs import TrainingInput
        from sagemaker.pytorch import PyTorch
    except ImportError as e:
        raise SystemExit(f"launch.py needs the SageMaker Python SDK v2: pip install 'sagemaker>=2.200,<3' ({e})") from None

    spot = {"use_spot_instances": True, "max_wait": args.max_run * 2} if args.spot else {}
    estimator = PyTorch(
        entry_point="entry.py",
        source_dir=str(source_dir),
        role=args.role,
        instance_type=args.instance_type,
        instance_count=args.instance_count,
        framework_version=args.framework_version,
        py_version=args.py_version,
        distribution={"torch_distributed": {"enabled": True}},  # torchrun: one process per GPU on every instance
        hyperparameters=hp,
        environment={"TOKENIZERS_PARALLELISM": "false", "NCCL_DEBUG": "WARN"},
        checkpoint_s3_uri=args.checkpoint_s3_uri,
        checkpoint_local_path=CHECKPOINT_DIR,
        max_run=args.max_run,
        base_job_name=args.job_name,
        disable_profiler=True,
        **spot,
    )
    inputs = {c: TrainingInput(s3_data=getattr(args, c)) for c in CHANNELS if getattr(args, c)}
    return estimator, inputs


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    # allow_abbrev off: a taskhead option passes through, never read as an abbreviation of one of ours
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--role", required=True, help="IAM role ARN the job runs as")
    for c in CHANNELS:
        p.add_argument(f"--{c}", help=f"S3 URI of the {c} data file (one object: the channel must hold one file)")
    p.add_argument("--config", default="configs/imdb.yaml", help="taskhead YAML(s), comma-separated, relative to the repo")
    p.add_argument("--instance-type", default="ml.g5.12xlarge", help="4 x A10G; ml.p4d.24xlarge: 8 x A100")
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--framework-version", default="2.5", help="a PyTorch DLC version SageMaker offers")
    p.add_argument("--py-version", default="py311")
    p.add_argument("--checkpoint-s3-uri", help="sync /opt/ml/checkpoints here (needed to resume spot jobs)")
    p.add_argument("--spot", action="store_true", help="managed spot training (needs --checkpoint-s3-uri)")
    p.add_argument("--max-run", type=int, default=24 * 3600, help="seconds")
    p.add_argument("--job-name", default="taskhead")
    p.add_argument("--wait", action="store_true", help="stream the job's logs until it ends")
    args, taskhead_args = p.parse_known_args(argv)
    if args.spot and not args.checkpoint_s3_uri:
        p.error("--spot needs --checkpoint-s3-uri: an interrupted job resumes from the checkpoints synced there")
    return args, taskhead_args


def main(argv: list[str] | None = None) -> None:
    args, taskhead_args = parse_args(argv)
    hp = hyperparameters(args.config, taskhead_args)
    with tempfile.TemporaryDirectory(prefix="taskhead-sm-") as tmp:
        source_dir = stage_source(Path(tmp) / "source")
        estimator, inputs = build_estimator(args, source_dir, hp)
        estimator.fit(inputs or None, wait=args.wait)  # uploads source_dir before returning
    print(f"submitted {estimator.latest_training_job.name}", file=sys.stderr)


if __name__ == "__main__":
    main()
