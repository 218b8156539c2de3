"""Zero-shot vs fine-tuned quality of the offline generator (SmolLM2-135M-Instruct, chat template) on both generation
tasks, through the real CLI, with the degenerate-output guards. Results are written, never asserted.

    OMP_NUM_THREADS=1 python benchmarks/generation_quality.py xsum zeroshot        # `taskhead test`, no --ckpt_path
    OMP_NUM_THREADS=1 python benchmarks/generation_quality.py xsum finetune        # `taskhead fit`, then test last.ckpt
    OMP_NUM_THREADS=1 python benchmarks/generation_quality.py wmt16_en_ro zeroshot
    OMP_NUM_THREADS=1 python benchmarks/generation_quality.py wmt16_en_ro finetune

Each phase updates ``benchmarks/results/<task>_generation.json``: the test scores (ROUGE or BLEU/chrF, plus
``distinct_outputs``, ``repeated_4grams``, ``hit_max_new_tokens``), the exact CLI arguments, the budget (steps,
seconds), the CPU and whether it has native bf16, and the first outputs side by side with the references. For en→ro
also the share of outputs (and of references) with Romanian diacritics (ă â î ș ț, comma or cedilla forms).

- xsum: test on 100 unseen documents (test excerpt 800-899); fine-tuning draws a seeded subset of the 800 training
  documents (100 official train + excerpt 0-699) and validates on excerpt 700-719. Sources cut to 320 prompt tokens.
- wmt16_en_ro: test on a seeded 100-sentence subset of newstest2016 (``max_eval_samples``: the same subset for both
  phases); fine-tuning draws a seeded subset of RO-STS train + newsdev2016.
The budget is for 2 CPU cores shared with other jobs (1 thread, fp32); with a GPU drop BUDGET.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
DIACRITICS = set("ăâîșțşţĂÂÎȘȚŞŢ")

DATA = "../shared/data/xsum/test_subset1000.jsonl"
BUDGET = {  # every value is passed on the command line (and stored in the result)
    "xsum": {
        "common": ["--data.test_file", f"{DATA}[800:900]", "--data.max_length", "320", "--data.eval_batch_size", "20"],
        "fit": ["--data.max_train_samples", "320", "--data.batch_size", "8", "--trainer.max_epochs", "1",
                "--data.validation_file", f"{DATA}[700:720]", "--model.val_generate_samples", "20"],
    },
    "wmt16_en_ro": {
        "common": ["--data.max_eval_samples", "100", "--data.max_length", "96", "--data.max_target_length", "96",
                   "--data.eval_batch_size", "20", "--model.generation.max_new_tokens", "96"],
        "fit": ["--data.max_train_samples", "320", "--data.batch_size", "8", "--trainer.max_epochs", "1",
                "--model.val_generate_samples", "20"],
    },
}
MAIN = {"xsum": ["rouge1", "rouge2", "rougeL"], "wmt16_en_ro": ["bleu", "chrf"]}


def cpu_info() -> dict:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if platform.system() == "Linux" else ""
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags")), [])
    return {"model": model, "cores": os.cpu_count(), "threads_used": torch.get_num_threads(),
            "native_bf16": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16")),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def diacritic_share(texts: list[str]) -> float:
    return sum(any(c in DIACRITICS for c in t) for t in texts) / max(len(texts), 1)


def summarize_run(task: str, run: Path) -> dict:
    scores = json.loads((run / "test_scores.json").read_text())
    gens = json.loads((run / "test_generations.json").read_text())
    out = {"scores": {k: v for k, v in scores.items() if k != "generation"}, "generation": scores.get("generation"),
           "run_dir": str(run), "outputs": [{k: g[k] for k in ("index", "prediction", "reference")} for g in gens[:10]]}
    if task == "wmt16_en_ro":
        out["romanian_diacritics"] = {"outputs": diacritic_share([g["prediction"] for g in gens]),
                                      "references": diacritic_share([g["reference"] for g in gens])}
    return out


def main(task: str, phase: str) -> None:
    from taskhead.cli import run_cli

    base = ["--config", f"configs/{task}.yaml", "--config", f"configs/offline/{task}.yaml",
            "--trainer.logger.init_args.save_dir", "runs/generation_quality", "--trainer.precision", "32-true",
            "--trainer.enable_model_summary", "false", *BUDGET[task]["common"]]
    t0 = time.time()
    record: dict = {"budget": BUDGET[task], "cpu": cpu_info()}
    if phase == "zeroshot":
        test = run_cli(["test", *base])
        record["command"] = f"taskhead {shlex.join(['test', *base])}"
    else:
        fit = run_cli(["fit", *base, *BUDGET[task]["fit"]])
        ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
        record["fit_seconds"] = round(time.time() - t0)
        record["steps"] = int(fit.trainer.global_step)
        test = run_cli(["test", *base, "--ckpt_path", str(ckpt)])
        record["command"] = (f"taskhead {shlex.join(['fit', *base, *BUDGET[task]['fit']])} && "
                             f"taskhead {shlex.join(['test', *base, '--ckpt_path', str(ckpt)])}")
    record.update(summarize_run(task, Path(test.trainer.log_dir)))
    record["total_seconds"] = round(time.time() - t0)

    path = OUT / f"{task}_generation.json"
    result = json.loads(path.read_text()) if path.is_file() else {"task": task}
    result["zero_shot" if phase == "zeroshot" else "fine_tuned"] = record
    if "zero_shot" in result and "fine_tuned" in result:  # both phases on the same test examples: side by side
        fine = {o["index"]: o["prediction"] for o in result["fine_tuned"]["outputs"]}
        result["side_by_side"] = [{"index": o["index"], "reference": o["reference"], "zero_shot": o["prediction"],
                                   "fine_tuned": fine.get(o["index"])} for o in result["zero_shot"]["outputs"][:5]]
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    s = record["scores"]
    print(json.dumps({"task": task, "phase": phase, **{k: s.get(k) for k in MAIN[task]},
                      "distinct_outputs": s.get("distinct_outputs"), "hit_max_new_tokens": s.get("hit_max_new_tokens"),
                      "total_seconds": record["total_seconds"]}))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in BUDGET or sys.argv[2] not in ("zeroshot", "finetune"):
        sys.exit(f"usage: python benchmarks/generation_quality.py {{{'|'.join(BUDGET)}}} {{zeroshot|finetune}}")
    sys.path.insert(0, str(ROOT / "src"))
    os.chdir(ROOT)
    main(sys.argv[1], sys.argv[2])
