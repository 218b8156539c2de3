"""Data at scale (issue 18): ``fit`` for 3 steps on 10k … 10M short rows, cold and warm cache.

Rows are 12–40-word windows of real IMDB reviews (``../shared/data/imdb/train.jsonl``) with their review's label,
max_length 64, the packaged offline MiniLM, fp32. Per size and run (cold: empty cache; warm: the same command
again), it records the wall time, the time from process start to the first training step (a callback writes it),
the peak RSS of the process tree (psutil, polled every 0.2 s: the main process alone and the tree's sum, which
counts pages shared with forked tokeniser workers more than once) and the rows/s of tokenisation (from the
``[data] train: tokenised ...`` line; absent on code before issue 18).

    python benchmarks/scale.py                      # 10k, 100k, 1M (and --sizes 10000000 for 10M)
    python benchmarks/scale.py --src /work/main/src --label main-e229a31 --sizes 10000 100000   # the baseline

Results: ``benchmarks/results/scale.json`` (merged by label and size) and ``benchmarks/results/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
IMDB = ROOT.parent / "shared" / "data" / "imdb" / "train.jsonl"
RESULTS = ROOT / "benchmarks" / "results"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (tokeniser workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class FirstStep(Callback):
    """Writes the wall clock and the CPU seconds used so far at the first training batch to
    ``$TASKHEAD_FIRST_STEP_FILE`` (benchmark only). CPU seconds barely move when other jobs share the cores."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        path = os.environ.get("TASKHEAD_FIRST_STEP_FILE")
        if path and not Path(path).exists():
            Path(path).write_text(json.dumps({"time": time.time(), "cpu_s": cpu_seconds()}))


def make_rows(n: int, out: Path, seed: int = 0) -> Path:
    """``n`` JSONL rows: a 12–40-word window of a random IMDB training review, with that review's label."""
    if out.is_file():
        return out
    reviews = [(r["text"].split(), r["label"]) for r in map(json.loads, IMDB.open())]
    rng = random.Random(seed)
    tmp = out.with_suffix(".part")
    with tmp.open("w") as f:
        for _ in range(n):
            words, label = reviews[rng.randrange(len(reviews))]
            k = rng.randint(12, 40)
            start = rng.randrange(max(1, len(words) - k))
            f.write(json.dumps({"text": " ".join(words[start:start + k]), "label": label}) + "\n")
    tmp.rename(out)
    return out


def measure(args: list[str], env: dict, log: Path) -> dict:
    """Run a taskhead command; its wall and CPU time, peak RSS (the process; the tree with its workers) and output."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start, kids_before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as out:
        proc = psutil.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak_main = peak_tree = peak_anon = 0
        while proc.poll() is None:
            try:
                info = proc.memory_info()
                tree = info.rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                continue
            # anonymous memory: RSS less the file-backed pages (``shared``: memory-mapped Arrow files read through the
            # page cache, which the kernel reads ahead around each page touched and may drop at any time)
            peak_main, peak_tree = max(peak_main, info.rss), max(peak_tree, tree)
            peak_anon = max(peak_anon, info.rss - info.shared)
            time.sleep(0.2)
    wall = time.time() - start
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{args[3]} failed ({proc.returncode}); log: {log}\n{text[-3000:]}")
    return {"start": start, "text": text, "wall_s": round(wall, 1),
            "cpu_s": round(kids.ru_utime + kids.ru_stime - kids_before.ru_utime - kids_before.ru_stime, 1),
            # ru_maxrss: the kernel's own peak of the largest process so far, no polling gap (when this one set it)
            "peak_rss_mb": round(max(peak_main / 2**20, kids.ru_maxrss / 1024 if kids.ru_maxrss > kids_before.ru_maxrss else 0)),
            "peak_rss_tree_mb": round(peak_tree / 2**20), "peak_anon_mb": round(peak_anon / 2**20)}


def run_predict(rows: Path, runs: Path, cache: Path, src: str) -> dict:
    """``predict`` with the fit's last checkpoint on ``rows`` (their labels unused): predictions.jsonl of every row."""
    ckpt = next(runs.glob("**/last.ckpt"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "taskhead.cli", "predict", "--ckpt_path", str(ckpt), "--data.predict_file", str(rows),
            "--data.cache_dir", str(cache), "--trainer.precision", "32-true", "--data.eval_batch_size", "256",
            "--data.max_eval_samples", "null",  # the fit's 2000 cut the predict split too before 28c4c22
            "--trainer.enable_progress_bar", "false"]
    m = measure(args, env, runs / f"predict-{time.time_ns()}.log")
    out = next(ckpt.parent.parent.glob("predictions.jsonl"))
    with out.open() as f:
        lines = sum(1 for _ in f)
    assert lines == int(rows.stem.rsplit("-", 1)[1]), (lines, rows)
    return {k: m[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")} | {"rows_per_s": round(lines / m["wall_s"])}


def run_fit(train: Path, cache: Path, runs: Path, src: str) -> dict:
    first = Path(tempfile.mktemp(prefix="first-step-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(ROOT)]), "TASKHEAD_FIRST_STEP_FILE": str(first),
           "HF_HUB_OFFLINE": "1"}  # TOKENIZERS_PARALLELISM as the user has it (unset: the Rust tokenizer's threads)
    args = [sys.executable, "-m", "taskhead.cli", "fit", "--config", "configs/imdb.yaml", "--config", "configs/offline/imdb.yaml",
            "--data.train_file", str(train), "--trainer.max_steps", "3", "--trainer.precision", "32-true",
            "--data.max_length", "64", "--data.max_eval_samples", "2000", "--data.cache_dir", str(cache),
            "--trainer.default_root_dir", str(runs), "--trainer.callbacks+=benchmarks.scale.FirstStep",
            "--trainer.enable_progress_bar", "false"]
    m = measure(args, env, runs / f"fit-{time.time_ns()}.log")
    text, start = m["text"], m["start"]
    rate = re.search(r"\[data\] train: tokenised ([\d,]+) examples in ([\d.]+) s \(([\d,]+)/s, (\d+) process", text)
    mark = json.loads(first.read_text()) if first.is_file() else {}
    first.unlink(missing_ok=True)
    return {"wall_s": m["wall_s"], "first_step_s": round(mark["time"] - start, 1) if mark else None,
            "first_step_cpu_s": round(mark["cpu_s"], 1) if mark else None, "cpu_s": m["cpu_s"],
            "peak_rss_mb": m["peak_rss_mb"], "peak_rss_tree_mb": m["peak_rss_tree_mb"], "peak_anon_mb": m["peak_anon_mb"],
            "tokenise_rows_per_s": int(rate.group(3).replace(",", "")) if rate else None,
            "tokenise_procs": int(rate.group(4)) if rate else None}


def cpu() -> dict:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", info)
    flags = set((re.search(r"Flags:\s*(.+)", info) or re.search("()", "")).group(1).split())
    return {"model": model.group(1).strip() if model else platform.processor(), "cores": os.cpu_count(),
            "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}), "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16"})}


def write_md(results: dict) -> None:
    c = results["cpu"]
    lines = ["# Data at scale: `fit` 3 steps, cold and warm cache", "",
             f"CPU: {c['model']}, {c['cores']} cores visible (shared with other jobs), native bf16: "
             f"{'yes (' + ', '.join(c['bf16_flags']) + ')' if c['native_bf16'] else 'no'}; runs in fp32.", "",
             "Command (per size; `--data.max_eval_samples 2000` bounds the end-of-fit validation):", "",
             "    taskhead fit --config configs/imdb.yaml --config configs/offline/imdb.yaml --data.train_file ROWS.jsonl \\",
             "      --trainer.max_steps 3 --trainer.precision 32-true --data.max_length 64 --data.max_eval_samples 2000", "",
             "Times: wall clock (the 2 cores are shared with other jobs, so wall times are noisy) and, in brackets, CPU "
             "seconds of the fit and its tokeniser workers up to the first step (what the work costs, contention aside).", "",
             "| code | rows | cold: first step | warm: first step | warm speed-up (wall / CPU) | cold: whole fit | "
             "peak RSS cold / warm | of it anonymous, cold / warm | tree RSS cold | tokenised rows/s (cold) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(results["runs"], key=lambda k: (k.split("@")[0], int(k.split("@")[1]))):
        label, n = key.split("@")
        r = results["runs"][key]
        cold, warm = r.get("cold", {}), r.get("warm", {})
        def first(r: dict) -> str:
            return f"{r['first_step_s']} s ({r.get('first_step_cpu_s', '—')} CPU s)" if r.get("first_step_s") else "—"

        speed = "—"
        if cold.get("first_step_s") and warm.get("first_step_s"):
            speed = f"{cold['first_step_s'] / warm['first_step_s']:.1f}×"
            if cold.get("first_step_cpu_s") and warm.get("first_step_cpu_s"):
                speed += f" / {cold['first_step_cpu_s'] / warm['first_step_cpu_s']:.1f}×"
        rate = f"{cold['tokenise_rows_per_s']:,} ({cold['tokenise_procs']} proc)" if cold.get("tokenise_rows_per_s") else "—"
        lines.append(f"| {label} | {int(n):,} | {first(cold)} | {first(warm)} | {speed} | {cold.get('wall_s', '—')} s | "
                     f"{cold.get('peak_rss_mb', '—')} / {warm.get('peak_rss_mb', '—')} MB | "
                     f"{cold.get('peak_anon_mb', '—')} / {warm.get('peak_anon_mb', '—')} MB | {cold.get('peak_rss_tree_mb', '—')} MB | {rate} |")
    predicted = [(k, r["predict"]) for k, r in sorted(results["runs"].items()) if "predict" in r]
    if predicted:
        lines += ["", "`predict` on the same rows with the fit's last.ckpt (`--data.eval_batch_size 256`, fp32): "
                  "predictions.jsonl of every row, each with its input text.", "",
                  "| code | rows | wall | CPU s | rows/s | peak RSS |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {k.split('@')[0]} | {int(k.split('@')[1]):,} | {p['wall_s']} s | {p['cpu_s']} | {p['rows_per_s']:,} | "
                  f"{p['peak_rss_mb']} MB |" for k, p in predicted]
    lines += ["", "Notes:",
              "- Peak RSS is the fit process (kernel ru_maxrss or 0.2 s polling, the larger); tree RSS adds the forked "
              "tokeniser workers, whose copy-on-write pages shared with the parent are counted twice. Anonymous: RSS "
              "less file-backed pages (0.2 s polling): the memory-mapped Arrow files count in RSS as far as they are "
              "read (the kernel reads ahead around each page a column read touches), but they are page cache, which "
              "the kernel drops under pressure.",
              "- Tokenised rows/s: the train split's `[data] train: tokenised ...` line (wall clock). From 100k rows up "
              "one process per ~50k rows, up to the cores; within each, the Rust tokenizer runs on its own threads "
              "unless TOKENIZERS_PARALLELISM=false.",
              "- `main-e229a31` is the code before issue 18 (rows parsed into Python lists); `main-621aacd` the Arrow "
              "path before the tokenizer's `encode_batch_fast` (core/tokens.py). Earlier runs on loaded cores are in "
              "this file's git history.",
              *results.get("notes", [])]
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--src", default=str(ROOT / "src"), help="taskhead source tree to measure (e.g. an older checkout's src)")
    ap.add_argument("--label", default="this branch")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "taskhead-scale"), help="data, caches and runs (deleted per run)")
    ap.add_argument("--no-warm", action="store_true", help="cold runs only")
    ap.add_argument("--predict", action="store_true", help="also predict on the rows with the fit's last.ckpt")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "scale.json"
    results = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    results["cpu"] = cpu()
    for n in args.sizes:
        train = make_rows(n, work / f"imdb-windows-{n}.jsonl")
        cache, runs = work / "cache", work / "runs"
        shutil.rmtree(cache, ignore_errors=True)
        entry = results["runs"].setdefault(f"{args.label}@{n}", {})
        for kind in ("cold",) if args.no_warm else ("cold", "warm"):
            shutil.rmtree(runs, ignore_errors=True)
            entry[kind] = run_fit(train, cache, runs, args.src)
            print(f"{args.label} {n:,} rows {kind}: {entry[kind]}", flush=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
            write_md(results)
        if args.predict:
            entry["predict"] = run_predict(train, runs, cache, args.src)
            print(f"{args.label} {n:,} rows predict: {entry['predict']}", flush=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
            write_md(results)
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
