"""LightningCLI, as taskhead runs it: how a parsed config becomes a run.

The YAML names the task's DataModule and LightningModule by ``class_path``; links carry what the data knows into
the model (label names, label counts) and what the model knows into the data (which tokenizer, max_length). Before
anything is built, ``before_instantiate_classes`` applies the few rules that make a command line mean what it says:

- data files on the command line define the dataset (the config's Hub dataset, other split files and label names
  are dropped, and the run is named after the training file);
- ``--trainer.max_steps`` on the command line wins over the config's ``max_epochs``;
- ``--ckpt_path last`` resumes the newest run of this name only if its config and data match;
- ``test``/``validate``/``predict`` on a checkpoint write into that checkpoint's own run directory.
- ``test``/``validate``/``predict`` on a full fine-tune's checkpoint build the model from the config and tokenizer
  stored in it (``checkpoint_source``): the pretrained model need not be there, and its weights are not read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import yaml
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from taskhead.core.callbacks import (AtomicCheckpointIO, LastCheckpoint, RunArtifacts, RunManifest, Throughput,
                                     ValidateAtMaxSteps, sha256_file)
from taskhead.core.data import TaskDataModule
from taskhead.core.export import checkpoint_source, import_object
from taskhead.core.module import TaskModule
from taskhead.core.precision import bf16_warning, choose_precision
from taskhead.core.progress import GracefulStop, LineProgress, RunSummary
from taskhead.core.streaming import STREAMING_NEEDS_MAX_STEPS
from taskhead.errors import TaskheadError

DATASET_OPTIONS = ("dataset_name", "dataset_config", "train_file", "validation_file", "test_file", "predict_file",
                   "label_names")
DEFAULT_ROOT_DIR = "runs"
# The model's input format: set on the model, copied into the data module (TaskheadCLI._input_format)
MODEL_FORMAT = ("architecture", "source_prefix", "separator", "chat_template", "doc_stride")


class Trainer(L.Trainer):
    """Lightning's Trainer, with ``precision: auto`` as the default."""

    def __init__(self, *args: Any, precision: Literal["auto"] | _PRECISION_INPUT | None = "auto", **kwargs: Any) -> None:
        """
        Args:
            precision: ``auto`` (default): bf16-mixed on GPUs with bf16 and on CPUs with native bf16 (AVX512-BF16, AMX),
                16-mixed on older GPUs, 32-true otherwise. Or any Lightning precision (``32-true``, ``bf16-mixed``, ...).
        """
        accelerator = str(kwargs.get("accelerator") or "auto")
        if precision in ("auto", None):
            precision, why = choose_precision(accelerator)
            rank_zero_info(f"[precision] auto → {precision}: {why}")
        elif warning := bf16_warning(str(precision), accelerator):
            rank_zero_warn(warning)
        super().__init__(*args, precision=precision, **kwargs)


def given_on_command_line(argv: list[str], key: str) -> bool:
    """Whether ``--key`` (``--data.train_file``, also written ``--data.init_args.train_file`` or ``--key=value``) is
    an option on the command line itself, not only in a ``--config`` file."""
    section, _, name = key.partition(".")
    forms = {f"--{key}", f"--{section}.init_args.{name}"} if name else {f"--{key}"}
    return any(arg.split("=", 1)[0] in forms for arg in argv)


def init_defaults(class_path: str) -> dict[str, Any]:
    """Default value of each ``__init__`` argument of the class at ``class_path``."""
    import inspect

    params = inspect.signature(import_object(class_path).__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def run_name_from_file(path: str) -> str:
    """``data/my_reviews.csv.gz`` → ``my_reviews``."""
    name = Path(Path(path).name.removesuffix(".gz")).stem
    return re.sub(r"[^\w.-]+", "_", name) or "run"


def run_dir_of_checkpoint(ckpt: str | None) -> Path | None:
    """``<root>/<name>/version_N/checkpoints/x.ckpt`` → ``<root>/<name>/version_N``; None for any other place."""
    if not ckpt or "://" in ckpt:
        return None
    path = Path(ckpt)
    if path.parent.name == "checkpoints" and path.parent.parent.name.startswith("version_"):
        return path.parent.parent
    return None


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# Options that do not change what training computes: they may differ between a run and its resume.
RESUME_FREE = ("num_workers", "cache_dir", "eval_batch_size", "test_file", "predict_file", "max_eval_samples")


def config_differences(saved: dict, now: dict, sections=("seed_everything", "model", "data")) -> list[str]:
    """``key: saved → now`` for every option in ``sections`` that differs between two dumped configs (evaluation-only
    data options aside)."""
    a = flat({k: saved.get(k) for k in sections})
    b = flat({k: now.get(k) for k in sections})
    keys = [k for k in sorted(a.keys() | b.keys()) if not k.endswith(RESUME_FREE)]
    return [f"{k}: {a.get(k)!r} (that run) vs {b.get(k)!r} (now)" for k in keys if a.get(k) != b.get(k)]


@dataclass
class EarlyStoppingConfig:
    """Stop when the validation metric stops improving. Its state (the best score, the validations without
    improvement) is saved in ``last.ckpt``, so a resumed run keeps counting where it stopped.

    Args:
        monitor: The metric to watch (default: the checkpoint's ``monitor``).
        patience: Validations without improvement before stopping.
        mode: ``max`` or ``min`` (default: the checkpoint's ``mode``).
        min_delta: The least change that counts as an improvement.
    """

    monitor: str | None = None
    patience: int = 3
    mode: Literal["max", "min"] | None = None
    min_delta: float = 0.0


class TaskheadCLI(LightningCLI):
    def __init__(self, *args: Any, args_list: list[str] | None = None, **kwargs: Any) -> None:
        self.argv = list(args_list or [])
        self.model_facts: dict = {}  # label names and counts of the checkpoint that validate/test/predict evaluates
        self._checkpoint: tuple[str, dict] | None = None  # (path, memory-mapped checkpoint): read once per command
        self.run_location: tuple[str, str, str | None] | None = None  # (root, name, version) of this run
        with contextlib.ExitStack() as self.for_the_run:  # open while the subcommand runs (checkpoint_source)
            super().__init__(*args, args=args_list, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--name", type=str | None, default=None,
                            help="Run name: a run lives in <trainer.default_root_dir>/<name>/version_N. Default: the "
                                 "config's name, or the training file's name when --data.train_file is given.")
        parser.add_argument("--early_stopping", type=EarlyStoppingConfig | None, default=None,
                            help="Early stopping, e.g. {patience: 3}; null (default): off")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # best-step=N-<metric>=V.ckpt (weights only) by the monitored metric; last.ckpt (full state) from LastCheckpoint
        parser.set_defaults({"checkpoint.save_last": False, "checkpoint.auto_insert_metric_name": False,
                             "checkpoint.save_weights_only": True})
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(RunArtifacts, "artifacts")
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.model_name_or_path")
        parser.link_arguments("data.init_args.max_length", "model.init_args.max_length")
        parser.link_arguments("data.init_args.problem_type", "model.init_args.problem_type")  # classification only

    # ---- the one link from data to model ---------------------------------------------------------------------------
    def instantiate_classes(self) -> None:
        """The data module first, connected to this run's stage (it reads and checks only the splits the stage
        needs; evaluating a checkpoint, its model's label set stands in for train). What it learnt from the data
        (``model_args``: label names and counts, choices per example) fills those arguments of the model: the one
        link from data to model, for only the arguments the task's module has. Then the model, trainer and callbacks
        as Lightning builds them, with that data module."""
        config = self.config.clone()  # self.config stays as parsed: config.yaml records what was asked for
        cfg = config[self.subcommand]
        datamodule = instantiate_class((), cfg.data.as_dict())
        datamodule.connect(self.subcommand, self.model_facts)
        model_args = cfg.model.init_args
        for key, value in datamodule.model_args().items():
            given = model_args.get(key)
            # evaluating a checkpoint, ``given`` is its model's (Lightning reads the checkpoint's hparams into the
            # config): the data's value goes in, and loading the checkpoint says what differs (e.g. label order)
            if given is not None and value is not None and given != value and self.subcommand == "fit":
                raise TaskheadError(f"the data has {value} for model.{key} but --model.init_args.{key} is {given}: "
                                    f"set it to {value}, or leave it out (the data sets it)")
            model_args[key] = value if value is not None else given
        cfg.data = datamodule  # jsonargparse keeps an instance as it is
        self.config_init = self.parser.instantiate_classes(config)
        self.datamodule = datamodule
        self.model = self._get(self.config_init, "model")
        self._add_configure_optimizers_method_to_model(self.subcommand)
        self.trainer = self.instantiate_trainer()

    def _parse_ckpt_path(self) -> None:
        """As Lightning does: the checkpoint's hyper-parameters become the model's config, so ``--ckpt_path`` alone
        rebuilds the model it was trained with. Here the checkpoint is memory-mapped (its weights are not read), and
        arguments its task no longer takes are dropped first (``TaskModule.known_hparams``: a checkpoint of an older
        taskhead still loads)."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(self._load_checkpoint(ckpt_path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        if not hparams or not class_path:
            return super()._parse_ckpt_path()
        cls = import_object(class_path)
        if isinstance(cls, type) and issubclass(cls, TaskModule):
            hparams = cls.known_hparams(hparams)
        self.config = self.parser.parse_object({sub: {"model": {"class_path": class_path, "dict_kwargs": hparams}}}, self.config)

    def _load_checkpoint(self, path: str) -> dict:
        """The checkpoint at ``path``, memory-mapped (its weights are not read), loaded once for both of its readers:
        its hyper-parameters (``_parse_ckpt_path``) and its stored source and label set (``before_instantiate_classes``)."""
        if self._checkpoint is None or self._checkpoint[0] != path:
            import torch

            self._checkpoint = (path, torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        return self._checkpoint[1]

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # Checkpoints hold plain values only: load them without unpickling arbitrary objects (and without the warning)
        parser.set_defaults({"weights_only": True})
        if subcommand == "predict":  # RunArtifacts writes each batch's predictions: Lightning need not keep them all
            parser.set_defaults({"return_predictions": False})
        return parser

    # ---- the rules, applied to the parsed config before anything is built -------------------------------------------
    def before_instantiate_classes(self) -> None:
        sub, cfg = self.subcommand, self.config[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        if ckpt not in (None, "last", "best", "hpc") and "://" not in ckpt and not Path(ckpt).is_file():
            raise TaskheadError(f"{ckpt}: file not found (--ckpt_path)")  # before any run directory is made
        self._own_data(cfg)
        self._input_format(cfg)
        self._max_steps(cfg)
        if sub == "fit" and cfg.data.init_args.get("streaming") and cfg.trainer.get("max_steps") in (None, -1):
            raise TaskheadError(STREAMING_NEEDS_MAX_STEPS)  # before any run directory is made (the data module checks too)
        self._checkpoint_name(cfg)
        root = cfg.trainer.get("default_root_dir") or DEFAULT_ROOT_DIR
        name = cfg.get("name") or type_name(cfg)
        self.run_location = (str(root), name, None)
        if ckpt == "last" and cfg.checkpoint.dirpath is None and cfg.last_checkpoint.dirpath is None:
            self._resolve_last(cfg, Path(root) / name, resume=sub == "fit")
        elif sub != "fit" and (run := run_dir_of_checkpoint(cfg.get("ckpt_path"))):
            # evaluate a checkpoint inside its own run directory: metrics.json, predictions.jsonl and TensorBoard
            # events land beside the training run's; the fit's config.yaml and manifest.json stay as they are
            self.run_location = (str(run.parent.parent), run.parent.name, run.name)
            self.save_config_kwargs.update(config_filename=f"config-{sub}.yaml", overwrite=True)
        if sub != "fit" and cfg.get("ckpt_path") and Path(cfg.ckpt_path).is_file():
            # the model is built before Lightning reads the checkpoint: build it from the checkpoint's own config and
            # tokenizer, not from the pretrained weights that the checkpoint's then replace (no "newly initialised")
            ckpt = self._load_checkpoint(cfg.ckpt_path)
            self.for_the_run.enter_context(checkpoint_source(ckpt))
            self.model_facts = checkpoint_facts(ckpt)
        self._checkpoint = None  # Lightning reads the weights itself
        if sub in ("test", "validate") and not cfg.get("ckpt_path"):
            rank_zero_info(f"[{sub}] no --ckpt_path: evaluating the pretrained model as configured (a new head is untrained)")

    def _own_data(self, cfg) -> None:
        """Split files given on the command line define the dataset: what the config set for another dataset is
        dropped (its Hub dataset, its other split files, its label names), said in one line."""
        init = cfg.data.init_args
        if not given_on_command_line(self.argv, "data.train_file") or not init.get("train_file"):
            return
        dropped = []
        for option in DATASET_OPTIONS:
            if option in init and init[option] is not None and not given_on_command_line(self.argv, f"data.{option}"):
                dropped.append(f"{option}={init[option]}")
                init[option] = None
        if dropped:
            rank_zero_info(f"[data] --data.train_file given: it defines the dataset; dropped from the config: {', '.join(dropped)}")
        if not given_on_command_line(self.argv, "name"):
            cfg.name = run_name_from_file(init.train_file)

    def _input_format(self, cfg) -> None:
        """The model owns its input format (the architecture, a source's prefix and separator, the chat template,
        QA's window stride): the data module takes it from the model, so it is written once. A different value set
        on the data side stops the run instead of becoming a second source of truth."""
        model, data = cfg.model.init_args, cfg.data.init_args
        defaults = init_defaults(cfg.data.class_path)
        for key in MODEL_FORMAT:
            if key not in model or key not in data:
                continue
            if data[key] != model[key] and data[key] != defaults.get(key):
                raise TaskheadError(f"--data.{key} {data[key]!r} differs from --model.{key} {model[key]!r}: the model owns "
                                    f"the input format; set it once, as model.{key}")
            data[key] = model[key]

    def _max_steps(self, cfg) -> None:
        t = cfg.trainer
        if t.get("max_steps", -1) not in (None, -1) and given_on_command_line(self.argv, "trainer.max_steps") \
                and t.get("max_epochs") not in (None, -1) and not given_on_command_line(self.argv, "trainer.max_epochs"):
            rank_zero_info(f"[trainer] --trainer.max_steps {t.max_steps} given: the config's max_epochs {t.max_epochs} no longer applies")
            t.max_epochs = -1

    def _checkpoint_name(self, cfg) -> None:
        ck = cfg.checkpoint
        if ck.get("filename") is None and ck.get("monitor"):
            metric = ck.monitor
            ck.filename = f"best-step={{step}}-{metric.replace('/', '_')}={{{metric}:.4f}}"
        elif ck.get("filename") is None:
            ck.filename = "best-step={step}"

    def _resolve_last(self, cfg, runs: Path, resume: bool) -> None:
        """``--ckpt_path last`` → the newest ``last.ckpt`` under ``<root>/<name>/version_*``, if that run's config and
        data files match this one (its manifest.json has both); ``fit`` continues in that version directory.

        Lightning's own "last" looks only in the new run's (empty) version directory. No earlier run: ``fit`` starts
        fresh (a first SLURM job and its requeues use the same command); the other subcommands stop."""
        found = sorted(runs.glob(f"version_*/checkpoints/{LastCheckpoint.FILENAME}"), key=lambda p: p.stat().st_mtime)
        if not found:
            if not resume:
                raise TaskheadError(f"--ckpt_path last: no last.ckpt under {runs}/version_*/checkpoints")
            print(f"[resume] no last.ckpt under {runs}/version_*/checkpoints: starting a new run", file=sys.stderr)
            cfg.ckpt_path = None
            return
        last, run = found[-1], found[-1].parents[1]
        self._check_same_run(cfg, run)
        cfg.ckpt_path = str(last)
        print(f"[resume] --ckpt_path last → {cfg.ckpt_path}", file=sys.stderr)
        if resume:
            self.run_location = (str(runs.parent), runs.name, run.name)
            self.save_config_kwargs["overwrite"] = True  # the resumed run's config.yaml replaces the first one's

    def _check_same_run(self, cfg, run: Path) -> None:
        manifest_file = run / "manifest.json"
        if not manifest_file.is_file():
            return  # a run from before manifests, or killed before setup: nothing to compare
        manifest = json.loads(manifest_file.read_text())
        saved = manifest.get("config")
        saved = yaml.safe_load(saved) if isinstance(saved, str) else saved or {}
        now = yaml.safe_load(self._parser(self.subcommand).dump(cfg, skip_none=False))
        diffs = config_differences(saved, now)
        for split, entry in (manifest.get("data_files") or {}).items():
            path = entry.get("path")
            if path and Path(path).is_file() and sha256_file(path) != entry.get("sha256"):
                diffs.append(f"{split} file {path}: its content changed since that run (sha256)")
        if diffs:
            shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
            raise TaskheadError(f"--ckpt_path last: the newest run {run} was trained with a different config or data: "
                                f"{shown}. Give --name NEW for a new run, or --ckpt_path PATH to choose a checkpoint")

    # ---- the trainer ------------------------------------------------------------------------------------------------
    def instantiate_trainer(self, **kwargs: Any):
        trainer_cfg = self._get(self.config_init, "trainer")
        root, name, version = self.run_location or (DEFAULT_ROOT_DIR, "taskhead", None)
        kwargs.setdefault("default_root_dir", root)
        kwargs["logger"] = self._loggers(trainer_cfg.get("logger"), root, name, version)
        # Always on, whatever the YAML's callback list says: they only observe the run.
        # Rich in a terminal; in a log file (background runs, CI) plain lines at least every 30 s.
        extra = [Throughput(), RunSummary(), GracefulStop(), ValidateAtMaxSteps()]
        if (stop := self._get(self.config_init, "early_stopping")) is not None:
            ck = self._get(self.config_init, "checkpoint")
            monitor = stop.monitor or ck.monitor
            if not monitor:
                raise TaskheadError("--early_stopping needs a monitor (or --checkpoint.monitor)")
            extra.append(EarlyStopping(monitor=monitor, patience=stop.patience, min_delta=stop.min_delta,
                                       mode=stop.mode or ck.mode or "min"))
        if trainer_cfg.get("enable_progress_bar") is not False:
            extra.append(RichProgressBar(leave=True) if sys.stdout.isatty() else LineProgress())
        if kwargs["logger"] is not False:
            extra.append(LearningRateMonitor(logging_interval="step"))
        kwargs["callbacks"] = [*as_list(trainer_cfg.get("callbacks")), *extra]
        if not trainer_cfg.get("plugins") and not any(s in str(trainer_cfg.get("strategy")).lower() for s in ("deepspeed", "fsdp")):
            kwargs["plugins"] = [AtomicCheckpointIO()]  # sharded strategies write checkpoint directories their own way
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def _loggers(configured, root: str, name: str, version: str | None):
        """The run directory is always ``<root>/<name>/version_N``, owned by a TensorBoard logger; experiment trackers
        given as ``--trainer.logger`` (MLflow, W&B, CSV, any Lightning logger) log beside it, so the run directory,
        manifest, metrics.json, predictions and ``--ckpt_path last`` are the same whichever tracker is used."""
        if configured is False:
            return False
        run_logger = TensorBoardLogger(save_dir=root, name=name, version=version, default_hp_metric=False)
        trackers = [t for t in as_list(None if configured is True else configured) if not isinstance(t, TensorBoardLogger)]
        if len(trackers) < len(as_list(None if configured is True else configured)):
            rank_zero_info(f"[logger] TensorBoard logs go to the run directory under {root}/{name}; the configured "
                           "TensorBoardLogger's own save_dir is not used")
        for tracker in trackers:
            rank_zero_info(f"[logger] also logging to {type(tracker).__name__}")
        return [run_logger, *trackers]

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> L.Trainer:
        if config.get("enable_checkpointing") is False:  # Lightning's own switch turns taskhead's checkpoints off too
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint | LastCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)


def checkpoint_facts(ckpt: dict) -> dict:
    """The label names and counts a loaded checkpoint's model was trained with (its hparams); empty for a task without
    a label set."""
    hparams = ckpt.get("hyper_parameters") or {}
    if not hparams.get("label_names"):
        return {}
    return {"label_names": list(hparams["label_names"]), "label_counts": hparams.get("label_counts")}


def type_name(cfg) -> str:
    """Fallback run name: the task module's class name, e.g. ``ClassificationModule`` → ``classification``."""
    cls = str(cfg.model.get("class_path") or "taskhead")
    return cls.rsplit(".", 1)[-1].removesuffix("Module").lower() or "taskhead"


def as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def quiet() -> None:
    """Warnings and tips that are wrong or moot for taskhead runs, each with the reason it is safe to drop."""
    warnings.filterwarnings("ignore", message=".*custom batch sampler.*")  # ours returns every index, sorted
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # num_workers is an option; 0 is right for small data
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")  # main(argv) in Python
    warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")  # on_nonfinite_loss: skip, counted
    # Our batch sampler is resumable: its position is in the DataModule's state (tests/test_faults.py checks the resume
    # is exact), but Lightning only knows about stateful DataLoaders and warns that the resume is unreliable.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    warnings.filterwarnings("ignore", message=".*is not supported by the model summary.*")  # sizes are still right
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")  # torch pytree internals, not our call
    warnings.filterwarnings("ignore", message=".*dirpath.*has changed.*")  # evaluating a checkpoint from another place
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")  # resume in place
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLitLoggerTip())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per weight file loaded: noise in every log
    logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").setLevel(logging.WARNING)


def run_cli(args: list[str] | None = None) -> TaskheadCLI:
    quiet()
    args = list(sys.argv[1:] if args is None else args)
    subcommands = ("fit", "validate", "test", "predict")
    no_abbrev = {"allow_abbrev": False}
    return TaskheadCLI(
        TaskModule,
        TaskDataModule,
        trainer_class=Trainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunManifest,
        auto_configure_optimizers=False,  # the module builds its own from model.optimizer / model.scheduler
        trainer_defaults={"use_distributed_sampler": False},  # our batch samplers shard by rank themselves
        # parse errors raise (main() prints one line); no option abbreviations (--trainer.max_step is not max_steps)
        parser_kwargs={"default_env": False, "exit_on_error": False, **no_abbrev, **{s: dict(no_abbrev) for s in subcommands}},
        args_list=args,
    )
