"""Diffusion maths: noise schedules, the forward process, prediction targets and the loss.

Notation (Ho et al. 2020): alpha_bar_t = prod_{s<=t} (1 - beta_s);
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps;  SNR(t) = alpha_bar_t / (1 - alpha_bar_t).
Timesteps are integers 0 … T-1, where t = 0 is the least noisy step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("epsilon", "v")


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "cosine"
    num_steps: int = 1000  # T, the number of training noise steps
    prediction: str = "epsilon"  # what the network outputs: "epsilon" (noise) or "v" (velocity)
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02  # linear schedule only
    cosine_s: float = 0.008  # cosine schedule only

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction target {self.prediction!r}; choose one of {PREDICTIONS}")
        if not 2 <= self.num_steps <= 100_000:
            raise ValueError(f"num_steps {self.num_steps} out of range [2, 100000]")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start ({self.beta_start}) < beta_end ({self.beta_end}) < 1")

    def to_dict(self) -> dict:
        return asdict(self)


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020, sec. 4: betas rising linearly."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)."""
    def f(step):
        return math.cos((step / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


class NoiseSchedule:
    """The discrete schedule: betas, alpha_bar and SNR per step, and the forward process."""

    def __init__(self, config: DiffusionConfig):
        self.config = config
        if config.schedule == "linear":
            betas = linear_betas(config.num_steps, config.beta_start, config.beta_end)
        else:
            betas = cosine_betas(config.num_steps, config.cosine_s)
        self.betas64 = betas
        self.alpha_bar64 = torch.cumprod(1 - betas, dim=0)
        self.betas = betas.float()
        self.alpha_bar = self.alpha_bar64.float()
        self._copies: dict[tuple[str, torch.device], torch.Tensor] = {}

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """The table `name` ("alpha_bar", "alpha_bar64") on `device`, copied there once rather than
        on every training step."""
        key = (name, torch.device(device))
        if key not in self._copies:
            self._copies[key] = getattr(self, name).to(device)
        return self._copies[key]

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    def snr(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """SNR per step, or at timesteps `t` on t's device (no copy to the host)."""
        alpha_bar = self.alpha_bar64 if t is None else self.table("alpha_bar64", t.device)[t]
        return (alpha_bar / (1 - alpha_bar)).float()

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast against `like`."""
        alpha_bar = self.table("alpha_bar", like.device)[t].view(-1, *([1] * (like.ndim - 1)))
        return alpha_bar.sqrt().to(like.dtype), (1 - alpha_bar).sqrt().to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) in closed form (Ho et al. 2020, eq. 4)."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, sec. 4)."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * noise - sigma * x0

    def predict_x0_and_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Turns the network's output into (x_0, eps) estimates, whatever its prediction target."""
        alpha, sigma = self.coefficients(t, x_t)
        if self.config.prediction == "epsilon":
            eps = output
            x0 = (x_t - sigma * eps) / alpha
        else:
            x0 = alpha * x_t - sigma * output
            eps = sigma * x_t + alpha * output
        return x0, eps


class DiffusionLoss:
    """MSE between the network's output and its target at uniformly drawn timesteps, with
    optional min-SNR-gamma weighting (Hang et al. 2023, eq. 8): the per-sample weight is
    min(SNR, gamma) / SNR for epsilon targets and min(SNR, gamma) / (SNR + 1) for v targets."""

    def __init__(self, schedule: NoiseSchedule, min_snr_gamma: float | None = None):
        self.schedule = schedule
        self.min_snr_gamma = min_snr_gamma

    def __call__(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        x_t = self.schedule.add_noise(x0, noise, t)
        output = model(x_t, t) if labels is None else model(x_t, t, labels)
        if self.schedule.config.prediction == "epsilon":
            target = noise
        else:
            target = self.schedule.velocity(x0, noise, t)
        per_sample = F.mse_loss(output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * self.weights(t).to(per_sample.device)).mean()

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        snr = self.schedule.snr(t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return clipped / snr if self.schedule.config.prediction == "epsilon" else clipped / (snr + 1)


HELDOUT_FRACTIONS = (0.05, 0.25, 0.5, 0.75, 0.95)  # of T: steps 50, 250, 500, 750, 950 when T = 1000


def heldout_timesteps(num_steps: int) -> tuple[int, ...]:
    return tuple(int(round(f * num_steps)) for f in HELDOUT_FRACTIONS)


@torch.no_grad()
def heldout_loss(network, schedule: NoiseSchedule, images: torch.Tensor, timesteps=None,
                 seed: int = 0, batch_size: int = 64) -> dict[int, float]:
    """Noise-prediction MSE on held-out images at fixed timesteps and fixed noise, whatever the
    network's prediction target (its output is converted to an epsilon estimate), so two
    networks or two runs are compared on exactly the same problems."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator)
    device = next(network.parameters()).device
    results = {}
    for step in timesteps or heldout_timesteps(schedule.num_steps):
        if not 0 <= step < schedule.num_steps:
            raise ValueError(f"timestep {step} out of range [0, {schedule.num_steps})")
        total = 0.0
        for start in range(0, len(images), batch_size):
            x0 = images[start:start + batch_size].to(device)
            eps = noise[start:start + batch_size].to(device)
            t = torch.full((len(x0),), step, device=device, dtype=torch.long)
            x_t = schedule.add_noise(x0, eps, t)
            _, eps_hat = schedule.predict_x0_and_eps(network(x_t, t).float(), x_t, t)
            total += F.mse_loss(eps_hat, eps, reduction="sum").item()
        results[int(step)] = total / images.numel()
    return results
