"""Samplers: configured once, then stepped.

Each sampler walks a descending subset of the training timesteps and yields a
`SamplerStep` after every network evaluation, so the CLI's progress bar, the app's cancel
button and the denoising visualizer all consume the same generator::

    sampler = DDIMSampler(schedule, num_steps=50, eta=0.0)
    for step in sampler.steps(denoiser, noise, generator):
        ...  # step.x is the sample after this step; step.x0 the model's x_0 guess
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from .diffusion import NoiseSchedule

SAMPLERS = ("ddpm", "ddim", "dpmpp")
SPACINGS = ("trailing", "leading")


@dataclass
class SamplerStep:
    index: int  # 0-based number of this step
    num_steps: int  # steps in the whole run
    t: int  # the training timestep denoised in this step
    x: torch.Tensor  # the sample after this step; after the last step, the final images
    x0: torch.Tensor  # the model's prediction of the clean images at t


class Denoiser:
    """Wraps a network and its schedule into (x_t, t) -> (x_0, eps) estimates.

    `autocast_dtype` (torch.bfloat16 or torch.float16) runs the networks under autocast on
    the input's device; the estimates are always float32.

    For a class-conditional network, `labels` (one class index per image, or class weights per
    image that mix species, see `UNet.forward`) and `guidance` w
    apply classifier-free guidance (Ho & Salimans 2022, eq. 6) to the network's output:
    out = out_uncond + w (out_cond - out_uncond), both halves in one batched forward pass.
    w = 1 is the plain conditional output (one pass), w = 0 the unconditional one.

    With a `guide` network (a weaker model of the same task, schedule and target), autoguidance
    (Karras et al. 2024, eq. 2) moves the output away from the guide's:
    out = out_guide + guide_weight (out_main - out_guide); guide_weight 1 is the main network
    alone (the guide is not run), 0 the guide alone. `interval` (low, high), in training
    timesteps, limits both kinds of guidance to low <= t <= high (Kynkäänniemi et al. 2024);
    elsewhere the output is the plain conditional one. Every combination is linear in the
    output, so it holds for epsilon and v targets alike.

    `passes` counts network forward passes per image, by network ("main", "guide"), for the
    cost that captions and benchmarks report.
    """

    def __init__(self, model: torch.nn.Module, schedule: NoiseSchedule, autocast_dtype: torch.dtype | None = None,
                 channels_last: bool = False, labels: torch.Tensor | None = None, guidance: float = 1.0,
                 guide: torch.nn.Module | None = None, guide_weight: float = 1.0,
                 interval: tuple[int, int] | None = None):
        self.model = model
        self.schedule = schedule
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.labels = labels
        self.guidance = guidance
        self.guide = guide
        self.guide_weight = guide_weight
        self.interval = interval
        self.passes = {"main": 0, "guide": 0}

    def weights_at(self, t: int) -> tuple[float, float]:
        """(species weight, guide weight) at timestep t: the plain conditional model outside the interval."""
        inside = self.interval is None or self.interval[0] <= t <= self.interval[1]
        return (self.guidance if inside else 1.0), (self.guide_weight if inside and self.guide is not None else 1.0)

    def passes_at(self, t: int) -> dict[str, int]:
        """The forward passes per image `output` runs at timestep t, by network (a species-guided
        pass runs both halves in one batch and counts two)."""
        species_weight, guide_weight = self.weights_at(t)

        def passes(weight: float) -> int:
            return 2 if self.labels is not None and weight not in (0, 1) else 1

        return {"main": passes(species_weight) if guide_weight != 0 else 0,
                "guide": passes(min(species_weight, 1.0)) if guide_weight != 1 else 0}

    def output(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The network's guided output at one timestep, float32."""
        timesteps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        species_weight, guide_weight = self.weights_at(t)
        if guide_weight == 0:
            return self._species_output(self.guide, "guide", x_t, timesteps, min(species_weight, 1.0))
        main = self._species_output(self.model, "main", x_t, timesteps, species_weight)
        if guide_weight == 1:
            return main
        # The guide follows the label the main network follows (none where species_weight is 0).
        guide = self._species_output(self.guide, "guide", x_t, timesteps, min(species_weight, 1.0))
        return guide.lerp(main, guide_weight)

    def _species_output(self, network, role: str, x_t, timesteps, weight: float) -> torch.Tensor:
        if self.labels is None:
            return self._network(network, role, x_t, timesteps, None)
        labels = self.labels.to(x_t.device)
        null = torch.full(labels.shape[:1], network.null_class, device=x_t.device, dtype=torch.long)
        if labels.is_floating_point():  # class weights (N, num_classes + 1): the null class as weights too
            null = torch.nn.functional.one_hot(null, labels.shape[1]).to(labels.dtype)
        if weight == 1:
            return self._network(network, role, x_t, timesteps, labels)
        if weight == 0:
            return self._network(network, role, x_t, timesteps, null)
        both = self._network(network, role, torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]),
                             torch.cat([labels, null]), passes=2)
        conditional, unconditional = both.chunk(2)
        return unconditional + weight * (conditional - unconditional)

    def _network(self, network, role: str, x_t, timesteps, labels, passes: int = 1) -> torch.Tensor:
        self.passes[role] += passes
        network_input = x_t.contiguous(memory_format=torch.channels_last) if self.channels_last else x_t
        context = (torch.autocast(x_t.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                   else nullcontext())
        with context:
            output = network(network_input, timesteps) if labels is None else network(network_input, timesteps,
                                                                                        labels)
        return output.float().contiguous()

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        timesteps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        return self.schedule.predict_x0_and_eps(self.output(x_t, t), x_t, timesteps)


class Sampler:
    """Common set-up: which timesteps to visit.

    Args:
        schedule: the training noise schedule.
        num_steps: network evaluations, 1 … schedule.num_steps.
        spacing: "trailing" (start at the noisiest step T-1; better with few steps) or
            "leading" (0, k, 2k, … as in the DDIM paper and diffusers' default).
        clip_x0: clamp each x_0 prediction to the pixel range [-1, 1].
    """

    name = ""

    def __init__(self, schedule: NoiseSchedule, num_steps: int, spacing: str = "trailing", clip_x0: bool = True):
        total = schedule.num_steps
        if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= total:
            raise ValueError(f"{self.name} steps {num_steps} out of range [1, {total}]")
        if spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
        self.schedule = schedule
        self.num_steps = int(num_steps)
        self.clip_x0 = clip_x0
        if spacing == "trailing":
            steps = np.round(np.arange(total, 0, -total / num_steps)).astype(np.int64) - 1
        else:
            steps = (np.arange(num_steps) * (total // num_steps))[::-1]
        self.timesteps: list[int] = [int(t) for t in steps]

    def alpha_bar(self, index: int) -> float:
        """alpha_bar at the index-th visited timestep; 1 (no noise) past the last one."""
        if index >= self.num_steps:
            return 1.0
        return float(self.schedule.alpha_bar64[self.timesteps[index]])

    def denoise(self, denoiser: Denoiser, x: torch.Tensor, t: int, alpha_bar_t: float):
        x0, eps = denoiser(x, t)
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(alpha_bar_t) * x0) / math.sqrt(1 - alpha_bar_t)
        return x0, eps

    def steps(self, denoiser: Denoiser, noise: torch.Tensor,
              generator: torch.Generator | None = None) -> Iterator[SamplerStep]:
        raise NotImplementedError


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12):
    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev).

    Args:
        eta: 0 gives the deterministic DDIM; 1 gives DDPM's ancestral noise level. Range [0, 1].
    """

    name = "ddim"

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, eta: float = 0.0, **options):
        if not 0 <= eta <= 1:
            raise ValueError(f"eta {eta} out of range [0, 1]")
        super().__init__(schedule, num_steps, **options)
        self.eta = eta

    def steps(self, denoiser, noise, generator=None):
        x = noise
        for i, t in enumerate(self.timesteps):
            ab_t, ab_prev = self.alpha_bar(i), self.alpha_bar(i + 1)
            x0, eps = self.denoise(denoiser, x, t, ab_t)
            sigma = self.eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
            x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            yield SamplerStep(i, self.num_steps, t, x, x0)


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) from the posterior q(x_prev | x_t, x_0)
    (eq. 6-7), on the full chain or on a respaced subset of steps (Nichol & Dhariwal 2021, sec. 4)
    where beta_t becomes 1 - ab_t / ab_prev."""

    name = "ddpm"

    def __init__(self, schedule: NoiseSchedule, num_steps: int | None = None, **options):
        super().__init__(schedule, schedule.num_steps if num_steps is None else num_steps, **options)

    def steps(self, denoiser, noise, generator=None):
        x = noise
        for i, t in enumerate(self.timesteps):
            ab_t, ab_prev = self.alpha_bar(i), self.alpha_bar(i + 1)
            x0, _ = self.denoise(denoiser, x, t, ab_t)
            beta = 1 - ab_t / ab_prev
            mean = (math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)) * x
            variance = beta * (1 - ab_prev) / (1 - ab_t)
            x = mean
            if variance > 0:
                x = x + math.sqrt(variance) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            yield SamplerStep(i, self.num_steps, t, x, x0)


class DPMSolverPlusPlusSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), a multistep solver of the diffusion ODE
    in data-prediction form. With lambda = log(alpha / sigma) and h = lambda_t - lambda_s:
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D,
    D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev, r = h_prev / h (first order on the first step and
    on the last step, which lands on sigma = 0 and returns the x_0 prediction)."""

    name = "dpmpp"

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 20, **options):
        super().__init__(schedule, num_steps, **options)

    def steps(self, denoiser, noise, generator=None):
        x = noise
        previous_x0, previous_h = None, None
        for i, t in enumerate(self.timesteps):
            ab_s, ab_t = self.alpha_bar(i), self.alpha_bar(i + 1)
            x0, _ = self.denoise(denoiser, x, t, ab_s)
            if ab_t >= 1.0:
                x = x0
            else:
                alpha_s, sigma_s = math.sqrt(ab_s), math.sqrt(1 - ab_s)
                alpha_t, sigma_t = math.sqrt(ab_t), math.sqrt(1 - ab_t)
                h = math.log(alpha_t / sigma_t) - math.log(alpha_s / sigma_s)
                if previous_x0 is None:
                    data = x0
                else:
                    r = previous_h / h
                    data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
                x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * data
                previous_h = h
            previous_x0 = x0
            yield SamplerStep(i, self.num_steps, t, x, x0)


SAMPLER_CLASSES: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "dpmpp": DPMSolverPlusPlusSampler,
}
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpmpp": 20}


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int | None = None, eta: float = 0.0,
                 **options) -> Sampler:
    """Builds a sampler by name ('ddpm', 'ddim' or 'dpmpp'); eta applies to DDIM only."""
    if name not in SAMPLER_CLASSES:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    steps = min(DEFAULT_STEPS[name], schedule.num_steps) if num_steps is None else num_steps
    if name == "ddim":
        return DDIMSampler(schedule, steps, eta=eta, **options)
    return SAMPLER_CLASSES[name](schedule, steps, **options)


def initial_noise(num_images: int, image_size: int, seed: int, device: torch.device | str = "cpu",
                  channels: int = 3) -> tuple[torch.Tensor, torch.Generator]:
    """x_T ~ N(0, I) from a seeded generator, and that generator for the sampler's later noise.
    The same seed gives the same images on the same device."""
    generator = torch.Generator(device=device).manual_seed(int(seed))
    noise = torch.randn((num_images, channels, image_size, image_size), generator=generator, device=device)
    return noise, generator


class Cancelled(Exception):
    """A run stopped between two steps because its `on_step` asked to."""


def run_steps(steps: Iterable[SamplerStep], on_step: Callable[[SamplerStep], bool | None] | None = None
              ) -> SamplerStep:
    """Runs a step generator (a sampler's, an edit's, an interpolation's) to its end and returns
    the last step. `on_step(step)` is called after every step (a progress bar takes its total
    from `step.num_steps`); returning True cancels the run, which raises `Cancelled`."""
    last = None
    for last in steps:
        if on_step is not None and on_step(last):
            raise Cancelled(f"cancelled after {last.index + 1} of {last.num_steps} steps")
    return last


def run_to_end(sampler: Sampler, denoiser: Denoiser, noise: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Runs every step and returns the final images (float, model range)."""
    return run_steps(sampler.steps(denoiser, noise, generator)).x
