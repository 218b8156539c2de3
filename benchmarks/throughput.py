"""Throughput benchmark (issue #8): taskhead against the Hugging Face baselines, side by side, in one run.

    python benchmarks/throughput.py                 # everything, ~25-30 min on 2 idle cores
    python benchmarks/throughput.py --quick         # tiny step counts, bf16 only: checks the script works (~5 min)
    python benchmarks/throughput.py --only train-imdb,matmul --threads 2

Writes benchmarks/results/throughput.{json,md} (a --quick or --only run writes throughput-quick.* / throughput-partial.*
unless --out says otherwise) and the children's output to the matching .log. Every measurement runs in a fresh
subprocess (``--one NAME``) so that memory and allocator state never leak from one into the next; each reports its
own peak RSS. What is measured, and how, is in the docstrings of throughput_train.py and throughput_infer.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput_lib import ROOT, estimate_seconds, peak_rss_mb, select, set_threads, settings_for  # noqa: E402
from throughput_report import build_summary, markdown  # noqa: E402

from taskhead.core.callbacks import package_versions  # noqa: E402

PACKAGES = ("taskhead", "torch", "lightning", "transformers", "accelerate", "datasets", "tokenizers", "jsonargparse", "numpy")
CHILD_TIMEOUT_S = 1200


# ---- one measurement, in this (fresh) process --------------------------------------------------------------------------


def child(name: str, work: Path, threads: int, result: Path) -> None:
    set_threads(threads)
    import torch

    torch.set_num_threads(threads)
    s = json.loads((work / "settings.json").read_text())
    t0 = time.perf_counter()
    if name == "prep":
        from throughput_infer import prepare_models
        from throughput_lib import prepare_data

        out = {"data": prepare_data(s, work), "models": prepare_models(s, work, s["selected"])}
    elif name.startswith("train-"):
        import throughput_train

        out = throughput_train.run(name, s, work)
    else:
        import throughput_infer

        out = throughput_infer.run(name, s, work)
    doc = {"name": name, "result": out, "peak_rss_mb": peak_rss_mb(), "wall_s": time.perf_counter() - t0}
    result.write_text(json.dumps(doc, indent=1, default=str))


# ---- the run: plan, subprocesses, results ----------------------------------------------------------------------------------


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), None)
        flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
        info["flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    except OSError:
        pass
    return info


def git_state() -> dict:
    def git(*args):
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def run_child(name: str, work: Path, threads: int, log) -> dict:
    result = work / "results" / f"{name}.json"
    result.parent.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--work", str(work), "--threads", str(threads),
           "--result", str(result)]
    log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    log.flush()
    start = log.tell()
    load = os.getloadavg()
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=CHILD_TIMEOUT_S)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.time() - t0
    if rc == 0 and result.is_file():
        doc = json.loads(result.read_text())
    else:
        doc = {"name": name, "error": f"exit status {rc}: {last_error(log.name, start)}"}
    doc.update({"process_wall_s": wall, "loadavg_before": [round(x, 2) for x in load]})
    return doc


def last_error(path: str, start: int) -> str:
    """The child's last traceback line (``SomeError: message``) from its part of the log."""
    with open(path, errors="replace") as f:
        f.seek(start)
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    errors = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception", "Interrupt"))]
    return (errors or lines or ["no output"])[-1][:300]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny step and item counts, and (without --only) no fp32 training/prediction: checks the script works")
    p.add_argument("--only", default=None, help="comma-separated names, prefixes or globs (e.g. train-imdb,matmul)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and OMP/MKL) in every measurement")
    p.add_argument("--out", default=None, help="output prefix (default: benchmarks/results/throughput[-quick|-partial])")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs of each training measurement, round-robin, pooled (default: 2; 1 with --quick)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary work directory (inputs, exports, logs)")
    p.add_argument("--list", action="store_true", help="list the selected measurements with time estimates, and exit")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        child(a.one, Path(a.work), a.threads, Path(a.result))
        return
    names = select(a.only.split(",") if a.only else None, quick=a.quick)
    a.repeats = a.repeats or (1 if a.quick else 2)
    s = settings_for(a.quick)
    if a.list:
        reps = {n: a.repeats if n.startswith("train-") else 1 for n in names}
        for n in names:
            print(f"{n:34s} ~{estimate_seconds(n, s, a.threads) * reps[n]:4.0f} s" + (f" ({reps[n]} runs)" if reps[n] > 1 else ""))
        total = sum(estimate_seconds(n, s, a.threads) * reps[n] for n in names) + 40
        print(f"{'total (with preparation)':34s} ~{total / 60:4.1f} min")
        return
    default_out = "throughput-quick" if a.quick else ("throughput-partial" if a.only else "throughput")
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="taskhead-throughput-"))
    (work / "settings.json").write_text(json.dumps({**s, "selected": names}, indent=1))

    try:
        run_all(a, names, s, out, work)
    finally:
        if a.keep_work:
            print(f"[throughput] work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_all(a, names: list[str], s: dict, out: Path, work: Path) -> None:
    estimates = {n: estimate_seconds(n, s, a.threads) for n in names}
    total_est = sum(v * (a.repeats if n.startswith("train-") else 1) for n, v in estimates.items()) + 40  # + inputs, exports
    print(f"[throughput] {len(names)} measurements ({s['mode']}, {a.threads} threads); estimated {total_est / 60:.0f} min "
          f"on {min(a.threads, 2)} idle cores. Work dir {work}; children's output in {out.with_suffix('.log')}", flush=True)
    started = time.time()
    doc = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "mode": s["mode"], "threads": a.threads, "repeats": a.repeats, "selected": names, "settings": s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "versions": package_versions(PACKAGES), "git": git_state(), "estimate_s": {"total": total_est, **estimates}, "measurements": {},
    }
    with open(out.with_suffix(".log"), "w") as log:
        prep = run_child("prep", work, a.threads, log)
        if "error" in prep:
            raise SystemExit(f"[throughput] preparing inputs failed: {prep['error']} ({out.with_suffix('.log')})")
        doc["inputs"] = prep["result"]["data"]
        print(f"[throughput] inputs and exports ready ({prep['process_wall_s']:.0f} s)", flush=True)
        # Training runs are short windows on a shared machine: run them a.repeats times, round-robin (so a slow
        # minute hits every variant alike), and pool each variant's repeats into one longer measurement.
        plan = names + [n for _ in range(a.repeats - 1) for n in names if n.startswith("train-")]
        runs: dict[str, list[dict]] = {}
        spent = estimated = 0.0
        for i, name in enumerate(plan, 1):
            r = run_child(name, work, a.threads, log)
            runs.setdefault(name, []).append(r)
            spent, estimated = spent + r["process_wall_s"], estimated + estimates[name]
            left = sum(estimates[n] for n in plan[i:]) * spent / estimated  # the remaining estimate, rescaled
            status = r.get("error") or headline(r["result"])
            print(f"[throughput] {i:2d}/{len(plan)} {name:32s} {r['process_wall_s']:5.0f} s (est. {estimates[name]:3.0f}, "
                  f"~{left / 60:4.1f} min left)  RSS {r.get('peak_rss_mb', 0):5.0f} MB  {status}", flush=True)
        doc["measurements"] = {n: pool(rs) for n, rs in runs.items()}
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc["wall_s"] = time.time() - started
    doc["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["summary"] = build_summary(doc, work)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(f"[throughput] done in {doc['wall_s'] / 60:.1f} min: {out.with_suffix('.json')}, {out.with_suffix('.md')}")


def pool(runs: list[dict]) -> dict:
    """Repeats of one measurement as one: training windows summed (rates recomputed from the totals), each repeat's
    real tokens/s kept in ``repeats_tokens_per_s``; other measurements ran once."""
    failed = [r for r in runs if "error" in r]
    if failed or len(runs) == 1:
        return (failed or runs)[0]
    rs = [r["result"] for r in runs]
    res = dict(rs[0])
    for k in ("measured_s", "samples", "tokens", "padded_tokens", "measured_steps"):
        res[k] = sum(r[k] for r in rs)
    sec = res["measured_s"]
    res.update(samples_per_s=res["samples"] / sec, tokens_per_s=res["tokens"] / sec, padded_tokens_per_s=res["padded_tokens"] / sec,
               padding_share=1.0 - res["tokens"] / max(res["padded_tokens"], 1),
               model_flops_per_s=sum(r["model_flops_per_s"] * r["measured_s"] for r in rs) / sec,
               padded_flops_per_s=sum(r["padded_flops_per_s"] * r["measured_s"] for r in rs) / sec,
               repeats_tokens_per_s=[r["tokens_per_s"] for r in rs], repeats_samples_per_s=[r["samples_per_s"] for r in rs],
               steps=[r["steps"] for r in rs])
    if "phases_s" in rs[0]:
        res["phases_s"] = {k: sum(r["phases_s"][k] for r in rs) for k in rs[0]["phases_s"]}
    return {**runs[0], "result": res, "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in runs),
            "process_wall_s": sum(r["process_wall_s"] for r in runs), "repeats": len(runs)}


def headline(r: dict) -> str:
    if "tokens_per_s" in r and "measured_s" in r:
        return f"{r['tokens_per_s']:8.0f} real tok/s  {r['samples_per_s']:6.1f} samples/s  padding {r['padding_share']:.0%}"
    if "items_per_s" in r:
        return f"{r['items_per_s']:8.1f} items/s"
    if "combined_flops_per_s" in r:
        return f"{r['combined_flops_per_s'] / 1e9:8.1f} GFLOP/s"
    if "stage" in r:
        return f"{r['examples']:,} examples"
    return ""


if __name__ == "__main__":
    main()
