"""The settings of a run: `TrainConfig` (`birdgen train`) and `DistillConfig` (`birdgen distill`)
as plain fields whose comments are the CLI's help, each with a `check()` that reads no file, and
`resolve()`, the one place a training run's settings are completed: it reads the `init_from`
folder once and fills in what a fine-tune takes from it and FINE_TUNE_DEFAULTS. The CLI and the
app's training jobs both go through it; `config_flags` writes settings back as flags."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from .data import CROP_MODES, SPLITS, TRAIN_PARTS, CropSettings, SplitSettings
from .diffusion import DiffusionConfig
from .guidance import GUIDE_WEIGHT_RANGE, GuidanceError, check_weight
from .model_folder import ModelError, read_config
from .networks import FREEZABLE, UNetConfig, preset
from .run_folder import TrainingError
from .sources import parse_background
from .utils import dataclass_from_dict, duration_text

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# What a fine-tune (`init_from`) starts with where the command does not say: the recipe of the
# shipped models (v-prediction came with the folder; min-SNR-5 weighting, as they were trained),
# a short warm-up, and a window of wall time that fits a session on 2 CPU cores.
FINE_TUNE_DEFAULTS = {"min_snr_gamma": 5.0, "lr": 5e-4, "freeze": "convolutions", "warmup_steps": 50, "steps": 3000,
                      "max_minutes": 15.0, "checkpoint_every": 250, "sample_every": 500}
# What those defaults bought, by optimizer steps of batch 32 (AVX2-capped fp32): the class-guided samples' class
# top-1 as a share of the held-out real pictures' (the project's classifier), for 8 CUB species no
# shipped model saw, 48 training pictures each (BENCHMARKS.md, "Fine-tuning: steps, pace and levers").
FINE_TUNE_ACCURACY = ((240, 0.80), (480, 0.85), (720, 0.95))
# The settings an init_from folder decides, as TrainConfig names them.
BASE_SETTINGS = ("image_size", "schedule", "noise_steps", "prediction")


@dataclass
class TrainConfig:
    # Data (defaults: data.CropSettings and data.SplitSettings)
    data: str = ""  # a CUB_200_2011 root, a folder of pictures (flat, or one folder per class) or a .zip of one
    image_size: int = CropSettings.size  # crop side in pixels
    crop: str = CropSettings.crop  # "auto" (square for CUB, center for folders), "square"/"bbox" (CUB's boxes), "center", "full"
    padding: float = CropSettings.padding  # square crops: margin around the bounding box, as a fraction of its side
    background: str = CropSettings.background  # what transparent pictures are composited onto: white, black, gray or #rrggbb
    split: str = SplitSettings.split  # "auto" (official for CUB, stratified for class folders, else random), "official", "random", "stratified"
    train_on: str = SplitSettings.train_on  # "train" part of the split, or "all" images
    test_fraction: float = SplitSettings.test_fraction  # random and stratified splits: share of images (of each class) held out, 0-1
    skip_unreadable: bool = False  # train without the pictures that cannot be decoded (else such a folder is refused)
    # Network
    preset: str = "small"  # U-Net preset (see `birdgen presets`); with init_from, that folder's network instead
    attention: bool | None = None  # self-attention: unset keeps the preset's, false removes it, true adds it at 8x8
    dropout: float | None = None  # dropout rate, 0-1; unset keeps the preset's
    channels: tuple[int, ...] | None = None  # feature channels per level; unset keeps the preset's
    # Classes (CUB's species or a folder's classes; classifier-free guidance, Ho & Salimans 2022)
    conditional: bool = False  # condition the network on the class label
    label_dropout: float = 0.1  # share of labels replaced by "no class" during training
    class_lr_scale: float = 25.0  # the class embedding's learning rate, in multiples of lr (it starts at zero)
    freeze: str = "none"  # what a fine-tune holds fixed: "none", "outer" (the first, widest level) or "convolutions" (all; only the conditioning path and norms learn)
    init_from: str = ""  # model folder to fine-tune: its network and noise settings too; new classes start from zero
    # Diffusion (the report's Table 1: 1000 steps, cosine schedule with s = 0.008)
    schedule: str = "cosine"  # noise schedule: "cosine" or "linear"
    noise_steps: int = 1000  # T, the number of training noise steps
    prediction: str = "epsilon"  # "epsilon" or "v"
    high_noise_share: float = 0.0  # share of timesteps drawn from the noisier half [T/2, T) instead of all of [0, T), 0-1
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
    seed: int = SplitSettings.seed  # seeds the split, initialisation, batches, noise and timesteps
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

    def check(self) -> None:
        """Every setting in its range, reading no file (the init_from folder is `resolve`'s)."""
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
        if not 0 <= self.high_noise_share <= 1:
            raise TrainingError(f"high_noise_share {self.high_noise_share} out of range [0, 1]")
        if not 0 <= self.label_dropout <= 1:
            raise TrainingError(f"label_dropout {self.label_dropout} out of range [0, 1]")
        choices = {"lr_schedule": ("constant", "cosine"), "precision": PRECISIONS,
                   "log": ("none", "tensorboard", "wandb"), "train_on": TRAIN_PARTS, "split": SPLITS,
                   "crop": ("auto", *CROP_MODES), "freeze": FREEZABLE}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainingError(f"{name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.freeze != "none" and not self.init_from:
            raise TrainingError(f"freeze {self.freeze!r} holds trained weights fixed; it needs init_from (a model folder)")
        if self.init_from and (self.channels is not None or self.attention is not None):
            raise TrainingError(f"init_from {self.init_from} brings its own network; drop channels and attention")
        try:  # each value object checks its own ranges
            self.crop_settings
            self.split_settings
            parse_background(self.background)
            diffusion = self.diffusion_config()
            if not self.init_from:
                self.preset_network()
        except ValueError as error:
            raise TrainingError(str(error)) from None
        if self.sample_steps > diffusion.num_steps:
            raise TrainingError(f"sample_steps {self.sample_steps} exceeds noise_steps {diffusion.num_steps}")

    @property
    def crop_settings(self) -> CropSettings:
        return CropSettings(self.image_size, self.crop, self.padding, self.background)

    @property
    def split_settings(self) -> SplitSettings:
        return SplitSettings(self.split, self.seed, self.test_fraction, self.train_on)

    @property
    def effective_lr(self) -> float:
        """The square-root rule for Adam (Malladi et al. 2022): k times the batch, sqrt(k) times the
        learning rate, so that a batch made larger to fill a GPU keeps the per-image update noise."""
        if not self.lr_reference_batch:
            return self.lr
        return self.lr * math.sqrt(self.batch_size / self.lr_reference_batch)

    def preset_network(self) -> UNetConfig:
        """The preset with this run's changes (a run without init_from)."""
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
        """The schedule and prediction target (with init_from, `resolve` made them the folder's)."""
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
            values = (yaml.safe_load(text) or {}) if path.suffix in (".yaml", ".yml") else json.loads(text)
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


@dataclass(frozen=True)
class BaseModel:
    """The model folder a fine-tune starts from, as its config.json describes it (read once)."""

    folder: str
    network: UNetConfig
    diffusion: DiffusionConfig

    @property
    def settings(self) -> dict:
        """Its values of BASE_SETTINGS."""
        return dict(zip(BASE_SETTINGS, (self.network.image_size, self.diffusion.schedule, self.diffusion.num_steps,
                                        self.diffusion.prediction)))


def read_base(init_from: str) -> BaseModel | None:
    """The init_from folder's network and schedule (None without init_from); a one-line error if it is no model."""
    if not init_from:
        return None
    try:
        network, diffusion, _ = read_config(Path(init_from))
    except ModelError as error:
        raise TrainingError(f"init_from: {error}") from None
    return BaseModel(init_from, network, diffusion)


@dataclass(frozen=True)
class TrainRun:
    """A checked training config with what it trains: the network (its classes still to come
    from the data), the schedule, and the folder a fine-tune starts from."""

    config: TrainConfig
    network: UNetConfig
    diffusion: DiffusionConfig
    base: BaseModel | None = None

    @classmethod
    def of(cls, config: TrainConfig, base: BaseModel | None = None) -> "TrainRun":
        """Checks `config` against its init_from folder (read here unless `base` is given)."""
        config.check()
        base = base if base is not None else read_base(config.init_from)
        if base is None:
            return cls(config, config.preset_network(), config.diffusion_config())
        differing = [f"{k} {getattr(config, k)!r} (it has {v!r})" for k, v in base.settings.items()
                     if getattr(config, k) != v]
        if differing:
            raise TrainingError(f"init_from {config.init_from} brings its own image size and noise settings; this"
                                f" run sets {', '.join(differing)}")
        changes = {"num_classes": 0} | ({"dropout": config.dropout} if config.dropout is not None else {})
        return cls(config, dataclasses.replace(base.network, **changes), base.diffusion, base)


def resolve(values: dict, source: str = "config") -> TrainRun:
    """The run that settings `values` (a config file's, a saved run's and the flags given, merged)
    ask for: a fine-tune gets its folder's image size and noise settings and FINE_TUNE_DEFAULTS
    where `values` does not say otherwise. The folder's config.json is read here, once."""
    base = read_base(values.get("init_from") or "")
    if base is not None:
        values = {**FINE_TUNE_DEFAULTS, **base.settings, **values}
    return TrainRun.of(TrainConfig.from_dict(values, source), base)


def measured_recipe(settings: dict) -> bool:
    """Whether a run (its settings as TrainConfig names them) is a class fine-tune with the recipe
    FINE_TUNE_ACCURACY was measured with: only then does the outlook quote those points."""
    recipe = {key: FINE_TUNE_DEFAULTS[key] for key in ("lr", "freeze")}
    return (bool(settings.get("init_from")) and bool(settings.get("conditional"))
            and all(settings.get(key, value) == value for key, value in recipe.items()))


def time_outlook(images_per_s: float, batch_size: int, steps: int, max_minutes: float, fine_tune: bool) -> str:
    """What this machine's measured pace buys: the steps the time limit allows (or how long the
    steps take), and for a fine-tune how long the measured points of FINE_TUNE_ACCURACY take here."""
    step_s = batch_size / max(images_per_s, 1e-9)
    if max_minutes:
        bought = min(steps, int(60 * max_minutes / step_s))
        text = f"at {images_per_s:.1f} images/s here, the {max_minutes:g}-minute limit buys about {bought:,} of {steps:,} steps"
    else:
        text = f"at {images_per_s:.1f} images/s here, {steps:,} steps take {duration_text(steps * step_s)}"
    if fine_tune:
        points = [(round(measured * 32 / batch_size), share) for measured, share in FINE_TUNE_ACCURACY]
        text += ("; a fine-tune's samples reached " + ", ".join(
            f"{share:.0%} of the real pictures' class accuracy after {n:,} steps ({duration_text(n * step_s)} here)"
            for n, share in points) + " (measured on 8 unseen species)")
    return text


def config_flags(values: dict) -> list[str]:
    """The command-line words that set `values` (TrainConfig or DistillConfig fields):
    --name value, --flag / --no-flag for booleans, comma lists for tuples."""
    words = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            words += [flag, ",".join(str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return words


def changed_settings(config) -> dict:
    """The fields of a config dataclass that differ from its defaults (unset ones and the
    terminal's progress bar left out): what a card's command needs to repeat the run."""
    defaults = type(config)()
    return {key: value for key, value in config.__dict__.items()
            if getattr(defaults, key) != value and key != "progress" and value is not None}


@dataclass
class DistillConfig:
    teacher: str = "models/small-attn"  # model folder: a trained model, or a student to halve further
    guide: str = ""  # guide folder that autoguides the first round's targets, or "none"; unset: the teacher's own
    guide_weight: float | None = None  # its weight w, 0-5 (1: unguided); unset: the teacher's default
    data: str = ""  # the dataset the teacher trained on (CUB_200_2011 root, folder or zip); its own training crops are used
    teacher_steps: int = 32  # DDIM steps of the teacher that the first round halves
    steps_target: int = 4  # DDIM steps of the final student; teacher_steps / steps_target must be a power of 2
    round_steps: int = 1000  # optimizer steps per halving round
    batch_size: int = 32  # images per optimizer step
    lr: float = 1e-4  # decayed linearly to 0 within each round (Salimans & Ho 2022, appendix)
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 turns clipping off
    seed: int = 0  # seeds batches, noise and timesteps
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    precision: str = "auto"  # "auto" (bf16 on CUDA and on CPUs with native bf16, else fp32), "fp32", "bf16", "fp16"
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

    def check(self) -> None:
        """Every setting in its range, reading no file (the teacher is checked when it loads)."""
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
        if self.precision not in PRECISIONS:
            raise TrainingError(f"precision {self.precision!r}: choose one of auto, fp32, bf16, fp16")

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "DistillConfig":
        return config_from_dict(cls, values, source)
