"""Quality run for the seq2seq task on the offline data: fit, then test on the held-back split, through the real CLI.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/seq2seq_quality.py xsum        > benchmarks/results/xsum.log 2>&1
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/seq2seq_quality.py wmt16_en_ro > benchmarks/results/wmt16_en_ro.log 2>&1

Writes ``benchmarks/results/<task>.json``: the test metrics, the exact CLI arguments, the shrink settings used to
fit a CPU budget, wall time and the published reference numbers. Results are written, never asserted.

- xsum: BERT2BERT warm-started from the packaged MiniLM encoder; train = 100 official train + test examples 0-699,
  validation = test 700-799, test = test 800-999 (configs/offline/xsum_bert2bert.yaml). Shrunk: 1 epoch, sources cut
  to 64 tokens, greedy decoding, validation generates on 20 documents. (The offline default is now SmolLM2; its
  zero-shot vs fine-tuned runs are benchmarks/generation_quality.py.)
- wmt16_en_ro: SmolLM2-135M-Instruct fine-tuned as a decoder-only translator on RO-STS train + newsdev2016, tested
  on newstest2016. Shrunk: 160 seeded training pairs (20 steps), a seeded 80-sentence subset of newstest2016 (and of
  the held-out validation split), 64-token sources/targets, greedy decoding with max_new_tokens 80.
The shrink is for 2 CPU cores shared with other jobs; with a GPU drop SHRINK and use the configs as they are.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"

REFERENCES = {
    "xsum": {"distilbart-xsum-12-6": {"rouge2": 22.1, "rougeL": 37.0}, "t5-small (approx.)": {"rouge1": 28.0}},
    "wmt16_en_ro": {"Helsinki-NLP/opus-mt-en-ro newstest2016": {"bleu": 28.8}},
}

# CPU-budget shrink (2 shared cores, <= 40 min for both runs): every value is passed on the command line below.
SHRINK = {
    "xsum": [
        "--trainer.max_epochs", "1", "--data.max_length", "64", "--data.max_target_length", "40",
        "--data.batch_size", "8", "--data.eval_batch_size", "25", "--model.val_generate_samples", "20",
        "--model.generation", '{"num_beams": 1, "max_new_tokens": 40, "no_repeat_ngram_size": 3, "early_stopping": false}',
        "--model.optimizer.lr", "1e-4", "--model.optimizer.head_lr", "5e-4",
    ],
    "wmt16_en_ro": [
        "--trainer.max_epochs", "1", "--data.max_train_samples", "160", "--data.max_eval_samples", "80",
        "--data.max_length", "64", "--data.max_target_length", "64", "--data.batch_size", "8",
        "--data.eval_batch_size", "20", "--model.val_generate_samples", "10",
        "--model.generation", '{"num_beams": 1, "max_new_tokens": 80, "no_repeat_ngram_size": 0, "early_stopping": false}',
        "--model.optimizer.lr", "1e-4",
    ],
}
MAIN_METRIC = {"xsum": "rougeL", "wmt16_en_ro": "bleu"}
OFFLINE_CONFIG = {"xsum": "xsum_bert2bert", "wmt16_en_ro": "wmt16_en_ro"}


def main(task: str) -> None:
    from taskhead.cli import run_cli

    base = ["--config", f"configs/{task}.yaml", "--config", f"configs/offline/{OFFLINE_CONFIG[task]}.yaml",
            "--trainer.default_root_dir", "runs/quality", "--trainer.enable_model_summary", "false",
            *SHRINK[task]]
    t0 = time.time()
    fit = run_cli(["fit", *base])
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    t_fit = time.time() - t0
    test = run_cli(["test", *base, "--ckpt_path", str(ckpt)])
    run = Path(test.trainer.log_dir)
    scores = json.loads((run / "test_scores.json").read_text())
    gens = json.loads((run / "test_generations.json").read_text())
    result = {
        "task": task,
        "test": scores,
        "main_metric": {MAIN_METRIC[task]: scores.get(MAIN_METRIC[task])},
        "references": REFERENCES[task],
        "command": f"taskhead {shlex.join(['fit', *base])} && taskhead {shlex.join(['test', *base, '--ckpt_path', str(ckpt)])}",
        "shrink": SHRINK[task],
        "fit_seconds": round(t_fit), "total_seconds": round(time.time() - t0),
        "run_dirs": {"fit": str(fit.trainer.log_dir), "test": str(run)},
        "examples": gens[:5],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{task}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: result[k] for k in ("task", "main_metric", "fit_seconds", "total_seconds")}))


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in SHRINK:
        sys.exit(f"usage: python benchmarks/seq2seq_quality.py {{{'|'.join(SHRINK)}}}")
    main(sys.argv[1])
