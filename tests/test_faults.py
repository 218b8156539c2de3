"""Faults a long run must survive or explain: SIGKILL mid-epoch then ``--ckpt_path last``; NaN/inf losses (stop
naming the step, or skip and count); out-of-memory errors naming the options to lower."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from taskhead.cli import main
from taskhead.tasks.classification import ClassificationModule

from conftest import ROOT, cli_args, run_taskhead, write_jsonl

# 192 reviews, 10 % held out → 173 training examples → 11 batches of 16 per epoch (the shipped config: 2 epochs)
STEPS_PER_EPOCH, EPOCHS = 11, 2


class KillAtStep(Callback):
    """SIGKILL this process once ``global_step`` reaches ``step`` (no cleanup, no exception handlers run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def last_checkpoint(root, name: str = "last.ckpt") -> dict:
    path, = (root / "runs").rglob(name)
    return torch.load(path, map_location="cpu", weights_only=True)


def final_monitored(ckpt: dict, monitor: str) -> float:
    state, = (v for k, v in ckpt["callbacks"].items() if f"'monitor': '{monitor}'" in k)
    return float(state["current_score"])  # the last validation's value


# Every task resumes through TaskModule.on_load_checkpoint (RNG states, skipped batches) and TaskDataModule.state_dict
# (the loader's position): a task that overrides either and forgets super() resumes inexactly, so each task runs it.
# Per task: how to build its CLI arguments on small files, training batches per epoch, the checkpoint's monitor and a
# floor it must beat after 4 epochs (so that two runs that learned nothing cannot pass by agreeing).
@dataclass
class ResumeCase:
    args: Callable[[str, Path], list[str]]  # (tiny model, run root) → CLI arguments
    steps_per_epoch: int
    monitor: str | None  # None: no metric to compare (it stays at its floor in 4 epochs); the weights still must match
    floor: float = 0.0


def _classification(tiny_bert, review_files, tmp_path) -> ResumeCase:
    # 192 reviews, 10 % held out → 173 training examples → 11 batches of 16
    files = {"train": review_files["train"]}
    return ResumeCase(lambda model, root: cli_args(model, files, root), STEPS_PER_EPOCH, "val/acc", 0.6)


def _ner(tiny_bert, review_files, tmp_path) -> ResumeCase:
    from test_ner import make_conll, ner_args

    files = {}
    for split, n, seed in (("train", 160, 1), ("validation", 40, 2)):  # 160 sentences → 10 batches of 16
        (tmp_path / f"{split}.conll").write_text(make_conll(n, seed))
        files[split] = str(tmp_path / f"{split}.conll")
    return ResumeCase(lambda model, root: ner_args(model, files, root), 10, "val/f1", 0.8)  # reaches 0.96


def _multiple_choice(tiny_bert, review_files, tmp_path) -> ResumeCase:
    from test_multiple_choice import make_items, mc_args

    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", make_items(160, 1)))}  # 10 % held out → 9 batches
    return ResumeCase(lambda model, root: mc_args(model, files, root), 9, "val/acc", 0.4)  # chance: 0.25


def _qa(tiny_bert, review_files, tmp_path) -> ResumeCase:
    from test_qa import make_squad, qa_args

    files = {"train": make_squad(tmp_path / "train.json", 96, 1, "tr"), "validation": make_squad(tmp_path / "dev.json", 24, 2, "dev")}
    return ResumeCase(lambda model, root: qa_args(model, files, root), 11, "val/f1", 50.0)  # 174 windows → 11 batches


def _seq2seq(tiny_bert, review_files, tmp_path) -> ResumeCase:
    from test_seq2seq import cli, make_pairs

    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", make_pairs(96, 1)))}  # 10 % held out → 11 batches of 8
    # BERT2BERT, whole epochs (the shared helper trains 3 batches). A tiny random BERT2BERT generates nothing useful in
    # 4 epochs (val/rougeL stays 0, so ModelCheckpoint records no current score after the resume): only the weights are
    # compared, and dropout makes them differ on an inexact resume.
    return ResumeCase(lambda model, root: [*cli(model, "encoder_decoder", files, root), "--trainer.limit_train_batches", "1.0"],
                      11, None)


RESUME_CASES = {"classification": _classification, "ner": _ner, "multiple_choice": _multiple_choice, "qa": _qa,
                "seq2seq": _seq2seq}


@pytest.mark.parametrize("task", list(RESUME_CASES))
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(task, tiny_bert, review_files, tmp_path):
    case = RESUME_CASES[task](tiny_bert, review_files, tmp_path)
    fast = ("--last_checkpoint.every_n_steps", "3", "--model.optimizer.lr", "3e-3", "--model.scheduler.warmup_ratio", "0",
            "--trainer.max_epochs", "4")
    # the kill callback's module, and the caller's PYTHONPATH kept: the runs import the checkout under test
    env_path = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)}

    straight = tmp_path / "straight"
    proc = run_taskhead("fit", *case.args(tiny_bert, straight), *fast)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    args = [*case.args(tiny_bert, killed), *fast]
    kill = '{"class_path": "test_faults.KillAtStep", "init_args": {"step": 16}}'
    proc = run_taskhead("fit", *args, f"--trainer.callbacks+={kill}", env=env_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    at_kill = last_checkpoint(killed)
    assert at_kill["global_step"] == 15  # written at step 15, mid-way through the second epoch
    data_state, = (v for k, v in at_kill.items() if k.endswith("DataModule"))
    assert data_state == {"train_epoch": 15 // case.steps_per_epoch, "train_batches_done": 15 % case.steps_per_epoch}
    assert not list(killed.rglob("*.tmp"))  # nothing half-written: checkpoints land by rename

    proc = run_taskhead("fit", *args, "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[resume] --ckpt_path last" in proc.stderr
    resumed, reference = last_checkpoint(killed), last_checkpoint(straight)  # one version dir: the run continued

    assert resumed["global_step"] == reference["global_step"] == case.steps_per_epoch * 4
    if case.monitor:
        assert final_monitored(reference, case.monitor) > case.floor  # it learned something, so the comparison can fail
        assert final_monitored(resumed, case.monitor) == pytest.approx(final_monitored(reference, case.monitor), abs=1e-3)
    # same batches in the same order with the same dropout draws: the weights match, not just the metric
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_resume_with_nothing_to_resume_starts_fresh(tiny_bert, review_files, tmp_path):
    args = cli_args(tiny_bert, {"train": review_files["train"]}, tmp_path, "--trainer.max_steps", "2", "--ckpt_path", "last")
    proc = run_taskhead("fit", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no last.ckpt under" in proc.stderr and "starting a new run" in proc.stderr


@pytest.fixture
def loss_at(monkeypatch):
    """Replace the training loss of chosen batches (by index within the epoch) with a value or an exception."""

    def patch(batches: set[int], outcome) -> None:
        real = ClassificationModule.training_loss
        seen = {"i": -1}

        def training_loss(self, batch):
            loss = real(self, batch)
            seen["i"] += 1
            if seen["i"] % STEPS_PER_EPOCH not in batches:
                return loss
            if isinstance(outcome, BaseException):
                raise outcome
            return loss * outcome

        monkeypatch.setattr(ClassificationModule, "training_loss", training_loss)

    return patch


def run_fit(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["fit", *args])
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr().err


def test_nan_loss_stops_naming_the_step(tiny_bert, review_files, tmp_path, loss_at, capsys):
    loss_at({3}, float("nan"))
    code, err = run_fit(cli_args(tiny_bert, {"train": review_files["train"]}, tmp_path), capsys)
    assert code == 2 and "Traceback" not in err
    assert "taskhead: error: step 3 (epoch 0, batch 3): the training loss is nan" in err
    assert "on_nonfinite_loss: skip" in err


def test_inf_loss_skipped_and_counted(tiny_bert, review_files, tmp_path, loss_at, capsys):
    loss_at({3, 7}, float("inf"))
    args = cli_args(tiny_bert, {"train": review_files["train"]}, tmp_path, "--model.optimizer.on_nonfinite_loss", "skip")
    code, err = run_fit(args, capsys)
    assert code == 0, err
    ckpt = last_checkpoint(tmp_path)
    assert ckpt["taskhead"]["skipped_batches"] == 2 * EPOCHS
    # Lightning still counts the step (the LR schedule advances) but no parameter moves: AdamW skips gradient-less ones
    assert ckpt["global_step"] == STEPS_PER_EPOCH * EPOCHS
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total capacity)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 25769803776 bytes."),
], ids=["cuda", "cpu"])
def test_out_of_memory_names_batch_size_and_max_length(error, tiny_bert, review_files, tmp_path, loss_at, capsys):
    loss_at({1}, error)
    code, err = run_fit(cli_args(tiny_bert, {"train": review_files["train"]}, tmp_path, "--data.max_length", "64"), capsys)
    assert code == 2 and "Traceback" not in err
    line, = err.strip().splitlines()[-1:]
    assert line.startswith("taskhead: error: out of memory (")
    assert "--data.batch_size 16 (eval: 32) and --data.max_length 64" in line
    assert "--trainer.accumulate_grad_batches" in line


def test_data_file_hash_is_read_once_per_version_of_the_file(tmp_path, monkeypatch):
    # a resumed fit compares the data with its manifest, then writes the manifest: the file is read once for both
    import builtins

    from taskhead.core.callbacks import sha256_file

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    first = sha256_file(data)
    assert sha256_file(str(data)) == first and opened.count(str(data.resolve())) == 1
    data.write_text('{"text": "bb", "label": 1}\n')  # changed (size and mtime): read again, new hash
    assert sha256_file(data) != first and opened.count(str(data.resolve())) == 2
