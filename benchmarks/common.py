"""What every quality script shares: run the real ``taskhead`` command from the repo root and time it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_taskhead(args: list[str]) -> float:
    """``taskhead ARGS`` in the repo root (fails loudly on a non-zero exit); returns the wall time in seconds."""
    print("$ taskhead", " ".join(args), flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "taskhead.cli", *args], cwd=ROOT, check=True)
    return time.time() - t0
