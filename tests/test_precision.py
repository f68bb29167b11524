"""The sampling precision decision, on machines with and without native bf16 (mocked)."""

import pytest
import torch

from birdgen import precision
from birdgen.model_folder import build_model
from birdgen.diffusion import DiffusionConfig
from birdgen.networks import preset


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert precision.cpu_has_native_bf16(precision.cpu_flags(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n")
    assert not precision.cpu_has_native_bf16(precision.cpu_flags(cpuinfo))
    assert precision.cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("native", [True, False])
def test_cpu_sampling_is_bf16_only_where_the_cpu_has_it_unless_forced(monkeypatch, native):
    monkeypatch.setattr(precision, "machine_cpu_flags", lambda: {"avx2", "avx512_bf16"} if native else {"avx2"})
    cpu = torch.device("cpu")
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    assert precision.sampling_autocast(cpu) is (torch.bfloat16 if native else None)
    assert precision.precision_text(None) == "float32"
    monkeypatch.setenv(precision.PRECISION_ENV, "fp32")
    assert precision.sampling_autocast(cpu) is None
    monkeypatch.setenv(precision.PRECISION_ENV, "bf16")
    assert precision.sampling_autocast(cpu) is torch.bfloat16
    assert precision.precision_text(torch.bfloat16) == "bfloat16 autocast"
    monkeypatch.setenv(precision.PRECISION_ENV, "half")
    with pytest.raises(ValueError, match="BIRDGEN_PRECISION='half': choose one of auto, fp32, bf16"):
        precision.sampling_autocast(cpu)


def test_cuda_keeps_bf16_where_supported(monkeypatch):
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.sampling_autocast(torch.device("cuda")) is torch.bfloat16
    assert precision.sampling_autocast(torch.device("cuda"), "fp32") is None


def test_a_forced_bf16_denoiser_runs_and_stays_close_to_float32(monkeypatch):
    model = build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=100))
    with torch.no_grad():  # away from the zero-initialised output layer
        torch.manual_seed(0)
        for parameter in model.network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    x = torch.randn(2, 3, 16, 16)
    monkeypatch.setenv(precision.PRECISION_ENV, "fp32")
    full = model.denoiser().output(x, 50)
    monkeypatch.setenv(precision.PRECISION_ENV, "bf16")
    denoiser = model.denoiser()
    assert denoiser.autocast_dtype is torch.bfloat16
    half = denoiser.output(x, 50)
    assert full.abs().mean() > 0.1 and not torch.equal(half, full)
    assert half.dtype == torch.float32 and torch.allclose(half, full, atol=0.05 * float(full.abs().max()))
