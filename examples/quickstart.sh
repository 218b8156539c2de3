#!/usr/bin/env bash
# Quickstart, offline: install, fine-tune the packaged all-MiniLM-L6-v2 on the shipped IMDB excerpt, test on 1,000
# held-out reviews, predict, export, and load the export back. Sized to finish in under 10 minutes (install included)
# on 2 CPU cores without native bf16; precision is chosen for the machine (`precision: auto`, one log line says which).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS= bash scripts/install.sh   # taskhead and its pins only (no test extras)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
th=.venv/bin/taskhead
root=runs/quickstart-$(date +%Y%m%d-%H%M%S)   # a fresh root per run: the lines below find its files without guessing

$th fit --config configs/imdb.yaml --config configs/offline/imdb.yaml --config examples/imdb/quickstart.yaml \
    --trainer.default_root_dir "$root" "$@"     # extra fit options pass through, e.g. --trainer.precision 32-true
ckpt=$(ls "$root"/quickstart/version_0/checkpoints/best-*.ckpt)
# the checkpoint is enough: the run's saved config supplies the rest, and results land in the same run directory
$th test --ckpt_path "$ckpt"
$th predict --ckpt_path "$ckpt" --data.predict_file examples/imdb/predict.jsonl
$th export --ckpt_path "$ckpt" --out "$root/export"
.venv/bin/python - "$root" <<'PY'
import json, sys
from pathlib import Path
import taskhead
root = Path(sys.argv[1])
run = root / "quickstart" / "version_0"
m = json.loads((run / "metrics.json").read_text())
print(f"\nquickstart test accuracy: {m['test/acc']:.4f}  macro-F1: {m['test/f1_macro']:.4f}  ({run / 'metrics.json'})")
print(f"predictions: {run / 'predictions.jsonl'}")
predict = taskhead.load(root / "export")
for text in ["A moving, beautifully acted film. I loved every minute.", "Dull, predictable and far too long."]:
    print(f"  {predict(text)['label']:>3}  {text}")
PY
