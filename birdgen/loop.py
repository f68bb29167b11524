"""What the training and distillation loops share: the EMA of the weights, torchrun's process
group, batches drawn identically on any number of processes, the precision, the log line, the
preview grids, and the checks that stop a run whose steps keep failing."""

from __future__ import annotations

import copy
import os
import resource
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .data import random_flip
from .diffusion import NoiseSchedule
from .guidance import SPECIES_WEIGHT
from .images import to_model_range
from .precision import cpu_has_native_bf16
from .run_folder import BatchStream, LoopState, RunFolder, TrainingError
from .samplers import DDIMSampler, Denoiser, initial_noise, run_to_end
from .utils import resolve_device


class EMA:
    """Exponential moving average of the parameters (buffers are copied, never averaged)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, keep: torch.Tensor | None = None) -> None:
        """`keep`: a boolean device tensor; where false (a skipped step) the average stays as it
        was, decided on the device without a host round-trip."""
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if keep is None:
            torch._foreach_lerp_(ema_params, params, 1 - self.decay_at(step))
        else:
            moves = torch._foreach_sub(params, ema_params)
            torch._foreach_mul_(moves, keep.float() * (1 - self.decay_at(step)))
            torch._foreach_add_(ema_params, moves)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_type: str) -> "Distributed":
        """Joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def start_processes(device_name: str, batch_size: int, num_threads: int) -> tuple["Distributed", torch.device]:
    """Joins torchrun's process group (if any) and picks this process's device."""
    try:
        world = Distributed.from_environment(resolve_device(device_name).type)
        device = resolve_device(device_name, world.local_rank)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if batch_size % world.world_size:
        raise TrainingError(f"batch_size {batch_size} is not divisible by the {world.world_size} processes")
    if num_threads:
        torch.set_num_threads(num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return world, device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32. auto on a CPU is bf16 where the CPU has
    native bf16 (its loss curve follows float32's; BENCHMARKS.md, "bf16 training"), else float32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if precision == "fp32":
        return None
    if device.type == "cpu" and precision == "fp16":
        raise TrainingError("fp16 autocast needs CUDA; use bf16 or fp32 on the CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def draw_batch(images: torch.Tensor, stream: BatchStream, generator: torch.Generator, num_steps: int,
               local: slice = slice(None), channels_last: bool = True, labels: torch.Tensor | None = None,
               label_dropout: float = 0.0, null_class: int = 0, high_noise_share: float = 0.0):
    """The next (x0, t, noise, class labels or None) for this process, drawn on `generator`'s
    device (the CPU's as before, or the GPU's, which needs no host work). The whole global batch
    is drawn on every process, then sliced, so any number of processes sees the same images,
    timesteps, noise and labels as a single one. With `labels` (a class index per image), a
    `label_dropout` share of them becomes `null_class`, which teaches the network the
    unconditional prediction that classifier-free guidance needs. A `high_noise_share` of the
    timesteps is redrawn from the noisier half [T/2, T), where a sample's class is decided."""
    device, drawn_on = images.device, generator.device  # a CUDA generator draws without host work
    indices = stream.next()
    batch = random_flip(to_model_range(images[indices.to(device, non_blocking=True)]), generator)
    t = torch.randint(0, num_steps, (len(batch),), generator=generator, device=drawn_on)
    if high_noise_share:  # drawn only when asked, so that a run without it draws as it always did
        high = torch.rand(len(batch), generator=generator, device=drawn_on) < high_noise_share
        noisier = torch.randint(num_steps // 2, num_steps, (len(batch),), generator=generator, device=drawn_on)
        t = torch.where(high, noisier, t)
    noise = torch.randn(batch.shape, generator=generator, device=drawn_on)
    y = None
    if labels is not None:
        dropped = torch.rand(len(batch), generator=generator, device=drawn_on) < label_dropout
        y = torch.where(dropped, null_class, labels[indices].to(drawn_on))[local].to(device)
    x0, t, noise = batch[local], t[local].to(device), noise[local].to(device)
    if channels_last:
        x0, noise = x0.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
    return x0, t, noise, y


def past(deadline: float, world: "Distributed", device: torch.device) -> bool:
    """Whether the wall-clock deadline has passed, agreed by all processes (so they stop at the same step)."""
    over = time.perf_counter() > deadline
    if world.world_size > 1:
        flag = torch.tensor(float(over), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        over = bool(flag)
    return over


def check_streak(streak: int, limit: int, step: int) -> None:
    if streak >= limit:
        raise TrainingError(f"loss or gradients were not finite for {streak} steps in a row at step {step}; lower the"
                            " learning rate or use fp32 (last checkpoint kept)")


def log_interval(state: LoopState, folder: RunFolder, config, bar, **extra) -> dict:
    """The log interval's metrics.jsonl line (the only point where a sync-free run waits for the
    GPU), returned; `extra` values go into the line too."""
    figures = state.tallies.read()
    check_streak(figures["worst_streak"], config.max_nonfinite, state.step)
    record = {"step": state.step, **extra, "loss": figures["loss"], "lr": state.optimizer.param_groups[0]["lr"],
              "grad_norm": figures["grad_norm"],
              "images_per_s": config.log_every * config.batch_size / figures["seconds"],
              "images_seen": state.images_seen, "epoch": state.stream.epoch, "skipped_steps": figures["skipped"],
              "memory_mb": peak_memory_mb(state.device), "time": time.time()}
    if folder.log is not None:
        folder.log.write(record)
        bar.set_postfix(**extra, loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
    return record


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def preview_images(network: torch.nn.Module, schedule: NoiseSchedule, config, image_size: int,
                   autocast_dtype: torch.dtype | None, steps: int, num_classes: int = 0) -> torch.Tensor:
    """DDIM samples from a fixed seed, for the run's samples/ grids; a class-conditional model's show one
    class per image, guided at the default weight."""
    device = next(network.parameters()).device
    noise, generator = initial_noise(config.sample_count, image_size, seed=1234, device=device)
    labels = torch.arange(config.sample_count, device=device) % num_classes if num_classes else None
    denoiser = Denoiser(network, schedule, autocast_dtype, config.channels_last, labels, SPECIES_WEIGHT)
    was_training = network.training
    network.eval()
    images = run_to_end(DDIMSampler(schedule, steps), denoiser, noise, generator)
    network.train(was_training)
    return images
