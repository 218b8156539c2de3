#!/usr/bin/env bash
# Install into .venv, then run the fast test suite (slow, real-data tests are opt-in: -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -m "not slow" -q -p no:cacheprovider "$@"
