"""`birdgen train`: the training loop, top-down (its settings are `run_config`'s, what it shares
with distillation `loop`'s, the run folder it writes and how it resumes exactly `run_folder`'s)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .data import Crops, load_crops
from .datacheck import refusal
from .diffusion import DiffusionLoss, NoiseSchedule
from .loop import (EMA, Distributed, check_streak, draw_batch, log_interval, past, preview_images, resolve_precision,
                   start_processes)
from .model_folder import WEIGHTS_FILE, ModelError, config_dict, load_weights
from .networks import UNet, UNetConfig, frozen_parameters, parameter_count
from .run_config import BaseModel, TrainConfig, TrainRun, measured_recipe, time_outlook
from .run_folder import BatchStream, LoopState, MetricsLog, RunFolder, StopRequests, TrainingError
from .utils import machine_description

# Settings that may change when a run is resumed; any other difference means another run.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_checkpoints", "sample_every", "log_every", "num_threads",
                     "log", "progress", "compile", "max_nonfinite", "device", "precision", "channels_last",
                     "sync_free", "max_minutes", "skip_unreadable"}


def parameter_groups(model: UNet, config: TrainConfig) -> list[dict]:
    """AdamW's parameter groups. A class-conditional model's class embedding starts at zero and is only
    touched by the classes in a batch, so at the network's learning rate it stayed at a tenth of
    the timestep embedding's size after 77k images of fine-tuning, and the classes made no visible
    difference; it learns at class_lr_scale times the rate."""
    trained = [p for p in model.parameters() if p.requires_grad]  # a frozen part is no group's
    if not model.config.num_classes:
        return [{"params": trained}]
    embedding = model.class_embedding.weight
    others = [p for p in trained if p is not embedding]
    return [{"params": others}, {"params": [embedding], "lr": config.effective_lr * config.class_lr_scale}]


def lr_factor(config: TrainConfig, step: int) -> float:
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.lr_schedule == "cosine":
        progress = min(1.0, step / config.steps)
        return warmup * 0.5 * (1 + math.cos(math.pi * progress))
    return warmup


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


def new_train_state(run: TrainRun, network_config: UNetConfig, num_images: int, device: torch.device,
                    sync_free: bool, autocast_dtype: torch.dtype | None) -> TrainState:
    config = run.config
    torch.manual_seed(config.seed)
    model = UNet(network_config).to(device)
    if run.base is not None:  # a resumed run then loads its checkpoint over these weights
        initialise_from(model, run.base)
    for parameter in frozen_parameters(model, config.freeze):
        parameter.requires_grad_(False)
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
    try:
        crops = load_crops(config.data, config.crop_settings, progress=progress)
    except (ValueError, OSError) as error:
        raise TrainingError(str(error)) from None
    if crops.unusable and not config.skip_unreadable:
        raise TrainingError(refusal(crops, config.data))
    if crops.unusable:
        print(f"Leaving out {len(crops.unusable)} pictures that cannot be used (skip_unreadable; `birdgen data check"
              f" {config.data}` lists them)", flush=True)
    return crops


def training_images(config: TrainConfig, crops: Crops | None, device: torch.device, progress: bool):
    """The training part's crops (uint8 NHWC on `device`), and for a class-conditional model their class
    indices and the class list [[class id, name], …] in class-id order (index len(classes) = none)."""
    crops = crops if crops is not None else run_crops(config, progress)
    if config.conditional and not crops.kind.has_classes:
        raise TrainingError(f"{config.data}: a flat folder has no classes to condition on; put each class's pictures"
                            " in a folder of its own, or train without --conditional")
    indices = crops.split(config.split_settings)[0]
    images = torch.from_numpy(crops.images[indices]).to(device)  # converted to the model's range per batch
    if not config.conditional:
        return images, None, []
    classes = [[int(c), crops.class_names.get(int(c), str(c))] for c in sorted(set(crops.labels.tolist()))]
    if len(classes) < 2:
        raise TrainingError(f"{config.data}: one class only ({classes[0][1]}); a conditional model needs two or more")
    index_of = {class_id: index for index, (class_id, _) in enumerate(classes)}
    labels = torch.tensor([index_of[int(c)] for c in crops.labels[indices]], dtype=torch.long)
    return images, labels, classes


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


def train(run: TrainRun | TrainConfig, out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
          crops: Crops | None = None) -> Path:
    """Trains until `config.steps`; returns the last checkpoint. Safe to stop at any time. A bare
    TrainConfig is checked against its init_from folder here (`run_config.resolve` does that and
    adds the fine-tune defaults)."""
    run = run if isinstance(run, TrainRun) else TrainRun.of(run)
    config = run.config
    world, device = start_processes(config.device, config.batch_size, config.num_threads)
    MetricsLog.import_backend(config.log)
    folder = RunFolder(out, config.keep_checkpoints, RESUMABLE_CHANGES)
    if world.is_main:
        folder.prepare(config, resume, overwrite)
    if world.world_size > 1:
        dist.barrier()
    autocast_dtype = resolve_precision(config.precision, device)
    sync_free = device.type == "cuda" if config.sync_free is None else config.sync_free
    images, labels, classes = training_images(config, crops, device, world.is_main and config.progress)
    network_config = dataclasses.replace(run.network, num_classes=len(classes))
    schedule = NoiseSchedule(run.diffusion)
    state = new_train_state(run, network_config, len(images), device, sync_free, autocast_dtype)
    latest = folder.checkpoints.latest() if resume else None
    if latest is not None:
        state.load(latest)
    if world.is_main:
        announce(run, folder, state, world, device, autocast_dtype, network_config, len(images), classes, latest)
    trained = torch.compile(state.model) if config.compile else state.model
    if world.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    batches = Batches(images, labels, len(classes), schedule.num_steps, world)
    step = TrainingStep(trained, DiffusionLoss(schedule, config.min_snr_gamma), config, world, sync_free,
                        autocast_dtype)
    loop_steps(state, folder, config, world, device, batches, step, schedule)
    return folder.checkpoints.latest()


def announce(run: TrainRun, folder: RunFolder, state: "TrainState", world: Distributed, device: torch.device,
             autocast_dtype: torch.dtype | None, network_config: UNetConfig, num_images: int, classes: list,
             latest: Path | None) -> None:
    """run.json's record of the run, and its first lines on the terminal."""
    config = run.config
    machine = machine_description(device)
    folder.start(config, state.step, machine, lambda: {
        "parameters": parameter_count(state.model), "world_size": world.world_size, "train_images": num_images,
        "species": classes, **config_dict(network_config, run.diffusion)}, config.log)
    learning = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
    frozen = f" ({learning:,} learn, freeze {config.freeze})" if config.freeze != "none" else ""
    print(f"{parameter_count(state.model):,} parameters{frozen} · {num_images} training images · global batch"
          f" {config.batch_size} = {world.world_size} process(es) × {config.batch_size // world.world_size}"
          f" · {machine} · {autocast_dtype or torch.float32}", flush=True)
    if latest is not None:
        print(f"Resuming {folder.path} from {latest.name} at step {state.step}", flush=True)


@dataclasses.dataclass
class Batches:
    """This process's share of each global batch (see `loop.draw_batch`)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    num_steps: int
    world: Distributed

    def draw(self, state: "TrainState", config: TrainConfig):
        local_batch = config.batch_size // self.world.world_size
        local = slice(self.world.rank * local_batch, (self.world.rank + 1) * local_batch)
        return draw_batch(self.images, state.stream, state.generator, self.num_steps, local, config.channels_last,
                          self.labels, config.label_dropout, self.num_classes, config.high_noise_share)


@dataclasses.dataclass
class TrainingStep:
    """One optimizer step on a drawn batch: the loss (DiffusionLoss) in the run's precision, then
    `take_step`; False where the step was not taken."""

    network: torch.nn.Module
    loss_fn: DiffusionLoss
    config: TrainConfig
    world: Distributed
    sync_free: bool
    autocast_dtype: torch.dtype | None

    def __call__(self, state: "TrainState", batch) -> bool:
        x0, t, noise, y = batch
        device = state.device
        with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss = self.loss_fn(self.network, x0, t, noise, y)
        return take_step(state, loss, self.config, self.world, self.sync_free)


def loop_steps(state: "TrainState", folder: RunFolder, config: TrainConfig, world: Distributed, device: torch.device,
               batches: Batches, step: TrainingStep, schedule: NoiseSchedule) -> None:
    """Steps until config.steps, a signal or the time limit, with the log, previews and
    checkpoints on their intervals and a last checkpoint on the way out."""
    deadline = time.perf_counter() + 60 * config.max_minutes if config.max_minutes else math.inf
    stop = StopRequests()
    bar = tqdm(total=config.steps, initial=state.step, desc="Training", unit="step",
               disable=not (world.is_main and config.progress), dynamic_ncols=True)
    last_saved, told = state.step, False
    state.model.train()
    try:
        while state.step < config.steps and not stop:
            started = time.perf_counter()
            if not step(state, batches.draw(state, config)):
                continue
            bar.update(1)
            if state.step % config.log_every == 0:
                pace = log_interval(state, folder, config, bar)["images_per_s"]
                if world.is_main and not told:  # the first measured pace: what this machine's time buys
                    bar.write(time_outlook(pace, config.batch_size, config.steps, config.max_minutes,
                                           measured_recipe(config.__dict__)))
                    told = True
                if past(deadline, world, device):  # a fixed window of machine time: stop as a signal would
                    stop.request("time")
            state.train_seconds += time.perf_counter() - started
            if world.is_main and state.step % config.sample_every == 0:
                preview = preview_images(state.ema.model, schedule, config, config.image_size, step.autocast_dtype,
                                         config.sample_steps, batches.num_classes)
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


def initialise_from(model: UNet, base: BaseModel) -> None:
    """Starts `model` from a model folder's weights: the same network, except for the class
    embedding. Where the classes differ (an unconditional folder, or other classes) the new
    embedding starts at zero, so the new model begins exactly as the old one's unconditional
    prediction and learns its classes from there."""
    source = UNet(base.network)
    try:
        load_weights(Path(base.folder) / WEIGHTS_FILE, source)
    except ModelError as error:
        raise TrainingError(f"init_from: {error}") from None
    state = source.state_dict()
    if base.network.num_classes != model.config.num_classes or not model.config.num_classes:
        embedding = state.pop("class_embedding.weight", None)
        if embedding is not None and model.config.num_classes:  # every new class starts as their "no class"
            with torch.no_grad():
                model.class_embedding.weight.copy_(embedding[-1].expand_as(model.class_embedding.weight))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(key != "class_embedding.weight" for key in missing):
        raise TrainingError(f"init_from {base.folder}: weights do not fit ({len(missing)} missing, {len(unexpected)}"
                            " unexpected)")
