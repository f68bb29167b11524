"""Generation as the CLI and the app both use it: a model, a sampler, a seed -> birds."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .model_folder import BirdModel
from .guidance import GUIDE_WEIGHT_RANGE, SPECIES_WEIGHT_RANGE, ResolvedGuidance, check_weight
from .species import require_species_model
from .species import require_species_model
from .samplers import Denoiser, Sampler, SamplerStep, initial_noise, make_sampler, run_steps

MAX_IMAGES = 256


# What a model samples with when the user names no sampler, unless it is a distilled student:
# the cheapest setting that keeps quality (BENCHMARKS.md, "Steps and quality").
DEFAULT_SAMPLING = ("dpmpp", 10)


@dataclass
class GenerationRequest:
    sampler: str | None = None  # "ddpm", "ddim" or "dpmpp"; None = the model's default (`model_sampling`)
    steps: int | None = None  # network evaluations; None = the sampler's default, or the model's with no sampler
    num_images: int = 16  # 1 … MAX_IMAGES
    seed: int = 0
    eta: float = 0.0  # DDIM only, [0, 1]
    species: tuple[int, ...] = ()  # class indices of a species model: num_images of each, one row per species
    guidance: float | None = None  # species guidance w (guidance.SPECIES_WEIGHT_RANGE); None: the model's default
    guide_weight: float | None = None  # autoguidance w (guidance.GUIDE_WEIGHT_RANGE); None: the model's; 1: off
    interval: tuple[int, int] | None = None  # timesteps where guidance applies; None: the model's default

    @property
    def total_images(self) -> int:
        return self.num_images * max(1, len(self.species))

    def validate(self) -> None:
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise ValueError(f"number of images {self.num_images} out of range [1, {MAX_IMAGES}]")
        if self.total_images > MAX_IMAGES:
            raise ValueError(f"{self.num_images} images × {len(self.species)} species is more than {MAX_IMAGES}")
        if self.guidance is not None:
            check_weight("guidance", self.guidance, SPECIES_WEIGHT_RANGE)
        if self.guide_weight is not None:
            check_weight("guide weight", self.guide_weight, GUIDE_WEIGHT_RANGE)
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed {self.seed} out of range [0, 2^63)")


def model_sampling(model: BirdModel, sampler: str | None = None, steps: int | None = None,
                   default: tuple[str, int] = DEFAULT_SAMPLING) -> tuple[str, int | None]:
    """The (sampler, steps) a generation runs, from what it asks for: unset parts come from a
    distilled student's own sampler (`check_student_sampler` then refuses any other), else from
    `default` (the app's DEFAULT_SAMPLING, or evaluation's EVAL_SAMPLING) when no sampler is
    named; a sampler named without steps gets None, its own default (samplers.DEFAULT_STEPS)."""
    if model.sampling is not None:
        return sampler or model.sampling.sampler, model.sampling.steps if steps is None else steps
    if sampler is None:
        return default[0], min(default[1], model.schedule.num_steps) if steps is None else steps
    return sampler, steps


def for_model(model: BirdModel, request: GenerationRequest) -> GenerationRequest:
    """The request with a student's fixed sampler in place of whatever was asked (the app's
    shared controls, e.g. Compare's, then still fit both models)."""
    if model.sampling is None:
        return request
    sampler, steps = model_sampling(model)
    return dataclasses.replace(request, sampler=sampler, steps=steps, eta=0.0)


def make_request_sampler(model: BirdModel, request: GenerationRequest) -> Sampler:
    request.validate()
    sampler, steps = model_sampling(model, request.sampler, request.steps)
    check_student_sampler(model, sampler, steps, request.eta)
    if request.eta and sampler != "ddim":
        raise ValueError(f"eta {request.eta:g} applies to DDIM only, not {sampler} (choose the ddim sampler)")
    return make_sampler(sampler, model.schedule, steps, eta=request.eta)


def check_student_sampler(model: BirdModel, sampler: str, steps: int | None, eta: float = 0.0) -> None:
    """A distilled student works only with the sampler and steps it was distilled for."""
    if model.sampling is None:
        return
    fixed = model_sampling(model)
    if (sampler, steps) != fixed or eta:
        raise ValueError(f"{model.name} is a student distilled for {fixed[1]} {fixed[0]} steps only; {sampler} with"
                         f" {steps} steps{f' and eta {eta:g}' if eta else ''} would give noise, not birds (leave"
                         " sampler and steps unset, or use its teacher)")


def planned_passes(model: BirdModel, request: GenerationRequest) -> dict[str, int]:
    """Network forward passes per image this request will run, by network ({"main": …, "guide": …}),
    as `Denoiser.passes` will count them; known before running."""
    sampler = make_request_sampler(model, request)
    labels = torch.zeros(len(request.species), dtype=torch.long) if request.species else None
    denoiser = request_denoiser(model, request, labels)
    passes = [denoiser.passes_at(t) for t in sampler.timesteps]
    return {network: sum(p[network] for p in passes) for network in ("main", "guide")}


def planned_evaluations(model: BirdModel, request: GenerationRequest) -> int:
    """Network forward passes per image, guide passes included."""
    return sum(planned_passes(model, request).values())


def planned_flops(model: BirdModel, request: GenerationRequest) -> int:
    """Floating-point operations per image this request will run, the guide's included."""
    return passes_flops(model, planned_passes(model, request))


def passes_flops(model: BirdModel, passes: dict[str, int]) -> int:
    """Floating-point operations of these forward passes ({"main": …, "guide": …}) for one image."""
    return passes["main"] * model.flops_per_image + (passes["guide"] * model.guide.flops_per_image
                                                      if passes["guide"] else 0)


def request_denoiser(model: BirdModel, request: GenerationRequest, labels: torch.Tensor | None = None) -> Denoiser:
    return model.denoiser(labels, model.resolve_guidance(request.guidance, request.guide_weight, request.interval))


def generation_steps(model: BirdModel, request: GenerationRequest, noise: torch.Tensor | None = None,
                     denoiser: list | None = None) -> Iterator[SamplerStep]:
    """Yields every sampler step for this request. `noise` overrides the seeded x_T (the
    Compare page passes the same noise to two models); `denoiser`, a list, receives the
    Denoiser that runs, whose `passes` then count the network evaluations."""
    sampler = make_request_sampler(model, request)
    labels = None
    if request.species:
        require_species_model(model)
        if not all(0 <= s < model.network_config.num_classes for s in request.species):
            raise ValueError(f"species index out of range [0, {model.network_config.num_classes})")
        labels = torch.tensor(request.species, device=model.device).repeat_interleave(request.num_images)
    seeded, generator = initial_noise(request.total_images, model.network_config.image_size, request.seed,
                                      model.device, model.network_config.in_channels)
    x_t = seeded if noise is None else noise.to(model.device)
    running = request_denoiser(model, request, labels)
    if denoiser is not None:
        denoiser.append(running)
    yield from sampler.steps(running, x_t, generator)


@dataclass
class Generation:
    images: torch.Tensor  # float NCHW in model range [-1, 1]
    seconds: float
    steps: int
    passes: dict[str, int]  # network forward passes per image: {"main": …, "guide": …}
    guidance: ResolvedGuidance

    def cost_text(self, model: BirdModel) -> str:
        """'10 evaluations of small-attn + 8 of its guide small-attn-guide (1.27× the unguided cost)',
        or '10 network evaluations'."""
        main, guide = self.passes["main"], self.passes["guide"]
        if not guide:
            return f"{main} network evaluation{'s' if main != 1 else ''}"
        ratio = passes_flops(model, self.passes) / (self.steps * model.flops_per_image)
        return (f"{main} evaluations of {model.name} + {guide} of its guide"
                f" {model.guide.name} ({ratio:.2f}× the unguided cost)")


def generate(model: BirdModel, request: GenerationRequest, noise: torch.Tensor | None = None,
             on_step=None) -> Generation:
    """Runs all steps. `on_step(step)` may return True to cancel, which raises `Cancelled`."""
    started = time.perf_counter()
    running = []
    last = run_steps(generation_steps(model, request, noise, running), on_step)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return Generation(last.x, time.perf_counter() - started, last.num_steps, dict(running[0].passes),
                      model.resolve_guidance(request.guidance, request.guide_weight, request.interval))


class QueueFull(RuntimeError):
    """The generation queue already holds as many waiting requests as it may."""


class GenerationQueue:
    """Lets one generation run at a time, first come first served, and tells the waiting ones
    their place. Several app users on one machine share its cores: two generations at once
    each take about twice as long, so running them in turn gets the first result sooner and
    the last no later."""

    def __init__(self, max_waiting: int | None = None):
        self.max_waiting = max_waiting  # None: no limit; else a request past it raises QueueFull at once
        self._condition = threading.Condition()
        self._tickets = 0  # handed out so far
        self._serving = 0  # the ticket whose holder may run
        self._abandoned: set[int] = set()

    def _waiting(self) -> int:
        """Requests holding a ticket but not yet running (called with the condition held)."""
        running = 1 if self._serving < self._tickets else 0
        return self._tickets - self._serving - running - sum(t > self._serving for t in self._abandoned)

    @contextlib.contextmanager
    def turn(self, on_wait: Callable[[int], None] | None = None, poll_s: float = 0.25):
        """Waits for this caller's turn, calling `on_wait(requests ahead)` while it waits (the
        app's message, and a point where Streamlit can stop a page that was left)."""
        with self._condition:
            if self.max_waiting is not None and self._waiting() >= self.max_waiting:
                raise QueueFull(f"{self._waiting()} requests are already waiting")
            ticket = self._tickets
            self._tickets += 1
        try:
            while True:
                with self._condition:
                    if ticket == self._serving:
                        break
                    ahead = ticket - self._serving - sum(self._serving < t < ticket for t in self._abandoned)
                    self._condition.wait(poll_s)
                if on_wait is not None:
                    on_wait(ahead)
            yield
        finally:
            with self._condition:
                if ticket == self._serving:
                    self._serving += 1
                else:  # left the queue before its turn: its place is skipped when reached
                    self._abandoned.add(ticket)
                while self._serving in self._abandoned:
                    self._abandoned.discard(self._serving)
                    self._serving += 1
                self._condition.notify_all()
