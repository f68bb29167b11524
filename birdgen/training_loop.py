"""`birdgen train`: the training loop, its config, checkpoints and exact resume.

A run folder holds::

    config.json          the resolved TrainConfig
    metrics.jsonl        one JSON line per logging interval
    checkpoints/step-NNNNNNN/   model.safetensors, ema.safetensors, state.pt (optimizer, RNGs, …)
    samples/step-NNNNNNN.png    DDIM previews from a fixed seed with the EMA weights
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .checkpoint import atomic_write_text, config_dict, save_model
from .data import CubCrops, load_crops, random_flip, to_model_range
from .diffusion import DiffusionConfig, DiffusionLoss, NoiseSchedule
from .guidance import SPECIES_WEIGHT
from .networks import UNet, UNetConfig, parameter_count, preset
from .samplers import DDIMSampler, Denoiser, initial_noise, run_to_end
from .utils import check_field_types, machine_description, save_grid, writing

# Settings that may change when a run is resumed; any other difference means another run.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_checkpoints", "sample_every", "log_every", "num_threads",
                     "log", "progress", "compile", "max_nonfinite", "device", "precision", "channels_last",
                     "sync_free", "max_minutes"}


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message says why in one line."""


@dataclass
class TrainConfig:
    # Data
    data: str = ""  # CUB_200_2011 root
    image_size: int = 64  # crop side in pixels
    crop: str = "square"  # "square" or "bbox"
    padding: float = 0.1  # square crops: margin around the bounding box, as a fraction of its side
    split: str = "official"  # "official" or "random" (seeded, test_fraction held out)
    train_on: str = "train"  # "train" part of the split, or "all" images
    test_fraction: float = 0.2  # random split: share of images held out, 0-1
    # Network
    preset: str = "small"  # U-Net preset (see `birdgen presets`)
    attention: bool | None = None  # None keeps the preset's; False removes it; True adds it at 8x8
    dropout: float | None = None  # None keeps the preset's
    channels: tuple[int, ...] | None = None  # feature channels per level; None keeps the preset's
    # Species (classifier-free guidance, Ho & Salimans 2022)
    conditional: bool = False  # condition the network on the species label
    label_dropout: float = 0.1  # share of labels replaced by "no species" during training
    class_lr_scale: float = 25.0  # the class embedding's learning rate, in multiples of lr (it starts at zero)
    init_from: str = ""  # model folder to start from (an unconditional one gets a zero class embedding)
    # Diffusion (the report's Table 1: 1000 steps, cosine schedule with s = 0.008)
    schedule: str = "cosine"  # noise schedule: "cosine" or "linear"
    noise_steps: int = 1000  # T, the number of training noise steps
    prediction: str = "epsilon"  # "epsilon" or "v"
    min_snr_gamma: float | None = None  # e.g. 5.0 for min-SNR weighting
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
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16", "fp16"
    channels_last: bool = True  # NHWC memory layout (faster convolutions on CPUs and GPUs)
    compile: bool = False  # torch.compile the training step
    sync_free: bool | None = None  # None: on for CUDA. Steps never wait for the host; see `train`
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
        if self.init_from and not (Path(self.init_from) / "config.json").is_file():
            raise TrainingError(f"init_from {self.init_from}: not a model folder (no config.json)")
        choices = {"lr_schedule": ("constant", "cosine"), "precision": ("auto", "fp32", "bf16", "fp16"),
                   "log": ("none", "tensorboard", "wandb"), "train_on": ("train", "all"),
                   "split": ("official", "random"), "crop": ("square", "bbox")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainingError(f"{name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.sample_steps > self.noise_steps:
            raise TrainingError(f"sample_steps {self.sample_steps} exceeds noise_steps {self.noise_steps}")
        try:
            self.network_config()
            self.diffusion_config()
        except ValueError as error:
            raise TrainingError(str(error)) from None

    @property
    def effective_lr(self) -> float:
        """The square-root rule for Adam (Malladi et al. 2022): k times the batch, sqrt(k) times the
        learning rate, so that a batch made larger to fill a GPU keeps the per-image update noise."""
        if not self.lr_reference_batch:
            return self.lr
        return self.lr * math.sqrt(self.batch_size / self.lr_reference_batch)

    def network_config(self) -> UNetConfig:
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
        return DiffusionConfig(schedule=self.schedule, num_steps=self.noise_steps, prediction=self.prediction)

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
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise TrainingError(f"{source}: unknown setting(s) {', '.join(unknown)}")
    try:
        check_field_types(cls, values)
    except ValueError as error:
        raise TrainingError(f"{source}: {error}") from None
    return cls(**values)


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


class BatchStream:
    """Endless shuffled batches of dataset indices; its state is (epoch, position), so a
    resumed run continues the exact same order. Each epoch's order is seeded by (seed, epoch)."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, position: int = 0):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.position = epoch, position
        self.order = self._order(epoch)

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def next(self) -> torch.Tensor:
        taken = []
        needed = self.batch_size
        while needed:
            chunk = self.order[self.position:self.position + needed]
            taken.append(chunk)
            needed -= len(chunk)
            self.position += len(chunk)
            if self.position == self.size:
                self.epoch += 1
                self.position = 0
                self.order = self._order(self.epoch)
        return torch.cat(taken)


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


class StepTallies:
    """Each log interval's sums of loss and gradient norm over the steps taken, and the counts of
    skipped steps, kept as tensors on the training device: adding to them never waits for the
    GPU, and `read()` (once per log interval) is the only host round-trip."""

    def __init__(self, device: torch.device, skipped: int = 0):
        zero = torch.zeros((), dtype=torch.long, device=device)
        self.skipped, self.streak, self.worst_streak = zero + skipped, zero.clone(), zero.clone()
        self._start_interval()

    def _start_interval(self) -> None:
        device = self.skipped.device
        self.loss, self.grad_norm = torch.zeros((), device=device), torch.zeros((), device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor) -> None:
        self.loss += torch.where(finite, loss.detach().float(), 0.0)
        self.grad_norm += torch.where(finite, grad_norm.float(), 0.0)
        self.count += finite
        self.skipped += ~finite
        self.streak = torch.where(finite, 0, self.streak + 1)
        self.worst_streak = torch.maximum(self.worst_streak, self.streak)

    def read(self) -> dict:
        """The interval's means (waits for the device), then starts the next interval."""
        count = max(int(self.count), 1)
        figures = {"loss": float(self.loss) / count, "grad_norm": float(self.grad_norm) / count,
                   "skipped": int(self.skipped), "worst_streak": int(self.worst_streak),
                   "seconds": time.perf_counter() - self.started}
        self.worst_streak = self.streak.clone()
        self._start_interval()
        return figures


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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} asked for, but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def resolve_precision(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if config.precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if config.precision == "fp32":
        return None
    if device.type == "cpu" and config.precision == "fp16":
        raise TrainingError("fp16 autocast needs CUDA; use bf16 or fp32 on the CPU")
    return torch.bfloat16 if config.precision == "bf16" else torch.float16


class StopRequests(list):
    """Records SIGINT/SIGTERM instead of dying, so a loop can save a checkpoint and stop; truthy
    once one arrived. `release()` puts the previous handlers back."""

    def __init__(self):
        super().__init__()
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, lambda signum, frame: self.append(signum))
            except ValueError:  # not the main thread (e.g. inside the app's process): no handlers
                pass

    def release(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Checkpoints:
    """Atomic checkpoints in run/checkpoints/step-NNNNNNN: written to a temporary folder,
    flushed, then renamed; older ones are deleted only after the new one is complete."""

    def __init__(self, run_dir: Path, keep: int):
        self.directory = run_dir / "checkpoints"
        self.keep = keep

    def complete(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("step-")
                 and p.name[5:].isdigit() and (p / "state.pt").is_file()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def latest(self) -> Path | None:
        complete = self.complete()
        return complete[-1] if complete else None

    def save(self, step: int, weights: dict[str, torch.nn.Module], state: dict) -> Path:
        """`weights`: networks by file stem ({"model": …, "ema": …} → model.safetensors, ema.safetensors)."""
        final = self.directory / f"step-{step:07d}"
        temporary = self.directory / f".step-{step:07d}.tmp{os.getpid()}"
        # A full disk ends the run in one line; the previous checkpoint stays the latest complete one.
        with writing(final, f"the checkpoint of step {step} (the last complete one is kept; free some space and"
                            " --resume)", temporary):
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
            for stem, network in weights.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()},
                          str(temporary / f"{stem}.safetensors"))
            torch.save(state, temporary / "state.pt")
            for file in temporary.iterdir():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob(".step-*.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        return final


class MetricsLog:
    def __init__(self, path: Path, backend: str, config: TrainConfig, run_dir: Path):
        self.path = path
        self.backend = None
        module = self.import_backend(backend)
        if backend == "tensorboard":
            self.backend = module.SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        elif backend == "wandb":
            self.backend = module.init(project="birdgen", name=run_dir.name, dir=str(run_dir), config=asdict(config),
                                       resume="allow", id=run_dir.name)

    @staticmethod
    def import_backend(backend: str):
        """The logging library for `backend`, or a one-line TrainingError saying how to get it."""
        try:
            if backend == "tensorboard":
                import torch.utils.tensorboard as module
            elif backend == "wandb":
                import wandb as module
            else:
                return None
        except ImportError:
            hint = " (set WANDB_MODE=offline to log without an account)" if backend == "wandb" else ""
            raise TrainingError(f"--log {backend} needs the {backend} package: pip install {backend}{hint}") from None
        return module

    def truncate_after(self, step: int) -> None:
        """Drops lines logged after the checkpoint a run resumes from, so none are doubled."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with writing(self.path, "the training log"), open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.backend is None:
            return
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if hasattr(self.backend, "add_scalar"):
            for key, value in values.items():
                self.backend.add_scalar(key, value, record["step"])
        else:
            self.backend.log(values, step=record["step"])

    def close(self) -> None:
        if self.backend is not None:
            (self.backend.close if hasattr(self.backend, "close") else self.backend.finish)()


def prepare_run_dir(run_dir: Path, config, resume: bool, overwrite: bool,
                    resumable: set[str] = RESUMABLE_CHANGES) -> None:
    """Refuses to mix two different runs in one folder; `resumable` settings may change on resume."""
    saved = run_dir / "config.json"
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    elif saved.is_file():
        if not resume:
            raise TrainingError(f"{run_dir}: already holds a run; pass --resume to continue it or --overwrite"
                                " to start over")
        previous = json.loads(saved.read_text())
        changed = sorted(k for k, v in asdict(config).items()
                         if k not in resumable and k in previous and json.loads(json.dumps(v)) != previous[k])
        if changed:
            raise TrainingError(f"{saved}: the run was started with other settings ({', '.join(changed)});"
                                " use a new --out folder")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise TrainingError(f"{run_dir}: exists and is not a birdgen run folder; choose an empty or new --out")


def train(config: TrainConfig, out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
          crops: CubCrops | None = None) -> Path:
    """Trains until `config.steps`; returns the last checkpoint. Safe to stop at any time."""
    config.validate()
    run_dir = Path(out)
    device_type = "cuda" if config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()) else "cpu"
    world = Distributed.from_environment(device_type)
    device = resolve_device(config.device, world.local_rank)
    if config.batch_size % world.world_size:
        raise TrainingError(f"batch_size {config.batch_size} is not divisible by the {world.world_size} processes")
    MetricsLog.import_backend(config.log)
    if world.is_main:
        prepare_run_dir(run_dir, config, resume, overwrite)
    if world.world_size > 1:
        dist.barrier()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast_dtype = resolve_precision(config, device)

    crops = crops if crops is not None else load_crops(config.data, config.image_size, config.crop, config.padding,
                                                       progress=world.is_main and config.progress)
    part = "all" if config.train_on == "all" else "train"
    train_indices = crops.split_indices(config.split, part, config.seed, config.test_fraction)
    images = torch.from_numpy(crops.images[train_indices]).to(device)  # uint8 NHWC, converted per batch
    species, labels = [], None
    if config.conditional:  # every species of the dataset, in class-id order; index len(species) = none
        species = [[int(c), crops.class_names.get(int(c), str(c))] for c in sorted(set(crops.labels.tolist()))]
        index_of = {class_id: index for index, (class_id, _) in enumerate(species)}
        labels = torch.tensor([index_of[int(c)] for c in crops.labels[train_indices]], dtype=torch.long)

    network_config = dataclasses.replace(config.network_config(), num_classes=len(species))
    diffusion_config = config.diffusion_config()
    torch.manual_seed(config.seed)
    model = UNet(network_config).to(device)
    if config.init_from:  # a resumed run then loads its checkpoint over these weights
        initialise_from(model, config.init_from, diffusion_config)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, config.ema_decay)
    sync_free = device.type == "cuda" if config.sync_free is None else config.sync_free
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.effective_lr,
                                  weight_decay=config.weight_decay, fused=device.type == "cuda" or sync_free)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    schedule = NoiseSchedule(diffusion_config)
    loss_fn = DiffusionLoss(schedule, config.min_snr_gamma)
    stream = BatchStream(len(train_indices), config.batch_size, config.seed)
    # flips, timesteps and noise: on the GPU itself when steps must not wait for the host
    generator = torch.Generator(device=device if sync_free else "cpu").manual_seed(config.seed + 1)
    checkpoints = Checkpoints(run_dir, config.keep_checkpoints)
    step, train_seconds, skipped_total = 0, 0.0, 0

    latest = checkpoints.latest() if resume else None
    if latest is not None:
        model.load_state_dict(load_file(str(latest / "model.safetensors"), device=str(device)))
        ema.model.load_state_dict(load_file(str(latest / "ema.safetensors"), device=str(device)))
        state = torch.load(latest / "state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        drawn_on = state.get("generator_device", "cpu")
        if drawn_on != generator.device.type:
            raise TrainingError(f"{latest}: this run drew its noise on the {drawn_on} and would not continue exactly"
                                f" here; resume with {'--no-sync-free' if drawn_on == 'cpu' else '--sync-free on a GPU'}")
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        stream = BatchStream(len(train_indices), config.batch_size, config.seed, state["epoch"], state["position"])
        step, train_seconds, skipped_total = state["step"], state["train_seconds"], state["skipped_steps"]

    run_dir.mkdir(parents=True, exist_ok=True)
    log = None
    if world.is_main:
        atomic_write_text(run_dir / "config.json", json.dumps(asdict(config), indent=2) + "\n")
        log = MetricsLog(run_dir / "metrics.jsonl", config.log, config, run_dir)
        log.truncate_after(step)
        machine = machine_description(device)
        if latest is None:
            (run_dir / "metrics.jsonl").write_text("")
            atomic_write_text(run_dir / "run.json", json.dumps({
                "machine": machine, "parameters": parameter_count(model),
                "world_size": world.world_size, "train_images": len(train_indices), "species": species,
                **config_dict(network_config, diffusion_config)}, indent=2) + "\n")
        else:
            run_info = json.loads((run_dir / "run.json").read_text())
            if machine not in [run_info.get("machine"), *run_info.get("also_trained_on", [])]:
                run_info.setdefault("also_trained_on", []).append(machine)
                atomic_write_text(run_dir / "run.json", json.dumps(run_info, indent=2) + "\n")
        print(f"{parameter_count(model):,} parameters · {len(train_indices)} training images · global batch"
              f" {config.batch_size} = {world.world_size} process(es) × {config.batch_size // world.world_size}"
              f" · {machine} · {autocast_dtype or torch.float32}", flush=True)
        if latest is not None:
            print(f"Resuming {run_dir} from {latest.name} at step {step}", flush=True)

    trained = model
    if config.compile:
        trained = torch.compile(model)
    if world.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)

    stop_signal = StopRequests()

    def save(reason: str) -> Path:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                 "generator_device": generator.device.type, "epoch": stream.epoch, "position": stream.position,
                 "step": step, "train_seconds": train_seconds, "skipped_steps": int(tallies.skipped),
                 "images_seen": step * config.batch_size, "reason": reason}
        return checkpoints.save(step, {"model": model, "ema": ema.model}, state)

    def preview() -> None:
        noise, sample_generator = initial_noise(config.sample_count, config.image_size, seed=1234, device=device)
        preview_labels = torch.arange(config.sample_count, device=device) % len(species) if species else None
        denoiser = Denoiser(ema.model, schedule, autocast_dtype, config.channels_last, preview_labels,
                            SPECIES_WEIGHT)  # species models' previews: one species per image, guided
        images = run_to_end(DDIMSampler(schedule, config.sample_steps), denoiser, noise, sample_generator)
        (run_dir / "samples").mkdir(exist_ok=True)
        save_grid(images, run_dir / "samples" / f"step-{step:07d}.png")
        save_grid(images, run_dir / "samples" / "latest.png")

    local_batch = config.batch_size // world.world_size
    local = slice(world.rank * local_batch, (world.rank + 1) * local_batch)
    bar = tqdm(total=config.steps, initial=step, desc="Training", unit="step", disable=not (world.is_main and config.progress),
               dynamic_ncols=True)
    tallies = StepTallies(device, skipped_total)
    last_saved = step
    deadline = time.perf_counter() + 60 * config.max_minutes if config.max_minutes else math.inf
    model.train()
    try:
        while step < config.steps and not stop_signal:
            started = time.perf_counter()
            x0, t, noise, y = draw_batch(images, stream, generator, schedule.num_steps, local, config.channels_last,
                                         labels, config.label_dropout, len(species))
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss = loss_fn(trained, x0, t, noise, y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            if world.world_size > 1:
                flag = finite.float().to(device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                finite = flag.bool()
            if not sync_free and not bool(finite):  # the host decides: the step is not taken at all
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                tallies.add(loss, grad_norm, finite)
                check_streak(int(tallies.streak), config.max_nonfinite, step)
                continue
            if sync_free:  # the fused AdamW leaves weights, moments and its step count as they were where this is 1
                optimizer.found_inf = (~finite).float()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ema.update(model, step, finite if sync_free else None)
            tallies.add(loss, grad_norm, finite)
            step += 1
            bar.update(1)

            if step % config.log_every == 0:  # the only point where a sync-free run waits for the GPU
                figures = tallies.read()
                check_streak(figures["worst_streak"], config.max_nonfinite, step)
                if world.is_main:
                    record = {"step": step, "loss": figures["loss"], "lr": scheduler.get_last_lr()[0],
                              "grad_norm": figures["grad_norm"],
                              "images_per_s": config.log_every * config.batch_size / figures["seconds"],
                              "images_seen": step * config.batch_size, "epoch": stream.epoch,
                              "skipped_steps": figures["skipped"], "memory_mb": peak_memory_mb(device),
                              "time": time.time()}
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
                if past(deadline, world, device):  # a fixed window of machine time: stop as a signal would
                    stop_signal.append("time")
            train_seconds += time.perf_counter() - started
            if world.is_main and step % config.sample_every == 0:
                preview()
            if step % config.checkpoint_every == 0:
                if world.is_main:
                    save("interval")
                last_saved = step
        if world.is_main and step != last_saved:
            save("signal" if stop_signal else "end")
        if world.is_main and stop_signal:
            why = f"after {config.max_minutes:g} min" if "time" in stop_signal else "by signal"
            bar.write(f"Stopped {why} at step {step}; resume with --resume")
    finally:
        bar.close()
        if log is not None:
            log.close()
        stop_signal.release()
        if world.world_size > 1:
            dist.barrier()
    return checkpoints.latest()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl (a half-written last line is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def initialise_from(model: UNet, folder: str, diffusion_config: DiffusionConfig) -> None:
    """Starts `model` from a model folder's weights: the same network, except that a
    conditional model may start from an unconditional one, whose missing class embedding
    stays zero, so the new model begins exactly as the old one."""
    from .checkpoint import ModelError, load_model

    try:
        source = load_model(folder)
    except ModelError as error:
        raise TrainingError(f"init_from: {error}") from None
    mine, theirs = dataclasses.asdict(model.config), dataclasses.asdict(source.network_config)
    different = sorted(k for k in mine if k != "num_classes" and mine[k] != theirs[k])
    if different:
        raise TrainingError(f"init_from {folder}: its network differs in {', '.join(different)}; pick the same preset"
                            " and settings")
    if source.diffusion_config != diffusion_config:
        raise TrainingError(f"init_from {folder}: it was trained with another noise schedule or prediction target"
                            f" ({source.diffusion_config.schedule}, {source.diffusion_config.prediction}); use the same")
    if source.network_config.num_classes not in (0, model.config.num_classes):
        raise TrainingError(f"init_from {folder}: it knows {source.network_config.num_classes} species, this run"
                            f" {model.config.num_classes}")
    state = source.network.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(key != "class_embedding.weight" for key in missing):
        raise TrainingError(f"init_from {folder}: weights do not fit ({len(missing)} missing, {len(unexpected)}"
                            " unexpected)")


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, half: bool = True, card: str | None = None,
               data: dict | None = None, guidance: dict | None = None, step: int | None = None) -> Path:
    """Writes the EMA weights of the latest checkpoint (or of the one at `step`) as a model folder
    (with `data`, the split record, and `guidance`, the guidance record)."""
    run_dir = Path(run_dir)
    complete = Checkpoints(run_dir, 1).complete()
    if step is not None:
        complete = [path for path in complete if path.name == f"step-{step:07d}"]
        if not complete:
            raise TrainingError(f"{run_dir}: no complete checkpoint at step {step}")
    latest = complete[-1] if complete else None
    if latest is None:
        raise TrainingError(f"{run_dir}: no complete checkpoint to export")
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()), str(run_dir / "config.json"))
    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    species = run_info.get("species") or []
    network_config = dataclasses.replace(config.network_config(), num_classes=len(species))
    network = UNet(network_config)
    network.load_state_dict(load_file(str(latest / "ema.safetensors")))
    state = torch.load(latest / "state.pt", map_location="cpu", weights_only=True)
    training = {"steps": state["step"], "images_seen": state["images_seen"],
                "train_hours": round(state["train_seconds"] / 3600, 2)}
    return save_model(out, network, network_config, config.diffusion_config(), half=half, card=card,
                      training=training, data=data, species=species or None, guidance=guidance)
