"""`birdgen distill`: progressive distillation (Salimans & Ho 2022) of a model into a student
that samples with a few deterministic DDIM steps.

Each round halves the steps: a student, starting as a copy of its teacher, learns to take in one
DDIM step what the teacher takes in two, on the teacher's own DDIM grid (2N trailing steps ->
N). The next round's teacher is this round's student. A run folder holds what a training run
holds (config.json, run.json, metrics.jsonl, checkpoints/ with model.safetensors = the student,
teacher.safetensors = this round's teacher and state.pt, samples/), so it resumes exactly and
`birdgen export` turns it into a model folder that records its sampler and step count.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .data import model_crops, recover_split
from .guidance import GUIDE_WEIGHT_RANGE, GuidanceError, ResolvedGuidance, check_weight
from .diffusion import DiffusionConfig, NoiseSchedule
from .model_folder import BirdModel, ModelError, config_dict, load_model, save_model
from .networks import UNet, UNetConfig, parameter_count
from .records import DistillationRecord, SamplingRecord, record_dict
from .run_folder import BatchStream, LoopState, RunFolder, StopRequests, TrainingError, read_state, save_weights
from .samplers import DDIMSampler
from .training_loop import check_streak, config_from_dict, draw_batch, log_interval, preview_images, resolve_precision
from .utils import atomic_write, machine_description, resolve_device

METHOD = "progressive distillation (Salimans & Ho 2022)"
RESUMABLE_CHANGES = {"checkpoint_every", "keep_checkpoints", "sample_every", "log_every", "num_threads", "progress",
                     "max_nonfinite", "device", "precision", "channels_last"}


@dataclass
class DistillConfig:
    teacher: str = "models/small-attn"  # model folder: a trained model, or a student to halve further
    guide: str = ""  # guide folder that autoguides the first round's targets, or "none"; unset: the teacher's own
    guide_weight: float | None = None  # its weight w, 0-5 (1: unguided); unset: the teacher's default
    data: str = ""  # CUB_200_2011 root; the teacher's own training crops are used (its split record)
    teacher_steps: int = 32  # DDIM steps of the teacher that the first round halves
    steps_target: int = 4  # DDIM steps of the final student; teacher_steps / steps_target must be a power of 2
    round_steps: int = 1000  # optimizer steps per halving round
    batch_size: int = 32  # images per optimizer step
    lr: float = 1e-4  # decayed linearly to 0 within each round (Salimans & Ho 2022, appendix)
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 turns clipping off
    seed: int = 0  # seeds batches, noise and timesteps
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16", "fp16"
    channels_last: bool = True  # NHWC memory layout (faster convolutions)
    num_threads: int = 0  # CPU threads; 0 = all cores
    checkpoint_every: int = 250  # optimizer steps between resumable checkpoints
    keep_checkpoints: int = 2  # most recent checkpoints kept
    sample_every: int = 500  # previews also at the end of every round
    sample_count: int = 16  # images per preview grid
    log_every: int = 20  # optimizer steps between metrics.jsonl lines
    progress: bool = True  # a progress bar on the terminal
    max_nonfinite: int = 20  # consecutive skipped (non-finite) steps before distillation gives up

    @property
    def rounds(self) -> int:
        return round(math.log2(self.teacher_steps / self.steps_target))

    @property
    def total_steps(self) -> int:
        return self.rounds * self.round_steps

    def student_steps(self, round_index: int) -> int:
        return self.teacher_steps >> (round_index + 1)

    def validate(self) -> None:
        for name in ("teacher_steps", "steps_target", "round_steps", "batch_size", "checkpoint_every",
                     "keep_checkpoints", "sample_every", "sample_count", "log_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1 (got {getattr(self, name)})")
        ratio = self.teacher_steps / self.steps_target
        if self.teacher_steps % self.steps_target or ratio < 2 or ratio != 2 ** round(math.log2(ratio)):
            raise TrainingError(f"steps_target {self.steps_target} must divide teacher_steps {self.teacher_steps} by a"
                                " power of two (each round halves the steps), e.g. 32 -> 4")
        if not self.lr > 0:
            raise TrainingError(f"learning rate must be positive (got {self.lr})")
        if self.grad_clip < 0 or self.num_threads < 0:
            raise TrainingError("grad_clip and num_threads must not be negative")
        if self.guide_weight is not None:
            try:
                check_weight("guide_weight", self.guide_weight, GUIDE_WEIGHT_RANGE)
            except GuidanceError as error:
                raise TrainingError(str(error)) from None
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise TrainingError(f"precision {self.precision!r}: choose one of auto, fp32, bf16, fp16")

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "DistillConfig":
        return config_from_dict(cls, values, source)


class ProgressiveDistillationLoss:
    """Salimans & Ho 2022, Algorithm 2, for one round: a student of N DDIM steps against a
    teacher of 2N on the same trailing grid, whose every other point is the student's.

    From z_t at a student grid point t, two teacher DDIM steps land on z_t'' (t' and t'' the next
    two teacher points; t'' may be the clean end, where z_t'' is the teacher's x_0). The x_0
    that makes one student DDIM step from z_t land exactly there is (Algorithm 2)
        x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),
    and the loss is the truncated-SNR-weighted error max(SNR_t, 1) ||x~ - x_hat(z_t)||^2 (sec. 4).
    The teacher's steps clip x_0 to [-1, 1] as the samplers do, so the student learns the
    sampler the app runs; with a `guide`, they are autoguided with weight `guide_weight` at the
    timesteps in `interval`, so the student learns the guided sampler in its own few steps.
    """

    def __init__(self, schedule: NoiseSchedule, student_steps: int, autocast_dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu", guide: torch.nn.Module | None = None, guide_weight: float = 1.0,
                 interval: tuple[int, int] | None = None):
        teacher_grid = DDIMSampler(schedule, 2 * student_steps).timesteps
        student_grid = DDIMSampler(schedule, student_steps).timesteps
        if teacher_grid[::2] != student_grid:
            raise TrainingError(f"the {2 * student_steps}-step DDIM grid does not contain the {student_steps}-step one"
                                f" for {schedule.num_steps} noise steps; pick step counts that divide it")
        self.schedule = schedule
        self.student_steps = student_steps
        self.autocast_dtype = autocast_dtype
        # Teacher grid points 0 … 2N-1, then the clean end (timestep -1, alpha_bar = 1).
        # Kept on the training device, so that indexing them never copies to or from the host.
        self.timesteps = torch.tensor(teacher_grid + [-1], device=device)
        self.alpha_bar = torch.cat([schedule.alpha_bar64[teacher_grid],
                                    torch.ones(1, dtype=torch.float64)]).float().to(device)
        self.guide = guide if guide_weight != 1 else None
        self.guide_weight = guide_weight
        low, high = interval or (0, schedule.num_steps - 1)
        self.guided = (self.timesteps >= low) & (self.timesteps <= high)

    def _coefficients(self, points: torch.Tensor, like: torch.Tensor):
        alpha_bar = self.alpha_bar[points].view(-1, 1, 1, 1)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def _predict_x0(self, network, z: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        t = self.timesteps[points]
        with torch.autocast(z.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            output = network(z, t).float()
        return self.schedule.predict_x0_and_eps(output, z, t)[0]

    def _teacher_x0(self, teacher, z: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """The teacher's x_0, autoguided inside the interval where there is a guide (Karras et al.
        2024, eq. 1: D = D_guide + w (D_main - D_guide), as the app's samplers run it)."""
        x0 = self._predict_x0(teacher, z, points)
        if self.guide is None:
            return x0
        guided = self._predict_x0(self.guide, z, points).lerp(x0, self.guide_weight)
        return torch.where(self.guided[points].view(-1, 1, 1, 1), guided, x0)

    @torch.no_grad()
    def _teacher_step(self, teacher, z: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """One clipped DDIM step (Song et al. 2021, eq. 12, eta = 0) from grid point p to p + 1."""
        x0 = self._teacher_x0(teacher, z, points).clamp(-1, 1)
        alpha, sigma = self._coefficients(points, z)
        eps = (z - alpha * x0) / sigma
        alpha_next, sigma_next = self._coefficients(points + 1, z)
        return alpha_next * x0 + sigma_next * eps

    @torch.no_grad()
    def target(self, teacher, z: torch.Tensor, student_index: torch.Tensor) -> torch.Tensor:
        """x~ for student grid indices (0 = noisiest) at z."""
        points = 2 * student_index.to(z.device)
        z_end = self._teacher_step(teacher, self._teacher_step(teacher, z, points), points + 1)
        alpha, sigma = self._coefficients(points, z)
        alpha_end, sigma_end = self._coefficients(points + 2, z)
        ratio = sigma_end / sigma
        return (z_end - ratio * z) / (alpha_end - ratio * alpha)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, student_index: torch.Tensor) -> torch.Tensor:
        """z_t ~ q(z_t | x_0) at the student's grid points."""
        alpha, sigma = self._coefficients(2 * student_index.to(x0.device), x0)
        return alpha * x0 + sigma * noise

    def weights(self, student_index: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alpha_bar[2 * student_index]
        return (alpha_bar / (1 - alpha_bar)).clamp(min=1.0)

    def __call__(self, student, teacher, x0: torch.Tensor, noise: torch.Tensor,
                 student_index: torch.Tensor) -> torch.Tensor:
        z = self.noisy(x0, noise, student_index)
        target = self.target(teacher, z, student_index)
        x_hat = self._predict_x0(student, z, 2 * student_index.to(z.device))
        per_sample = (x_hat - target).square().mean(dim=(1, 2, 3))
        return (per_sample * self.weights(student_index)).mean()


def load_teacher(config: DistillConfig, device: torch.device):
    """The teacher model; a student may teach only at its own step count (its grid's halves)."""
    try:
        teacher = load_model(config.teacher, device, guide=config.guide or None)
    except ModelError as error:
        raise TrainingError(f"teacher: {error}") from None
    if teacher.conditional:
        raise TrainingError(f"teacher {config.teacher}: a species model; distilling classifier-free guidance is not"
                            " supported, pick an unconditional model")
    if teacher.sampling is not None:
        fixed = teacher.sampling.steps
        if teacher.sampling.sampler != "ddim" or fixed != config.teacher_steps:
            raise TrainingError(f"teacher {config.teacher}: a student distilled for {fixed}"
                                f" {teacher.sampling.sampler} steps can only teach at that count; pass"
                                f" --teacher-steps {fixed}")
    if config.teacher_steps > teacher.schedule.num_steps:
        raise TrainingError(f"teacher_steps {config.teacher_steps} exceeds the teacher's {teacher.schedule.num_steps}"
                            " noise steps")
    return teacher


class DistillState(LoopState):
    """A distillation run's LoopState: the student and this round's teacher, and the round."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, lr: float, generator: torch.Generator,
                 stream: BatchStream, device: torch.device):
        self.student, self.teacher, self.lr = student, teacher, lr
        super().__init__({"model": student, "teacher": teacher}, self.new_optimizer(device), generator, stream,
                         device)
        self.round = 0

    def new_optimizer(self, device: torch.device) -> torch.optim.Optimizer:
        """Each round starts a fresh AdamW; its learning rate decays to 0 within the round."""
        return torch.optim.AdamW(self.student.parameters(), lr=self.lr, weight_decay=0.0, fused=device.type == "cuda")

    def state_dict(self, reason: str) -> dict:
        return {**super().state_dict(reason), "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.round = state["round"]

    def next_round(self) -> None:
        """This round's student becomes the next round's teacher."""
        self.round += 1
        self.teacher.load_state_dict(self.student.state_dict())
        self.optimizer = self.new_optimizer(self.device)


def distillation_step(state: DistillState, loss_fn: ProgressiveDistillationLoss, images: torch.Tensor,
                      config: DistillConfig) -> bool:
    """One optimizer step at the round's learning rate; a non-finite one is not taken."""
    in_round = state.step - state.round * config.round_steps
    for group in state.optimizer.param_groups:
        group["lr"] = config.lr * (1 - in_round / config.round_steps)
    x0, index, noise, _ = draw_batch(images, state.stream, state.generator, loss_fn.student_steps,
                                     channels_last=config.channels_last)
    loss = loss_fn(state.student, state.teacher, x0, noise, index)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.student.parameters(), config.grad_clip or float("inf"))
    finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
    state.tallies.add(loss, grad_norm, finite)
    if not bool(finite):
        state.optimizer.zero_grad(set_to_none=True)
        check_streak(int(state.tallies.streak), config.max_nonfinite, state.step)
        return False
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return True


def teacher_guide(config: DistillConfig, teacher: BirdModel) -> tuple[torch.nn.Module | None, ResolvedGuidance]:
    """The network that autoguides the first round's targets (None: unguided) and the guidance
    it runs with."""
    try:
        guidance = teacher.resolve_guidance(guide_weight=config.guide_weight)
    except GuidanceError as error:
        raise TrainingError(f"teacher {config.teacher}: {error}") from None
    if teacher.guide is None or guidance.guide_weight == 1:
        return None, guidance
    guide = teacher.guide.network.eval().requires_grad_(False)
    if config.channels_last:
        guide = guide.to(memory_format=torch.channels_last)
    return guide, guidance


def guide_record(teacher: BirdModel, guidance: ResolvedGuidance) -> dict:
    """run.json's record of the guided teacher, for the student's distillation record."""
    return {"guide": str(teacher.guide.path), "guide_weight": guidance.guide_weight,
            "guide_interval": list(guidance.interval) if guidance.interval else None}


def teacher_crops(config: DistillConfig, teacher: BirdModel, crops, device: torch.device) -> torch.Tensor:
    """The teacher's own training crops (its split record), uint8 NHWC on `device`."""
    where = f"teacher {config.teacher}"
    try:
        if crops is None:
            crops, train_indices, _ = model_crops(teacher.data, config.data, where)
        else:
            train_indices, _ = recover_split(teacher.data, crops, where)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    return torch.from_numpy(crops.images[train_indices]).to(device)


def distill(config: DistillConfig, out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
            crops=None) -> Path:
    """Runs every round; returns the last checkpoint. Safe to stop at any time (Ctrl-C saves)."""
    config.validate()
    try:
        device = resolve_device(config.device)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    teacher_model = load_teacher(config, device)
    schedule = teacher_model.schedule
    folder = RunFolder(out, config.keep_checkpoints, RESUMABLE_CHANGES)
    folder.prepare(config, resume, overwrite)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    autocast_dtype = resolve_precision(config, device)
    images = teacher_crops(config, teacher_model, crops, device)
    teacher = teacher_model.network.eval().requires_grad_(False)
    guide, guidance = teacher_guide(config, teacher_model)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    if config.channels_last:
        teacher, student = (n.to(memory_format=torch.channels_last) for n in (teacher, student))
    generator = torch.Generator().manual_seed(config.seed + 1)  # flips, grid points and noise
    state = DistillState(student, teacher, config.lr, generator,
                         BatchStream(len(images), config.batch_size, config.seed), device)
    latest = folder.checkpoints.latest() if resume else None
    if latest is not None:
        state.load(latest)
    machine = machine_description(device)
    folder.start(config, state.step, machine, lambda: {
        "kind": "distillation", "parameters": parameter_count(student), "teacher": str(config.teacher),
        "teacher_training": record_dict(teacher_model.training), "data": record_dict(teacher_model.data),
        "teacher_distillation": record_dict(teacher_model.distillation),
        "teacher_guidance": guide_record(teacher_model, guidance) if guide is not None else None,
        "train_images": len(images),
        **config_dict(teacher_model.network_config, teacher_model.diffusion_config)})
    print(f"Distilling {config.teacher} ({parameter_count(student):,} parameters): DDIM {config.teacher_steps} ->"
          f" {config.steps_target} steps in {config.rounds} rounds of {config.round_steps} steps of batch"
          f" {config.batch_size} · {len(images)} training crops · {machine}", flush=True)
    if latest is not None:
        print(f"Resuming {folder.path} from {latest.name} at step {state.step} (round {state.round + 1})", flush=True)

    stop = StopRequests()
    bar = tqdm(total=config.total_steps, initial=state.step, desc="Distilling", unit="step",
               disable=not config.progress, dynamic_ncols=True)
    last_saved = state.step
    loss_fn = None
    try:
        while state.step < config.total_steps and not stop:
            if state.step // config.round_steps != state.round:
                state.next_round()
            if loss_fn is None or loss_fn.student_steps != config.student_steps(state.round):
                # only the first round's teacher is the guided model; later ones are its students
                loss_fn = ProgressiveDistillationLoss(schedule, config.student_steps(state.round), autocast_dtype,
                                                      device, guide if state.round == 0 else None,
                                                      guidance.guide_weight, guidance.interval)
            started = time.perf_counter()
            if not distillation_step(state, loss_fn, images, config):
                continue
            bar.update(1)
            if state.step % config.log_every == 0:
                log_interval(state, folder, config, bar, round=state.round + 1, student_steps=loss_fn.student_steps)
            state.train_seconds += time.perf_counter() - started
            round_done = state.step % config.round_steps == 0
            if round_done:
                save_student(student, student_file(folder.path, loss_fn.student_steps))
            if state.step % config.sample_every == 0 or round_done:
                folder.save_preview(preview_images(student, schedule, config, images.shape[1], autocast_dtype,
                                                   loss_fn.student_steps), state.step)
            if state.step % config.checkpoint_every == 0 or round_done:
                state.save(folder, "interval")
                last_saved = state.step
        if state.step != last_saved:
            state.save(folder, "signal" if stop else "end")
        if stop:
            bar.write(f"Stopped by signal at step {state.step}; resume with --resume")
    finally:
        bar.close()
        folder.close()
        stop.release()
    return folder.checkpoints.latest()


def student_file(run_dir: Path, steps: int) -> Path:
    return run_dir / "students" / f"ddim-{steps}.safetensors"


def save_student(student: torch.nn.Module, path: Path) -> None:
    """Each round's final student, so one run gives every step count it passed through."""
    atomic_write(path, "the round's student", lambda temporary: save_weights(student, temporary))


def export_student(run_dir: str | os.PathLike, out: str | os.PathLike, steps: int | None = None,
                   half: bool = True) -> Path:
    """Writes the round's student for `steps` DDIM steps (default: the run's target) as a model
    folder that records its sampler."""
    folder = RunFolder(run_dir, 1, set())
    run_dir = folder.path
    config = DistillConfig.from_dict(folder.config_values(), str(run_dir / "config.json"))
    steps = config.steps_target if steps is None else steps
    rounds = [config.student_steps(r) for r in range(config.rounds)]
    if steps not in rounds:
        raise TrainingError(f"{run_dir}: this run distils to {', '.join(map(str, rounds))} steps, not {steps}")
    round_index = rounds.index(steps)
    path = student_file(run_dir, steps)
    if not path.is_file():
        raise TrainingError(f"{run_dir}: round {round_index + 1} ({steps} steps) has not finished; continue with"
                            " `birdgen distill --resume`")
    run = folder.info()
    network_config, diffusion_config = UNetConfig.from_dict(run["network"]), DiffusionConfig(**run["diffusion"])
    student = UNet(network_config)
    student.load_state_dict(load_file(str(path)))
    latest = folder.checkpoints.latest()
    seconds = read_state(latest)["train_seconds"] if latest is not None else 0.0
    done_steps = (round_index + 1) * config.round_steps
    distillation = DistillationRecord(METHOD, run["teacher"], config.teacher_steps, round_index + 1, config.round_steps,
                                      config.batch_size, config.lr, done_steps * config.batch_size, run.get("machine"),
                                      round(seconds / 3600, 2))
    if run.get("teacher_guidance"):
        guided = run["teacher_guidance"]
        distillation = replace(distillation, guide=guided["guide"], guide_weight=guided["guide_weight"],
                               guide_interval=tuple(guided["guide_interval"]) if guided["guide_interval"] else None)
    if run.get("teacher_distillation"):  # the teacher was a student: name the model at the root of the chain
        earlier = DistillationRecord.from_dict(run["teacher_distillation"])
        distillation = replace(distillation, teacher=earlier.teacher, distilled_teacher=run["teacher"],
                               images_seen_total=distillation.images_seen + (earlier.images_seen_total
                                                                             or earlier.images_seen),
                               earlier=earlier)
    return save_model(out, student, network_config, diffusion_config, half=half,
                      training=run.get("teacher_training"), data=run.get("data"),
                      sampling=SamplingRecord("ddim", steps), distillation=distillation)
