"""The number format sampling runs in: float32, or bfloat16 autocast where the hardware has it.

`BIRDGEN_PRECISION` (or the `setting` argument) is "auto", "fp32" or "bf16". On CUDA, auto is
bf16 where the GPU supports it. On a CPU, auto stays float32: PyTorch's bf16 convolutions are
several times slower than float32 on CPUs without native bf16 (AVX2 only), and on CPUs with it
(`avx512_bf16` or `amx_bf16` among the flags) bf16's sample quality has not yet been measured
against float32 at equal seeds (BENCHMARKS.md), so there it is offered, not chosen.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PRECISION_ENV = "BIRDGEN_PRECISION"
PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    return bool(set(NATIVE_BF16_FLAGS) & (cpu_flags() if flags is None else flags))


def sampling_autocast(device: torch.device, setting: str | None = None) -> torch.dtype | None:
    """The autocast dtype for sampling on `device`, or None for float32."""
    setting = (setting or os.environ.get(PRECISION_ENV) or "auto").strip().lower()
    if setting not in PRECISIONS:
        raise ValueError(f"{PRECISION_ENV}={setting!r}: choose one of {', '.join(PRECISIONS)}")
    if setting == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if setting == "bf16" else None


def precision_text(device: torch.device, dtype: torch.dtype | None) -> str:
    """'float32', 'bfloat16 autocast', or float32 with a hint where the CPU could do bf16."""
    if dtype is not None:
        return f"{str(dtype).removeprefix('torch.')} autocast"
    if device.type == "cpu" and cpu_has_native_bf16():
        return f"float32 (this CPU has native bf16: {PRECISION_ENV}=bf16 tries it)"
    return "float32"
