"""A new user's first hour (issue 13), as the console command behaves: precision chosen per machine, a user's own
file defining the dataset, --trainer.max_steps winning over a config's epochs, the best-checkpoint line, commands
that need only --ckpt_path, SIGTERM/SIGINT exit status, refused abbreviations, default_root_dir, resume matching,
checkpoint switches, offline failures and a --help that loads nothing heavy."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import taskhead
from taskhead.core.precision import bf16_warning, choose_precision, cpu_flags, cpu_has_native_bf16
from taskhead.errors import TaskheadError

from conftest import ROOT, make_reviews, run_taskhead, write_jsonl

OFFLINE_IMDB = ["--config", str(ROOT / "configs/imdb.yaml"), "--config", str(ROOT / "configs/offline/imdb.yaml")]


# ---- precision: auto --------------------------------------------------------------------------------------------------

def test_precision_auto_follows_the_hardware(tmp_path):
    assert choose_precision("cpu", flags={"avx2", "fma"}, cuda_available=False)[0] == "32-true"
    assert choose_precision("cpu", flags={"avx2", "avx512f", "avx512_bf16"}, cuda_available=False)[0] == "bf16-mixed"
    assert choose_precision("auto", flags={"amx_bf16"}, cuda_available=False)[0] == "bf16-mixed"
    assert choose_precision("cpu", flags={"fp", "asimd", "bf16"}, cuda_available=False)[0] == "bf16-mixed"  # Arm BF16
    assert choose_precision("auto", flags=set(), cuda_available=True, cuda_bf16=True)[0] == "bf16-mixed"
    assert choose_precision("gpu", flags=set(), cuda_available=True, cuda_bf16=False)[0] == "16-mixed"
    # a GPU machine told to train on its CPU follows the CPU's flags
    assert choose_precision("cpu", flags={"avx2"}, cuda_available=True, cuda_bf16=True)[0] == "32-true"
    assert choose_precision("mps", flags={"avx2"}, cuda_available=False)[0] == "32-true"

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma\n\nprocessor\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse", "avx2", "fma"} and not cpu_has_native_bf16(cpu_flags(cpuinfo))
    assert cpu_flags(tmp_path / "missing") == set()


def test_explicit_bf16_on_a_cpu_without_it_warns():
    message = bf16_warning("bf16-mixed", "cpu", flags={"avx2"}, cuda_available=False)
    assert message and "many times slower" in message and "precision auto" in message
    assert bf16_warning("bf16-mixed", "cpu", flags={"avx512_bf16"}, cuda_available=False) is None
    assert bf16_warning("32-true", "cpu", flags={"avx2"}, cuda_available=False) is None


def test_every_shipped_config_leaves_precision_to_the_machine():
    import yaml

    for path in (ROOT / "configs").rglob("*.yaml"):
        precision = (yaml.safe_load(path.read_text()).get("trainer") or {}).get("precision", "auto")
        assert "bf16" not in str(precision) and "16-mixed" not in str(precision), path


def test_load_picks_the_same_precision():
    from taskhead.core.precision import autocast_dtype

    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert autocast_dtype("cpu") == expected
    assert autocast_dtype("cpu", "32-true") is None and autocast_dtype("cpu", "bf16-mixed") == torch.bfloat16


# ---- one fit, then everything a user does with it ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> dict:
    """A user's CSV with other field names and 1–5 star labels, and a predict file with its own ids."""
    d = tmp_path_factory.mktemp("own")
    rows = make_reviews(120, 5)
    csv = d / "reviews.csv"
    csv.write_text("review,stars\n" + "".join(f"{r['text']},{5 if r['label'] == 'pos' else 1}\n" for r in rows))
    predict = write_jsonl(d / "new.jsonl", [{"id": f"r{i}", "review": r["text"]} for i, r in enumerate(make_reviews(6, 9))])
    short = d / "short.yaml"  # a config that sets epochs, as the shipped ones do
    short.write_text("trainer:\n  max_epochs: 1\n")
    return {"dir": d, "csv": str(csv), "predict": str(predict), "short": str(short)}


@pytest.fixture(scope="module")
def fitted(tiny_bert, own_data, tmp_path_factory) -> dict:
    """The README's own-data command (offline IMDB configs + the user's CSV and field names, nothing else set to
    null), with the tiny model, a fixed root directory and --trainer.max_steps beyond the config's one epoch."""
    root = tmp_path_factory.mktemp("root")
    args = ["fit", *OFFLINE_IMDB, "--config", own_data["short"],
            "--model.model_name_or_path", tiny_bert, "--data.cache_dir", str(root / "cache"),
            "--data.train_file", own_data["csv"], "--data.text_field", "review", "--data.label_field", "stars",
            "--data.batch_size", "16", "--trainer.accelerator", "cpu", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "9"]
    proc = run_taskhead(*args, cwd=own_data["dir"])  # not the repo: nothing may land in the cwd's runs/
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = root / "reviews" / "version_0"
    return {"root": root, "run": run, "proc": proc, "args": args}


def test_own_file_defines_the_dataset(fitted, own_data):
    out = fitted["proc"].stdout + fitted["proc"].stderr
    line = next(line for line in out.splitlines() if "--data.train_file given" in line)
    assert "test_file=../shared/data/imdb/test.jsonl" in line and "label_names=['neg', 'pos']" in line, line
    assert "train_file" not in line.split("dropped from the config:")[1], line  # the user's own file stays
    config = (fitted["run"] / "config.yaml").read_text()
    assert "../shared/data" not in config  # the offline config's IMDB files did not leak in
    ckpt = torch.load(next((fitted["run"] / "checkpoints").glob("best-*.ckpt")), weights_only=True)
    assert ckpt["hyper_parameters"]["label_names"] == ["1", "5"]  # inferred from the user's train split
    assert not (Path(own_data["dir"]) / "runs").exists()


def test_max_steps_on_the_command_line_beats_the_configs_epochs(fitted):
    out = fitted["proc"].stdout + fitted["proc"].stderr
    assert "--trainer.max_steps 9 given: the config's max_epochs 1 no longer applies" in out
    last = torch.load(fitted["run"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 9  # 108 training rows / 16 = 7 batches per epoch: it ran past the epoch


def test_fit_names_the_best_checkpoint_with_its_metric(fitted):
    out = fitted["proc"].stdout + fitted["proc"].stderr
    m = re.search(r"\[fit\] best val/acc (\d\.\d{4}) at step (\d+): (\S+)", out)
    assert m, out[-2000:]
    path = Path(m[3])
    assert path.is_file() and re.fullmatch(rf"best-step={m[2]}-val_acc={m[1]}\.ckpt", path.name)
    assert "[val] epoch" in out and "val/acc" in out  # every validation prints its metrics
    assert re.search(r"\[train\] epoch 0 step 1/9 .* tok/s .* ETA", out)  # progress lines in a non-terminal


def test_best_checkpoint_holds_weights_only_last_holds_the_optimiser(fitted):
    ckpts = fitted["run"] / "checkpoints"
    best = next(ckpts.glob("best-*.ckpt"))
    best_ckpt = torch.load(best, weights_only=True)
    last_ckpt = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in best_ckpt and "optimizer_states" in last_ckpt
    assert best.stat().st_size < 0.6 * (ckpts / "last.ckpt").stat().st_size  # AdamW keeps two moments per weight
    assert best_ckpt["taskhead"]["val_metrics"]["val/acc"] == pytest.approx(float(best.stem.rsplit("=", 1)[1]), abs=1e-4)


def test_predict_test_export_need_only_the_checkpoint(fitted, own_data, tmp_path):
    run = fitted["run"]
    best = str(next((run / "checkpoints").glob("best-*.ckpt")))
    proc = run_taskhead("predict", "--ckpt_path", best, "--data.predict_file", own_data["predict"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dirpath" not in proc.stderr and "has changed" not in proc.stderr
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    inputs = [json.loads(line) for line in Path(own_data["predict"]).read_text().splitlines()]
    assert [r["id"] for r in rows] == [i["id"] for i in inputs]  # the input's own id, in input order
    assert [r["text"] for r in rows] == [i["review"] for i in inputs] and all(r["label"] in ("1", "5") for r in rows)
    assert (run / "config.yaml").read_text().count("predict_file: null") == 1  # the fit's config is untouched

    proc = run_taskhead("test", "--ckpt_path", best, "--data.test_file", own_data["csv"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0 and (run / "manifest-test.json").is_file()
    assert not list(fitted["root"].glob("reviews/version_1"))  # evaluated in the checkpoint's own run directory

    proc = run_taskhead("export", "--ckpt_path", best, "--out", str(tmp_path / "export"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert taskhead.load(tmp_path / "export", precision="32-true")("great wonderful film")["label"] in ("1", "5")


def test_predict_lines_fall_back_to_line_numbers(fitted, own_data, tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"review": "dull"}, {"review": "superb"}])
    best = str(next((fitted["run"] / "checkpoints").glob("best-*.ckpt")))
    out = tmp_path / "preds.jsonl"
    proc = run_taskhead("predict", "--ckpt_path", best, "--data.predict_file", str(plain),
                        "--artifacts.predictions_file", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [1, 2]


def test_resume_last_only_matches_the_same_config(fitted, own_data):
    args = [*fitted["args"], "--ckpt_path", "last", "--model.optimizer.lr", "0.003"]
    proc = run_taskhead(*args, cwd=own_data["dir"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("taskhead: error: --ckpt_path last: the newest run") and "model.init_args.optimizer.lr" in err
    assert "--name" in err and not (fitted["root"] / "reviews" / "version_1").exists()


# ---- switches and signals ---------------------------------------------------------------------------------------------

def small_fit_args(tiny_bert, review_files, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/imdb.yaml"), "--model.model_name_or_path", tiny_bert,
            "--data.train_file", review_files["train"], "--data.cache_dir", str(root / "cache"),
            "--data.batch_size", "16", "--trainer.accelerator", "cpu", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(root), *extra]


def test_checkpointing_switches(tiny_bert, review_files, tmp_path):
    proc = run_taskhead(*small_fit_args(tiny_bert, review_files, tmp_path / "a", "--trainer.max_steps", "2",
                                        "--trainer.enable_checkpointing", "false"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((tmp_path / "a").rglob("*.ckpt"))
    proc = run_taskhead(*small_fit_args(tiny_bert, review_files, tmp_path / "b", "--trainer.max_steps", "2",
                                        "--last_checkpoint.enabled", "false"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name.split("-")[0] for p in (tmp_path / "b").rglob("*.ckpt")] == ["best"]


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_last_checkpoint_and_exits_nonzero(tiny_bert, review_files, tmp_path, sig, status):
    args = small_fit_args(tiny_bert, review_files, tmp_path, "--trainer.max_epochs", "200")
    proc = subprocess.Popen([sys.executable, "-m", "taskhead.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    for line in proc.stdout:  # the first progress line: training has started
        if line.startswith("[train]"):
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-3000:]
    assert re.search(rf"stopped by {sig.name} at step \d+; last.ckpt written: \S+last.ckpt", err), err[-2000:]
    last = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert last["global_step"] >= 1 and "optimizer_states" in last


def test_sigterm_stops_predict_at_a_batch_end_writing_nothing(tiny_bert, review_files, tmp_path):
    """Lightning's SIGTERM handler only notes the signal, and only its training loop looks: predict went on to the end."""
    proc = run_taskhead(*small_fit_args(tiny_bert, review_files, tmp_path, "--trainer.max_steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = next(tmp_path.rglob("last.ckpt"))
    many = write_jsonl(tmp_path / "many.jsonl", [{"text": r["text"]} for r in make_reviews(20_000, 5)])
    args = ["predict", "--ckpt_path", str(last), "--data.predict_file", str(many), "--data.eval_batch_size", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "taskhead.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    for line in proc.stdout:  # "[predict] 10000 batches ...": the predict loop has started
        if line.startswith("[predict]"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "taskhead: stopped by SIGTERM during predict; nothing written" in err, err[-2000:]
    run = last.parent.parent
    assert not (run / "predictions.jsonl").exists() and not list(run.glob(".partial-*"))


def test_abbreviated_options_are_refused(capsys):
    from taskhead.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", *OFFLINE_IMDB, "--trainer.max_step", "3", "--print_config"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "trainer.max_step" in err and len(err.strip().splitlines()) == 1, err


def test_help_lists_every_subcommand_and_loads_nothing_heavy():
    code = ("import sys, contextlib, io; from taskhead.cli import main; out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out): main(['--help'])\n"
            "print(out.getvalue()); print('heavy:', sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for sub in ("fit", "validate", "test", "predict", "export"):
        assert re.search(rf"^\s+{sub}\s", proc.stdout, flags=re.M), proc.stdout
    assert "heavy: []" in proc.stdout


def test_offline_hub_model_fails_at_once_naming_the_offline_configs(monkeypatch):
    from taskhead.core import pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pretrained.hub_unreachable.cache_clear()
    with pytest.raises(TaskheadError, match=r"'no-such-org/no-such-model' is not a local path.*configs/offline/"):
        pretrained.load_tokenizer("no-such-org/no-such-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port: refused at once
    pretrained.hub_unreachable.cache_clear()
    try:
        assert "cannot connect to 127.0.0.1" in pretrained.hub_unreachable()
    finally:
        pretrained.hub_unreachable.cache_clear()


def test_early_stopping_from_yaml_keeps_its_state_in_last_ckpt(tiny_bert, review_files, tmp_path):
    """min_delta 100 on a metric in [0, 1]: the second validation cannot improve, so patience 1 stops the run there."""
    args = small_fit_args(tiny_bert, review_files, tmp_path, "--trainer.max_epochs", "5",
                          "--early_stopping", "{patience: 1, min_delta: 100}")
    proc = run_taskhead(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert last["epoch"] == 1  # stopped after its second epoch of five
    state = next(v for k, v in last["callbacks"].items() if k.startswith("EarlyStopping"))
    assert state["wait_count"] == 1 and state["stopped_epoch"] == 1 and "'monitor': 'val/acc'" in next(
        k for k in last["callbacks"] if k.startswith("EarlyStopping"))
