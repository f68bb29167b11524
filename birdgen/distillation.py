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
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import model_crops, recover_split
from .guidance import GuidanceError, ResolvedGuidance
from .diffusion import NoiseSchedule
from .loop import check_streak, draw_batch, log_interval, preview_images, resolve_precision
from .model_folder import BirdModel, ModelError, config_dict, load_model
from .networks import parameter_count
from .records import record_dict
from .run_config import DistillConfig
from .run_folder import BatchStream, LoopState, RunFolder, StopRequests, TrainingError, save_weights
from .samplers import DDIMSampler
from .utils import atomic_write, machine_description, resolve_device

METHOD = "progressive distillation (Salimans & Ho 2022)"
RESUMABLE_CHANGES = {"checkpoint_every", "keep_checkpoints", "sample_every", "log_every", "num_threads", "progress",
                     "max_nonfinite", "device", "precision", "channels_last"}


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
    config.check()
    try:
        device = resolve_device(config.device)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    teacher_model = load_teacher(config, device)
    folder = RunFolder(out, config.keep_checkpoints, RESUMABLE_CHANGES)
    folder.prepare(config, resume, overwrite)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    autocast_dtype = resolve_precision(config.precision, device)
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
    rounds = RoundLosses(teacher_model.schedule, config, autocast_dtype, device, guide, guidance)
    distill_steps(state, folder, config, images, rounds)
    return folder.checkpoints.latest()


class RoundLosses:
    """Each round's ProgressiveDistillationLoss, made when the round begins; only the first
    round's teacher is the guided model (later ones are its students)."""

    def __init__(self, schedule: NoiseSchedule, config: DistillConfig, autocast_dtype: torch.dtype | None,
                 device: torch.device, guide: torch.nn.Module | None, guidance: ResolvedGuidance):
        self.schedule, self.config, self.autocast_dtype, self.device = schedule, config, autocast_dtype, device
        self.guide, self.guidance = guide, guidance
        self.current: ProgressiveDistillationLoss | None = None

    def for_round(self, round_index: int) -> ProgressiveDistillationLoss:
        steps = self.config.student_steps(round_index)
        if self.current is None or self.current.student_steps != steps:
            self.current = ProgressiveDistillationLoss(self.schedule, steps, self.autocast_dtype, self.device,
                                                       self.guide if round_index == 0 else None,
                                                       self.guidance.guide_weight, self.guidance.interval)
        return self.current


def distill_steps(state: DistillState, folder: RunFolder, config: DistillConfig, images: torch.Tensor,
                  rounds: RoundLosses) -> None:
    """Steps through every round until the end or a signal: each round's student kept when it
    ends, with the log, previews and checkpoints on their intervals and a last one on the way out."""
    stop = StopRequests()
    bar = tqdm(total=config.total_steps, initial=state.step, desc="Distilling", unit="step",
               disable=not config.progress, dynamic_ncols=True)
    last_saved = state.step
    try:
        while state.step < config.total_steps and not stop:
            if state.step // config.round_steps != state.round:
                state.next_round()
            loss_fn = rounds.for_round(state.round)
            started = time.perf_counter()
            if not distillation_step(state, loss_fn, images, config):
                continue
            bar.update(1)
            if state.step % config.log_every == 0:
                log_interval(state, folder, config, bar, round=state.round + 1, student_steps=loss_fn.student_steps)
            state.train_seconds += time.perf_counter() - started
            round_done = state.step % config.round_steps == 0
            if round_done:
                save_student(state.student, student_file(folder.path, loss_fn.student_steps))
            if state.step % config.sample_every == 0 or round_done:
                folder.save_preview(preview_images(state.student, rounds.schedule, config, images.shape[1],
                                                   rounds.autocast_dtype, loss_fn.student_steps), state.step)
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


def student_file(run_dir: Path, steps: int) -> Path:
    return run_dir / "students" / f"ddim-{steps}.safetensors"


def save_student(student: torch.nn.Module, path: Path) -> None:
    """Each round's final student, so one run gives every step count it passed through."""
    atomic_write(path, "the round's student", lambda temporary: save_weights(student, temporary))
