"""``precision: auto``: bf16 autocast only where the hardware computes in bf16, fp32 everywhere else.

bf16 autocast is a large speed-up where matmuls run natively in bf16 (Ampere+ GPUs; CPUs with AVX512-BF16 or AMX;
Arm CPUs with the BF16 extension) and a large slow-down where they are emulated: on an AVX2-only CPU a bf16 matmul
ran ~58x slower than fp32 in our measurement (issue 13). So no config names bf16 outright; ``auto`` decides per
machine, and an explicit bf16 on a CPU without native support runs but says how slow it will be.
"""

from __future__ import annotations

import platform
from pathlib import Path

# x86: AVX512-BF16 (Cooper Lake, Zen 4+), AMX-BF16 (Sapphire Rapids+). Arm: the BF16 extension ("bf16" in Features).
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux ``flags``/``Features`` lines; empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU computes bf16 natively. Apple silicon (M2 and later) has the Arm BF16 extension but exposes no
    /proc/cpuinfo; it is treated as not native (fp32), the safe side."""
    flags = cpu_flags() if flags is None else flags
    return bool(NATIVE_BF16_FLAGS & flags)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.lower().startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def choose_precision(
    accelerator: str,
    flags: set[str] | None = None,
    cuda_available: bool | None = None,
    cuda_bf16: bool | None = None,
) -> tuple[str, str]:
    """``precision: auto`` → ``(Lightning precision, why)``.

    bf16-mixed on CUDA GPUs with bf16 (Ampere+) and on CPUs with native bf16; 16-mixed on older CUDA GPUs; 32-true
    otherwise (CPUs without native bf16, Apple MPS, anything else). ``accelerator`` is the trainer's (``auto`` means a
    GPU when CUDA is available). The hardware facts are arguments so the choice is testable on any machine.
    """
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda_available)
    if gpu and cuda_available:
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        if cuda_bf16:
            return "bf16-mixed", "the CUDA GPU supports bf16"
        return "16-mixed", "the CUDA GPU has no bf16 (pre-Ampere): fp16 autocast with loss scaling"
    if accelerator in ("cpu", "auto"):
        if cpu_has_native_bf16(flags):
            return "bf16-mixed", "the CPU has native bf16 (AVX512-BF16/AMX/Arm BF16)"
        return "32-true", "the CPU has no native bf16 (bf16 would be emulated, many times slower)"
    return "32-true", f"accelerator '{accelerator}': fp32"


def bf16_warning(precision: str, accelerator: str, flags: set[str] | None = None, cuda_available: bool | None = None) -> str | None:
    """A warning for an explicit bf16 precision on a CPU that emulates bf16; None when there is nothing to say."""
    import torch

    if "bf16" not in str(precision):
        return None
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not cuda_available)
    if on_cpu and not cpu_has_native_bf16(flags):
        return (f"precision {precision} on a CPU without native bf16 (no AVX512-BF16/AMX): bf16 is emulated and runs "
                "many times slower than fp32; use --trainer.precision auto (or 32-true)")
    return None


def autocast_dtype(device: str | "torch.device", precision: str = "auto"):
    """For ``taskhead.load``: the autocast dtype for inference on ``device`` (None: plain fp32)."""
    import torch

    kind = torch.device(device).type
    if precision == "auto":
        precision, _ = choose_precision("cpu" if kind == "cpu" else "gpu" if kind == "cuda" else kind)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None
