"""Run artifacts every task gets: throughput logging, the run manifest, metrics.json, predictions.jsonl.

Files land in the run directory (``trainer.log_dir``: TensorBoard events, config.yaml and checkpoints beside them) and
are written atomically: a temp file renamed into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

PACKAGES = ("taskhead", "torch", "lightning", "transformers", "datasets", "tokenizers", "torchmetrics", "jsonargparse")


def replace_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """``write(file)`` into a temp file beside ``path``, fsync, rename over ``path``: readers (and a resume after a
    kill) see the old file or the new one, never a partial one. The temp name never looks like ``last*.ckpt``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: str | Path, text: str) -> Path:
    return replace_atomic(path, lambda f: f.write(text.encode("utf-8")))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with local files replaced atomically (:func:`replace_atomic`).

    Lightning's own save stages local files in the system temp directory and moves them into place, which is a copy,
    not a rename, when the two are on different filesystems (a cluster's scratch disk): a kill then can leave a
    truncated ``last.ckpt``. Remote URLs (``s3://``...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        replace_atomic(path, lambda f: torch.save(checkpoint, f))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory, without a collective: ``trainer.log_dir`` broadcasts from rank 0, and the writers below
    run on rank 0 alone, so calling it there deadlocks DDP. The logger's own ``log_dir`` is what rank 0 broadcasts."""
    log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
    return Path(log_dir or trainer.default_root_dir)


def sha256_file(path: str | Path) -> str:
    """The file's SHA-256, read once per process for a given (path, size, mtime): a resumed fit compares the data with
    its run's manifest and then writes the manifest again, and a 10 GB file should not be read twice for that."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_versions(names) -> dict[str, str | None]:
    """Installed version of each distribution (None where it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(cwd: str | Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class RunManifest(SaveConfigCallback):
    """LightningCLI's config saver, extended: config.yaml plus manifest.json (versions, data hashes, seed, git)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        stage = str(getattr(stage, "value", stage))  # Lightning passes its TrainerFn enum
        dm = trainer.datamodule
        files = dm.data_files() if hasattr(dm, "data_files") else {}
        manifest = {
            "stage": stage,
            "command": sys.argv,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": package_versions(PACKAGES),
            "seed": self.config.get("seed_everything"),
            # a file this stage does not read may be gone (test/predict on a checkpoint whose train file was deleted)
            "data_files": {s: {"path": str(p), "sha256": sha256_file(p) if Path(p).is_file() else None} for s, p in files.items()},
            "git_commit": {"cwd": git_commit(Path.cwd()), "taskhead": git_commit(Path(__file__).parent)},
            "config": self.parser.dump(self.config, skip_none=False),
        }
        # fit writes manifest.json; test/validate/predict in the same run directory write manifest-<stage>.json
        name = "manifest.json" if stage == "fit" else f"manifest-{stage}.json"
        write_json(run_dir(trainer) / name, manifest)


def model_checkpoint(trainer: L.Trainer | None) -> ModelCheckpoint | None:
    """The run's best-checkpoint callback (``trainer.checkpoint_callback`` is the first of any ``Checkpoint`` kind)."""
    callbacks = trainer.checkpoint_callbacks if trainer is not None else []
    return next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)


class LastCheckpoint(Checkpoint):
    """``last.ckpt``: the newest training state, for ``--ckpt_path last`` after a crash or a pre-emption.

    Written at the end of every training epoch (after its validation, so the best-score bookkeeping is current) and,
    with ``every_n_steps``, every that many optimiser steps, mid-epoch included: the checkpoint holds the training
    loader's position, so a resume continues the epoch. Lightning's ``ModelCheckpoint(save_last=True)`` refreshes
    ``last.ckpt`` only when it also saves a top-k checkpoint, so after an epoch that did not improve the monitored
    metric its ``last.ckpt`` is stale; this callback replaces it.

    A ``Checkpoint`` callback, so Lightning runs it after ``ModelCheckpoint`` (which it always moves last): at an
    epoch end where ``ModelCheckpoint`` saves a new best, ``last.ckpt`` then records it, and a resume knows its best.

    It holds the optimiser state (for an exact resume), so it is several times the size of the weights-only best
    checkpoint; ``enabled: false`` turns it off. On SIGTERM (a scheduler's pre-emption, ``kill``) or a first Ctrl+C,
    it is written at the end of the current batch before the run stops with a non-zero exit status.

    Args:
        enabled: Write last.ckpt at all (off: no resume after a crash; only the best checkpoint is kept).
        every_n_steps: Also save every N optimiser steps (pre-emptible jobs). None: at epoch ends only.
        dirpath: Where to write (default: the ``checkpoint`` callback's directory, ``<run dir>/checkpoints``).
    """

    FILENAME = "last.ckpt"

    def __init__(self, enabled: bool = True, every_n_steps: int | None = None, dirpath: str | None = None) -> None:
        self.enabled = enabled
        self.every_n_steps = every_n_steps
        self.dirpath = dirpath
        self._saved_step = -1
        self.last_path: Path | None = None

    def _save(self, trainer: L.Trainer) -> None:
        if not self.enabled or trainer.global_step == self._saved_step or trainer.sanity_checking or trainer.fast_dev_run:
            return
        ckpt_cb = model_checkpoint(trainer)
        dirpath = self.dirpath or getattr(ckpt_cb, "dirpath", None) or run_dir(trainer) / "checkpoints"
        self.last_path = Path(dirpath) / self.FILENAME
        trainer.save_checkpoint(self.last_path, weights_only=False)  # every rank calls it; rank 0 writes
        self._saved_step = trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """SIGTERM/SIGINT reach here from Lightning's loops at a batch boundary: the state is consistent, save it."""
        if type(exception).__name__ == "SIGTERMException" and trainer.state.fn == "fit":
            self._save(trainer)
            exception.last_checkpoint = self.last_path if self.enabled else None
            exception.global_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)


class Throughput(Callback):
    """Logs samples/s, real (non-pad) tokens/s and the share of padding, from counts the collate made on CPU.

    No host sync: the counts are Python ints computed in the data loader, and time is wall-clock between logs.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.samples = self.tokens = self.padded = 0
        self.t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = batch["stats"]
        self.samples += stats["samples"]
        self.tokens += stats["tokens"]
        self.padded += stats["padded"]
        if (batch_idx + 1) % trainer.log_every_n_steps == 0:
            dt = time.perf_counter() - self.t0
            pl_module.log_dict(
                {
                    "perf/samples_per_s": self.samples / dt,
                    "perf/tokens_per_s": self.tokens / dt,
                    "perf/padding_share": 1.0 - self.tokens / max(self.padded, 1),
                },
                on_step=True,
                on_epoch=False,
            )
            self._reset()


class RunArtifacts(BasePredictionWriter):
    """After ``test`` or ``validate``: metrics.json (+ the task's test artifacts). During ``predict``: each batch's
    predictions, every rank's, appended to a scratch file beside predictions.jsonl; at the end predictions.jsonl in
    input order, each line the input's id and fields, then its prediction. Memory holds one batch and 16 bytes per
    prediction (its index and offset), never the predictions: the CLI's predict also tells Lightning not to keep them
    (``return_predictions`` false).

    Args:
        predictions_file: Where ``predict`` writes its JSONL (default: ``<run dir>/predictions.jsonl``).
    """

    def __init__(self, predictions_file: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.predictions_file = predictions_file
        self._part: BinaryIO | None = None  # rank 0: the predictions so far, in the order they came

    def _write_metrics(self, trainer: L.Trainer, prefix: str, artifacts: dict) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        out = run_dir(trainer)
        write_json(out / "metrics.json", metrics)
        for name, obj in artifacts.items():
            write_json(out / name, obj)
        rank_zero_info(f"[{prefix.rstrip('/')}] metrics written to {out / 'metrics.json'}")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_metrics(trainer, "test/", getattr(pl_module, "test_artifacts", {}))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":  # the validate command, not validation inside fit
            self._write_metrics(trainer, "val/", {})

    def _path(self, trainer: L.Trainer) -> Path:
        return Path(self.predictions_file) if self.predictions_file else run_dir(trainer) / "predictions.jsonl"

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Rows are gathered batch by batch, a collective each: ranks with fewer batches (a QA rank whose questions have
        # fewer windows) gather nothing until every rank has had as many batches as the one with the most.
        total = sum(trainer.num_predict_batches)  # inf for a loader without a length: nothing to pad to
        self._batches, self._most = 0, max(pl_module.gather([int(total) if total != float("inf") else 0]))
        if trainer.is_global_zero:
            path = self._path(trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            # unlinked already: gone with its handle, also when the run is killed
            self._part = tempfile.TemporaryFile(dir=path.parent, prefix=".partial-predictions-")
            self._idx, self._offsets = array("q"), array("q")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        self._batches += 1
        self._write(pl_module.gather(list(prediction)))

    def _write(self, rows: list[dict]) -> None:
        if self._part is None:  # not rank 0
            return
        for row in rows:
            self._idx.append(row["idx"])
            self._offsets.append(self._part.tell())
            self._part.write(json.dumps({k: v for k, v in row.items() if k != "idx"}).encode() + b"\n")

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for _ in range(self._most - self._batches):  # this rank had fewer batches: meet the others' gathers
            self._write(pl_module.gather([]))
        if self._part is None:
            return
        import numpy as np

        part, self._part = self._part, None
        idx = np.frombuffer(self._idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        offsets = np.frombuffer(self._offsets, dtype=np.int64)
        inputs = getattr(trainer.datamodule, "predict_input_rows", None)

        def write(f: BinaryIO) -> None:
            for start in range(0, len(order), 10_000):
                sel = order[start : start + 10_000]
                fields = inputs(idx[sel]) if inputs is not None else [{}] * len(sel)
                for given, at in zip(fields, offsets[sel]):
                    part.seek(int(at))
                    f.write(json.dumps({**given, **json.loads(part.readline())}, ensure_ascii=False).encode() + b"\n")

        path = self._path(trainer)
        with part:
            replace_atomic(path, write)
        rank_zero_info(f"[predict] {len(order):,} predictions written to {path}")


class ValidateAtMaxSteps(Callback):
    """A run that ``max_steps`` ends in the middle of an epoch still validates once at its last step, so it has a
    validation score and a best checkpoint (Lightning validates only at epoch ends or every ``val_check_interval``).
    Done the way early stopping asks for a final validation: ``trainer.should_stop`` at the last step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            trainer.should_stop = True
