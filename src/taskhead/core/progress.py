"""What a run prints: progress lines where no terminal draws a bar, one line per validation, the best checkpoint at
the end, and a clean stop on SIGTERM/SIGINT.

In a terminal Rich draws the bar. In a log file (background runs, CI, SLURM) a redrawn bar is useless: ``LineProgress``
prints a plain line at least every ``every_s`` seconds with step/total, loss, real tokens/s and the ETA.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.utilities import rank_zero_info

from taskhead.core.callbacks import model_checkpoint


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def scalar_metrics(metrics: dict, prefix: str) -> dict[str, float]:
    """``stage/name`` scalars only (per-class ``stage/name/label`` entries are left to metrics.json)."""
    out = {}
    for k, v in metrics.items():
        if k.startswith(prefix) and k.count("/") == 1:
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                continue
    return out


class LineProgress(ProgressBar):
    """Plain progress lines for non-terminals: ``[train] step 40/113 (35%) · loss 0.412 · 1,830 tok/s · ETA 1:02``.

    Args:
        every_s: Print at least this often (seconds); also at the first step and the last.
    """

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._enabled = True
        self._t0 = self._last = 0.0
        self._tokens = 0
        self._step0 = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args, **kwargs) -> None:
        if self._enabled:
            print(*args, **kwargs, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._last = time.perf_counter()
        self._step0 = trainer.global_step  # a resumed run: the rate counts this process's steps only
        self._tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = batch.get("stats") if isinstance(batch, dict) else None
        self._tokens += stats["tokens"] if stats else 0
        now = time.perf_counter()
        total = int(trainer.estimated_stepping_batches)
        step = trainer.global_step
        if not self._enabled or not (step - self._step0 == 1 or step >= total or now - self._last >= self.every_s):
            return
        self._last = now
        elapsed = now - self._t0
        done = max(step - self._step0, 1)
        eta = elapsed / done * (total - step)
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"[train] epoch {trainer.current_epoch} step {step}/{total} ({step / max(total, 1):.0%})"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"{self._tokens / max(elapsed, 1e-9):,.0f} tok/s")
        parts.append(f"elapsed {_fmt_duration(elapsed)} · ETA {_fmt_duration(eta)}")
        print(" · ".join(parts), flush=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._enabled and not trainer.sanity_checking:
            n = sum(trainer.num_val_batches) if isinstance(trainer.num_val_batches, list) else trainer.num_val_batches
            print(f"[val] validating ({n} batches) ...", flush=True)

    def _eval_start(self, trainer, stage: str, batches) -> None:
        if self._enabled:
            n = sum(batches) if isinstance(batches, list) else batches
            print(f"[{stage}] {n} batches ...", flush=True)

    def on_test_start(self, trainer, pl_module) -> None:
        self._eval_start(trainer, "test", trainer.num_test_batches)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._eval_start(trainer, "predict", trainer.num_predict_batches)


class RunSummary(Callback):
    """One line per validation during ``fit`` (its scalar metrics), and at the end of ``fit`` the best checkpoint:
    ``best val/acc 0.8740 at step 1200: runs/imdb/version_0/checkpoints/best-step=1200-val_acc=0.8740.ckpt``."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = scalar_metrics(trainer.callback_metrics, "val/")
        if metrics:
            text = " · ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
            rank_zero_info(f"[val] epoch {trainer.current_epoch} step {trainer.global_step}: {text}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(best_line(trainer))


def best_line(trainer: L.Trainer) -> str:
    cb = model_checkpoint(trainer)
    if cb is None or not getattr(cb, "monitor", None):
        return "[fit] done (no checkpoint callback monitors a metric)"
    if not cb.best_model_path or cb.best_model_score is None:
        return f"[fit] done: no checkpoint was selected by {cb.monitor} (did validation run?)"
    m = re.search(r"step=(\d+)", Path(cb.best_model_path).name)
    at = f" at step {m[1]}" if m else ""
    return f"[fit] best {cb.monitor} {float(cb.best_model_score):.4f}{at}: {cb.best_model_path}"


class GracefulStop(Callback):
    """SIGINT (Ctrl+C) during ``fit`` stops like SIGTERM: at the end of the current batch, through Lightning's own
    SIGTERM path, so ``LastCheckpoint`` writes a consistent ``last.ckpt``. A second Ctrl+C interrupts at once.

    ``validate``, ``test`` and ``predict`` stop on SIGTERM too, at the end of the current batch, writing nothing:
    Lightning's handler only notes the signal, and only its training loop looks (a cluster's SIGTERM before the kill
    would otherwise go unheard until the whole split was done)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.getsignal(signal.SIGINT)
        connector = trainer._signal_connector

        def on_sigint(signum, frame):
            if connector.received_sigterm:  # the second Ctrl+C
                raise KeyboardInterrupt
            self.signal_name = "SIGINT"
            print("\n[fit] SIGINT: stopping after this batch and writing last.ckpt (Ctrl+C again to abort)",
                  file=sys.stderr, flush=True)
            connector.received_sigterm = True

        signal.signal(signal.SIGINT, on_sigint)

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        if trainer.state.fn != "fit" and trainer._signal_connector.received_sigterm:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        self._stop_if_signalled(trainer)

    def on_test_batch_end(self, trainer, *args, **kwargs) -> None:
        self._stop_if_signalled(trainer)

    def on_predict_batch_end(self, trainer, *args, **kwargs) -> None:
        self._stop_if_signalled(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()
        if type(exception).__name__ == "SIGTERMException":
            exception.signal_name = self.signal_name or "SIGTERM"  # read by taskhead's main() for the exit status
            exception.stage = trainer.state.fn.value
