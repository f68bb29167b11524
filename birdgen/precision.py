"""The number format sampling runs in: float32, or bfloat16 autocast where the hardware has it.

`BIRDGEN_PRECISION` (or the `setting` argument) is "auto", "fp32" or "bf16". On CUDA, auto is
bf16 where the GPU supports it. On a CPU, auto is bf16 only where the CPU has native bf16
(`avx512_bf16` or `amx_bf16` among its flags): there the default generation is 1.55× faster
(BENCHMARKS.md, row 8b), while on AVX2-only CPUs PyTorch's bf16 is about 6× slower than float32
(row 8). bf16's samples were measured against float32 from the same seeds and differ by less
than two float32 seeds do (BENCHMARKS.md, "bf16 sampling").
"""

from __future__ import annotations

import functools
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


@functools.cache
def machine_cpu_flags() -> frozenset[str]:
    """This machine's CPU flags, read once: sampling asks on every generation."""
    return frozenset(cpu_flags())


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    return bool(set(NATIVE_BF16_FLAGS) & (machine_cpu_flags() if flags is None else flags))


def sampling_autocast(device: torch.device, setting: str | None = None) -> torch.dtype | None:
    """The autocast dtype for sampling on `device`, or None for float32."""
    setting = (setting or os.environ.get(PRECISION_ENV) or "auto").strip().lower()
    if setting not in PRECISIONS:
        raise ValueError(f"{PRECISION_ENV}={setting!r}: choose one of {', '.join(PRECISIONS)}")
    if setting == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if setting == "bf16" or cpu_has_native_bf16() else None


def precision_text(dtype: torch.dtype | None) -> str:
    """'float32' or 'bfloat16 autocast', for the app's model line."""
    return f"{str(dtype).removeprefix('torch.')} autocast" if dtype is not None else "float32"
