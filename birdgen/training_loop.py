"""`birdgen train`: the training loop and its config (the run folder it writes, and how it
resumes exactly, are `run_folder`'s)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .model_folder import config_dict, save_model
from .data import CROP_MODES, SPLITS, Crops, load_crops, random_flip, to_model_range
from .sources import parse_background
from .diffusion import DiffusionConfig, DiffusionLoss, NoiseSchedule
from .guidance import SPECIES_WEIGHT
from .networks import UNet, UNetConfig, parameter_count, preset
from .run_folder import (BatchStream, LoopState, MetricsLog, RunFolder, StopRequests, TrainingError, read_state)
from .samplers import DDIMSampler, Denoiser, initial_noise, run_to_end
from .utils import dataclass_from_dict, machine_description, resolve_device

# Settings that may change when a run is resumed; any other difference means another run.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_checkpoints", "sample_every", "log_every", "num_threads",
                     "log", "progress", "compile", "max_nonfinite", "device", "precision", "channels_last",
                     "sync_free", "max_minutes", "skip_unreadable"}
# What a fine-tune (`init_from`) starts with where the command does not say: the recipe of the
# shipped models (v-prediction came with the folder; min-SNR-5 weighting, as they were trained),
# a short warm-up, and a window of wall time that fits a session on 2 CPU cores.
FINE_TUNE_DEFAULTS = {"min_snr_gamma": 5.0, "lr": 2e-4, "warmup_steps": 50, "steps": 3000, "max_minutes": 15.0,
                      "checkpoint_every": 250, "sample_every": 500}


@dataclass
class TrainConfig:
    # Data
    data: str = ""  # a CUB_200_2011 root, a folder of pictures (flat, or one folder per class) or a .zip of one
    image_size: int = 64  # crop side in pixels
    crop: str = "auto"  # "auto" (square for CUB, center for folders), "square"/"bbox" (CUB's boxes), "center", "full"
    padding: float = 0.1  # square crops: margin around the bounding box, as a fraction of its side
    background: str = "white"  # what transparent pictures are composited onto: white, black, gray or #rrggbb
    split: str = "auto"  # "auto" (official for CUB, stratified for class folders, else random), "official", "random", "stratified"
    train_on: str = "train"  # "train" part of the split, or "all" images
    test_fraction: float = 0.2  # random and stratified splits: share of images (of each class) held out, 0-1
    skip_unreadable: bool = False  # train without the pictures that cannot be decoded (else such a folder is refused)
    # Network
    preset: str = "small"  # U-Net preset (see `birdgen presets`); with init_from, that folder's network instead
    attention: bool | None = None  # self-attention: unset keeps the preset's, false removes it, true adds it at 8x8
    dropout: float | None = None  # dropout rate, 0-1; unset keeps the preset's
    channels: tuple[int, ...] | None = None  # feature channels per level; unset keeps the preset's
    # Species (classifier-free guidance, Ho & Salimans 2022)
    conditional: bool = False  # condition the network on the species label
    label_dropout: float = 0.1  # share of labels replaced by "no species" during training
    class_lr_scale: float = 25.0  # the class embedding's learning rate, in multiples of lr (it starts at zero)
    init_from: str = ""  # model folder to fine-tune: its network and noise settings too; new classes start from zero
    # Diffusion (the report's Table 1: 1000 steps, cosine schedule with s = 0.008)
    schedule: str = "cosine"  # noise schedule: "cosine" or "linear"
    noise_steps: int = 1000  # T, the number of training noise steps
    prediction: str = "epsilon"  # "epsilon" or "v"
    min_snr_gamma: float | None = None  # min-SNR loss weighting's gamma (Hang et al. 2023), e.g. 5; unset: plain MSE
    # Optimisation (the report's Table 1: batch 32, learning rate 3e-4)
    batch_size: int = 32  # global batch, split over all processes
    lr: float = 3e-4  # AdamW learning rate after warm-up
    lr_schedule: str = "constant"  # "constant" or "cosine" (to 0 at `steps`), after warm-up
    warmup_steps: int = 200  # optimizer steps of linear learning-rate warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 turns clipping off
    ema_decay: float = 0.999  # reached after a warm-up: min(ema_decay, (1 + step) / (10 + step))
    steps: int = 10_000  # optimizer steps in total
    seed: int = 0  # seeds the split, initialisation, batches, noise and timesteps
    # Machine
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    precision: str = "auto"  # "auto" (bf16 on CUDA and on CPUs with native bf16, else fp32), "fp32", "bf16", "fp16"
    channels_last: bool = True  # NHWC memory layout (faster convolutions on CPUs and GPUs)
    compile: bool = False  # torch.compile the training step
    sync_free: bool | None = None  # steps that never wait for the host (skips decided on the GPU); unset: on for CUDA
    lr_reference_batch: int = 0  # >0: lr is for this batch size and scales by sqrt(batch_size / it)
    num_threads: int = 0  # CPU threads; 0 = all cores
    # Output
    checkpoint_every: int = 500  # optimizer steps between resumable checkpoints
    keep_checkpoints: int = 3  # most recent checkpoints kept
    sample_every: int = 1000  # optimizer steps between preview grids
    sample_count: int = 16  # images per preview grid
    sample_steps: int = 50  # DDIM steps for previews
    log_every: int = 20  # optimizer steps between metrics.jsonl lines
    log: str = "none"  # "none", "tensorboard" or "wandb"
    progress: bool = True  # a progress bar on the terminal
    max_nonfinite: int = 20  # consecutive skipped steps before training gives up
    max_minutes: float = 0.0  # >0: stop (with a checkpoint, resumable) after this much wall time of this process

    def validate(self) -> None:
        positive = ("batch_size", "steps", "checkpoint_every", "keep_checkpoints", "sample_every",
                    "sample_count", "sample_steps", "log_every", "max_nonfinite", "noise_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise TrainingError(f"learning rate must be positive (got {self.lr})")
        for name in ("weight_decay", "warmup_steps", "grad_clip", "num_threads", "lr_reference_batch", "max_minutes"):
            if getattr(self, name) < 0:
                raise TrainingError(f"{name} must not be negative (got {getattr(self, name)})")
        if not 0 <= self.ema_decay < 1:
            raise TrainingError(f"ema_decay {self.ema_decay} out of range [0, 1)")
        if not self.class_lr_scale > 0:
            raise TrainingError(f"class_lr_scale must be positive (got {self.class_lr_scale})")
        if not 0 <= self.label_dropout <= 1:
            raise TrainingError(f"label_dropout {self.label_dropout} out of range [0, 1]")
        choices = {"lr_schedule": ("constant", "cosine"), "precision": ("auto", "fp32", "bf16", "fp16"),
                   "log": ("none", "tensorboard", "wandb"), "train_on": ("train", "all"), "split": SPLITS,
                   "crop": ("auto", *CROP_MODES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainingError(f"{name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.init_from and (self.channels is not None or self.attention is not None):
            raise TrainingError(f"init_from {self.init_from} brings its own network; drop channels and attention")
        if self.init_from:
            differing = [f"{k} {getattr(self, k)!r} (it has {v!r})" for k, v in self.base_settings().items()
                         if getattr(self, k) != v]
            if differing:
                raise TrainingError(f"init_from {self.init_from} brings its own image size and noise settings; this"
                                    f" run sets {', '.join(differing)}")
        try:
            self.network_config()
            diffusion = self.diffusion_config()
            parse_background(self.background)
        except ValueError as error:
            raise TrainingError(str(error)) from None
        if self.sample_steps > diffusion.num_steps:
            raise TrainingError(f"sample_steps {self.sample_steps} exceeds noise_steps {diffusion.num_steps}")

    @property
    def effective_lr(self) -> float:
        """The square-root rule for Adam (Malladi et al. 2022): k times the batch, sqrt(k) times the
        learning rate, so that a batch made larger to fill a GPU keeps the per-image update noise."""
        if not self.lr_reference_batch:
            return self.lr
        return self.lr * math.sqrt(self.batch_size / self.lr_reference_batch)

    def network_config(self) -> UNetConfig:
        """The preset with this run's changes, or with init_from that folder's network (its classes
        are this run's own)."""
        if self.init_from:
            network = self.base_model()[0]
            changes = {"num_classes": 0} | ({"dropout": self.dropout} if self.dropout is not None else {})
            if network.image_size != self.image_size:
                raise TrainingError(f"init_from {self.init_from} makes {network.image_size}-pixel images; set"
                                    f" image_size {network.image_size}")
            return dataclasses.replace(network, **changes)
        overrides = {"image_size": self.image_size}
        if self.attention is not None:
            base = preset(self.preset)
            overrides["attention_resolutions"] = (base.attention_resolutions or (8,)) if self.attention else ()
        if self.dropout is not None:
            overrides["dropout"] = self.dropout
        if self.channels is not None:
            overrides["channels"] = tuple(self.channels)
        return preset(self.preset, **overrides)

    def diffusion_config(self) -> DiffusionConfig:
        """The schedule and prediction target: this run's settings, or with init_from that folder's."""
        if self.init_from:
            return self.base_model()[1]
        return DiffusionConfig(schedule=self.schedule, num_steps=self.noise_steps, prediction=self.prediction)

    def base_settings(self) -> dict:
        """The settings of this config that the init_from folder decides, as that folder has them."""
        network, diffusion = self.base_model()
        return {"image_size": network.image_size, "schedule": diffusion.schedule, "noise_steps": diffusion.num_steps,
                "prediction": diffusion.prediction}

    def base_model(self) -> tuple[UNetConfig, DiffusionConfig]:
        """The network and diffusion settings of the init_from folder (a one-line error if it is none)."""
        from .model_folder import ModelError, read_config

        try:
            network, diffusion, _ = read_config(Path(self.init_from))
        except ModelError as error:
            raise TrainingError(f"init_from: {error}") from None
        return network, diffusion

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        return config_from_dict(cls, values, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TrainConfig":
        """Reads a YAML or JSON file of TrainConfig fields."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise TrainingError(f"{path}: cannot read config ({error.strerror})") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except Exception as error:  # noqa: BLE001 - any parse error becomes one line naming the file
            raise TrainingError(f"{path}: cannot parse config ({str(error).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise TrainingError(f"{path}: config must be a mapping of settings")
        return cls.from_dict(values, str(path))


def config_from_dict(cls, values: dict, source: str):
    """A config dataclass from a mapping, with one-line errors naming `source` for unknown
    settings and values of the wrong type."""
    try:
        return dataclass_from_dict(cls, values)
    except ValueError as error:
        raise TrainingError(f"{source}: {error}") from None


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


def draw_batch(images: torch.Tensor, stream: BatchStream, generator: torch.Generator, num_steps: int,
               local: slice = slice(None), channels_last: bool = True, labels: torch.Tensor | None = None,
               label_dropout: float = 0.0, null_class: int = 0):
    """The next (x0, t, noise, class labels or None) for this process, drawn on `generator`'s
    device (the CPU's as before, or the GPU's, which needs no host work). The whole global batch
    is drawn on every process, then sliced, so any number of processes sees the same images,
    timesteps, noise and labels as a single one. With `labels` (a class index per image), a
    `label_dropout` share of them becomes `null_class`, which teaches the network the
    unconditional prediction that classifier-free guidance needs."""
    device, drawn_on = images.device, generator.device  # a CUDA generator draws without host work
    indices = stream.next()
    batch = random_flip(to_model_range(images[indices.to(device, non_blocking=True)]), generator)
    t = torch.randint(0, num_steps, (len(batch),), generator=generator, device=drawn_on)
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


def parameter_groups(model: UNet, config: TrainConfig) -> list[dict]:
    """AdamW's parameter groups. A species model's class embedding starts at zero and is only
    touched by the species in a batch, so at the network's learning rate it stayed at a tenth of
    the timestep embedding's size after 77k images of fine-tuning, and the species made no visible
    difference; it learns at class_lr_scale times the rate."""
    if not model.config.num_classes:
        return [{"params": list(model.parameters())}]
    embedding = model.class_embedding.weight
    others = [p for p in model.parameters() if p is not embedding]
    return [{"params": others}, {"params": [embedding], "lr": config.effective_lr * config.class_lr_scale}]


def lr_factor(config: TrainConfig, step: int) -> float:
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.lr_schedule == "cosine":
        progress = min(1.0, step / config.steps)
        return warmup * 0.5 * (1 + math.cos(math.pi * progress))
    return warmup


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


def resolve_precision(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32. auto on a CPU is bf16 where the CPU has
    native bf16 (its loss curve follows float32's; BENCHMARKS.md, "bf16 training"), else float32."""
    from .precision import cpu_has_native_bf16

    if config.precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if config.precision == "fp32":
        return None
    if device.type == "cpu" and config.precision == "fp16":
        raise TrainingError("fp16 autocast needs CUDA; use bf16 or fp32 on the CPU")
    return torch.bfloat16 if config.precision == "bf16" else torch.float16


class TrainState(LoopState):
    """A training run's LoopState: the model and its EMA, AdamW, the learning-rate schedule,
    the gradient scaler, and the global RNGs besides the batch generator."""

    def __init__(self, model: UNet, ema: EMA, optimizer, scheduler, scaler, generator: torch.Generator,
                 stream: BatchStream, device: torch.device):
        super().__init__({"model": model, "ema": ema.model}, optimizer, generator, stream, device)
        self.model, self.ema, self.scheduler, self.scaler = model, ema, scheduler, scaler

    def state_dict(self, reason: str) -> dict:
        cuda = self.device.type == "cuda"
        return {**super().state_dict(reason), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
                "generator_device": self.generator.device.type}

    def load_state_dict(self, state: dict) -> None:
        drawn_on = state.get("generator_device", "cpu")
        if drawn_on != self.generator.device.type:
            raise TrainingError(f"this run drew its noise on the {drawn_on} and would not continue exactly here;"
                                f" resume with {'--no-sync-free' if drawn_on == 'cpu' else '--sync-free on a GPU'}")
        super().load_state_dict(state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)


def new_train_state(config: TrainConfig, network_config: UNetConfig, num_images: int, device: torch.device,
                    sync_free: bool, autocast_dtype: torch.dtype | None) -> TrainState:
    torch.manual_seed(config.seed)
    model = UNet(network_config).to(device)
    if config.init_from:  # a resumed run then loads its checkpoint over these weights
        initialise_from(model, config.init_from, config.diffusion_config())
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, config.ema_decay)
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.effective_lr,
                                  weight_decay=config.weight_decay, fused=device.type == "cuda" or sync_free)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    # flips, timesteps and noise: on the GPU itself when steps must not wait for the host
    generator = torch.Generator(device=device if sync_free else "cpu").manual_seed(config.seed + 1)
    stream = BatchStream(num_images, config.batch_size, config.seed)
    return TrainState(model, ema, optimizer, scheduler, scaler, generator, stream, device)


def run_crops(config: TrainConfig, progress: bool = False) -> Crops:
    """The crops a run trains on, decoded up front (so no file can stop it later); a set with
    unusable pictures is refused in one line, with their count and the check report's path, unless
    the run skips them."""
    from .datacheck import refusal

    try:
        crops = load_crops(config.data, config.image_size, config.crop, config.padding, config.background,
                           progress=progress)
    except (ValueError, OSError) as error:
        raise TrainingError(str(error)) from None
    if crops.unusable and not config.skip_unreadable:
        raise TrainingError(refusal(crops, config.data))
    if crops.unusable:
        print(f"Leaving out {len(crops.unusable)} pictures that cannot be used (skip_unreadable; `birdgen data check"
              f" {config.data}` lists them)", flush=True)
    return crops


def training_images(config: TrainConfig, crops: Crops | None, device: torch.device, progress: bool):
    """The training part's crops (uint8 NHWC on `device`), and for a species model their class
    indices and the species list [[class id, name], …] in class-id order (index len(species) = none)."""
    crops = crops if crops is not None else run_crops(config, progress)
    if config.conditional and crops.layout == "flat":
        raise TrainingError(f"{config.data}: a flat folder has no classes to condition on; put each class's pictures"
                            " in a folder of its own, or train without --conditional")
    part = "all" if config.train_on == "all" else "train"
    indices = crops.split_indices(config.split, part, config.seed, config.test_fraction)
    images = torch.from_numpy(crops.images[indices]).to(device)  # converted to the model's range per batch
    if not config.conditional:
        return images, None, []
    species = [[int(c), crops.class_names.get(int(c), str(c))] for c in sorted(set(crops.labels.tolist()))]
    if len(species) < 2:
        raise TrainingError(f"{config.data}: one class only ({species[0][1]}); a conditional model needs two or more")
    index_of = {class_id: index for index, (class_id, _) in enumerate(species)}
    labels = torch.tensor([index_of[int(c)] for c in crops.labels[indices]], dtype=torch.long)
    return images, labels, species


def start_processes(config: TrainConfig) -> tuple["Distributed", torch.device]:
    """Joins torchrun's process group (if any) and picks this process's device."""
    try:
        world = Distributed.from_environment(resolve_device(config.device).type)
        device = resolve_device(config.device, world.local_rank)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if config.batch_size % world.world_size:
        raise TrainingError(f"batch_size {config.batch_size} is not divisible by the {world.world_size} processes")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return world, device


def skip_where_not_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """The fused AdamW reads `found_inf` as torch.amp's GradScaler sets it: where it is 1 the step
    leaves weights, moments and step count as they were, decided on the device without a host read."""
    optimizer.found_inf = (~finite).float()


def take_step(state: TrainState, loss: torch.Tensor, config: TrainConfig, world: "Distributed",
              sync_free: bool) -> bool:
    """Backward and one AdamW step. A step whose loss or gradients are not finite is not taken:
    the host decides (one read per step), or, sync-free, the device leaves everything as it was."""
    state.scaler.scale(loss).backward()
    state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip or float("inf"))
    finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
    if world.world_size > 1:
        flag = finite.float().to(state.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag.bool()
    state.tallies.add(loss, grad_norm, finite)
    if not sync_free and not bool(finite):
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.update()
        check_streak(int(state.tallies.streak), config.max_nonfinite, state.step)
        return False
    if sync_free:
        skip_where_not_finite(state.optimizer, finite)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.ema.update(state.model, state.step, finite if sync_free else None)
    state.step += 1
    return True


def log_interval(state: LoopState, folder: RunFolder, config, bar, **extra) -> None:
    """The log interval's metrics.jsonl line (the only point where a sync-free run waits for the
    GPU); `extra` values go into the line too."""
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


def preview_images(network: torch.nn.Module, schedule: NoiseSchedule, config, image_size: int,
                   autocast_dtype: torch.dtype | None, steps: int, num_species: int = 0) -> torch.Tensor:
    """DDIM samples from a fixed seed, for the run's samples/ grids; a species model's show one
    species per image, guided at the default weight."""
    device = next(network.parameters()).device
    noise, generator = initial_noise(config.sample_count, image_size, seed=1234, device=device)
    labels = torch.arange(config.sample_count, device=device) % num_species if num_species else None
    denoiser = Denoiser(network, schedule, autocast_dtype, config.channels_last, labels, SPECIES_WEIGHT)
    was_training = network.training
    network.eval()
    images = run_to_end(DDIMSampler(schedule, steps), denoiser, noise, generator)
    network.train(was_training)
    return images


def train(config: TrainConfig, out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
          crops: Crops | None = None) -> Path:
    """Trains until `config.steps`; returns the last checkpoint. Safe to stop at any time."""
    config.validate()
    world, device = start_processes(config)
    MetricsLog.import_backend(config.log)
    folder = RunFolder(out, config.keep_checkpoints, RESUMABLE_CHANGES)
    if world.is_main:
        folder.prepare(config, resume, overwrite)
    if world.world_size > 1:
        dist.barrier()
    autocast_dtype = resolve_precision(config, device)
    sync_free = device.type == "cuda" if config.sync_free is None else config.sync_free
    images, labels, species = training_images(config, crops, device, world.is_main and config.progress)
    network_config = dataclasses.replace(config.network_config(), num_classes=len(species))
    schedule = NoiseSchedule(config.diffusion_config())
    state = new_train_state(config, network_config, len(images), device, sync_free, autocast_dtype)
    latest = folder.checkpoints.latest() if resume else None
    if latest is not None:
        state.load(latest)
    if world.is_main:
        machine = machine_description(device)
        folder.start(config, state.step, machine, lambda: {
            "parameters": parameter_count(state.model), "world_size": world.world_size, "train_images": len(images),
            "species": species, **config_dict(network_config, config.diffusion_config())}, config.log)
        print(f"{parameter_count(state.model):,} parameters · {len(images)} training images · global batch"
              f" {config.batch_size} = {world.world_size} process(es) × {config.batch_size // world.world_size}"
              f" · {machine} · {autocast_dtype or torch.float32}", flush=True)
        if latest is not None:
            print(f"Resuming {folder.path} from {latest.name} at step {state.step}", flush=True)
    trained = torch.compile(state.model) if config.compile else state.model
    if world.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = DiffusionLoss(schedule, config.min_snr_gamma)
    local_batch = config.batch_size // world.world_size
    local = slice(world.rank * local_batch, (world.rank + 1) * local_batch)
    deadline = time.perf_counter() + 60 * config.max_minutes if config.max_minutes else math.inf
    stop = StopRequests()
    bar = tqdm(total=config.steps, initial=state.step, desc="Training", unit="step",
               disable=not (world.is_main and config.progress), dynamic_ncols=True)
    last_saved = state.step
    state.model.train()
    try:
        while state.step < config.steps and not stop:
            started = time.perf_counter()
            x0, t, noise, y = draw_batch(images, state.stream, state.generator, schedule.num_steps, local,
                                         config.channels_last, labels, config.label_dropout, len(species))
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss = loss_fn(trained, x0, t, noise, y)
            if not take_step(state, loss, config, world, sync_free):
                continue
            bar.update(1)
            if state.step % config.log_every == 0:
                log_interval(state, folder, config, bar)
                if past(deadline, world, device):  # a fixed window of machine time: stop as a signal would
                    stop.request("time")
            state.train_seconds += time.perf_counter() - started
            if world.is_main and state.step % config.sample_every == 0:
                preview = preview_images(state.ema.model, schedule, config, config.image_size, autocast_dtype,
                                         config.sample_steps, len(species))
                folder.save_preview(preview, state.step)
            if state.step % config.checkpoint_every == 0:
                if world.is_main:
                    state.save(folder, "interval")
                last_saved = state.step
        if world.is_main and state.step != last_saved:
            state.save(folder, "signal" if stop else "end")
        if world.is_main and stop:
            why = f"after {config.max_minutes:g} min" if stop.reason == "time" else "by signal"
            bar.write(f"Stopped {why} at step {state.step}; resume with --resume")
    finally:
        bar.close()
        folder.close()
        stop.release()
        if world.world_size > 1:
            dist.barrier()
    return folder.checkpoints.latest()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def initialise_from(model: UNet, folder: str, diffusion_config: DiffusionConfig) -> None:
    """Starts `model` from a model folder's weights: the same network, except for the class
    embedding. Where the classes differ (an unconditional folder, or other classes) the new
    embedding starts at zero, so the new model begins exactly as the old one's unconditional
    prediction and learns its classes from there."""
    from .model_folder import ModelError, load_model

    try:
        source = load_model(folder)
    except ModelError as error:
        raise TrainingError(f"init_from: {error}") from None
    mine, theirs = dataclasses.asdict(model.config), dataclasses.asdict(source.network_config)
    different = sorted(k for k in mine if k not in ("num_classes", "dropout") and mine[k] != theirs[k])  # no weights
    if different:
        raise TrainingError(f"init_from {folder}: its network differs in {', '.join(different)}; pick the same preset"
                            " and settings")
    if source.diffusion_config != diffusion_config:
        raise TrainingError(f"init_from {folder}: it was trained with another noise schedule or prediction target"
                            f" ({source.diffusion_config.schedule}, {source.diffusion_config.prediction}); use the same")
    state = source.network.state_dict()
    if source.network_config.num_classes != model.config.num_classes or not model.config.num_classes:
        embedding = state.pop("class_embedding.weight", None)
        if embedding is not None and model.config.num_classes:  # every new class starts as their "no class"
            with torch.no_grad():
                model.class_embedding.weight.copy_(embedding[-1].expand_as(model.class_embedding.weight))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(key != "class_embedding.weight" for key in missing):
        raise TrainingError(f"init_from {folder}: weights do not fit ({len(missing)} missing, {len(unexpected)}"
                            " unexpected)")


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, half: bool = True, card: str | None = None,
               data: dict | None = None, guidance: dict | None = None, step: int | None = None,
               averaged: bool = True) -> Path:
    """Writes the EMA weights (`averaged`; else the optimizer's own weights) of the latest checkpoint
    (or of the one at `step`) as a model folder (with `data`, the split record, and `guidance`, the
    guidance record)."""
    folder = RunFolder(run_dir, 1, set())
    checkpoint = folder.checkpoints.at_step(step)
    species = folder.info().get("species") or []
    network_config, diffusion_config = run_networks(run_dir)
    network = UNet(network_config)
    network.load_state_dict(load_file(str(checkpoint / ("ema.safetensors" if averaged else "model.safetensors"))))
    state = read_state(checkpoint)
    training = {"steps": state["step"], "images_seen": state["images_seen"],
                "train_hours": round(state["train_seconds"] / 3600, 2)}
    return save_model(out, network, network_config, diffusion_config, half=half, card=card,
                      training=training, data=data, species=species or None, guidance=guidance)


def run_networks(run_dir: str | os.PathLike) -> tuple[UNetConfig, DiffusionConfig]:
    """The network (with its classes) and diffusion settings a run trained, as its run.json
    recorded them when it started (so a fine-tune's export needs no longer the folder it began from)."""
    from .model_folder import diffusion_from_dict

    folder = RunFolder(run_dir, 1, set())
    info = folder.info()
    if "network" in info and "diffusion" in info:
        return UNetConfig.from_dict(info["network"]), diffusion_from_dict(info["diffusion"])
    config = TrainConfig.from_dict(folder.config_values(), str(folder.path / "config.json"))
    network = dataclasses.replace(config.network_config(), num_classes=len(info.get("species") or []))
    return network, config.diffusion_config()
