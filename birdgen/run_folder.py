"""A run folder: what `birdgen train` and `birdgen distill` keep on disk, and how they resume.

    config.json          the run's resolved config (its dataclass as JSON)
    run.json             what the run is: machine(s), parameters, network, data, …
    metrics.jsonl        one JSON line per logging interval
    checkpoints/step-NNNNNNN/   NAME.safetensors per network, state.pt (optimizer, RNGs, counters)
    samples/step-NNNNNNN.png    previews from a fixed seed, and samples/latest.png

Every write of a run goes through here, so a full disk or a read-only folder ends the run in one
line naming the file and what was written (`utils.writing`), and the last complete checkpoint
stays the latest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .images import save_grid
from .utils import atomic_write_text, torch_bytes, writing


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message says why in one line."""


class StopRequests:
    """Records SIGINT/SIGTERM instead of dying, so a loop can save a checkpoint and stop; truthy
    once a stop was requested, `reason` says why ("signal", or "time" for a deadline).
    `release()` puts the previous handlers back."""

    def __init__(self):
        self.reason: str | None = None
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, lambda signum, frame: self.request("signal"))
            except ValueError:  # not the main thread (e.g. inside the app's process): no handlers
                pass

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def __bool__(self) -> bool:
        return self.reason is not None

    def release(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class BatchStream:
    """Endless shuffled batches of dataset indices; its state is (epoch, position), so a
    resumed run continues the exact same order. Each epoch's order is seeded by (seed, epoch)."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.restore(0, 0)

    def restore(self, epoch: int, position: int) -> None:
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
                self.restore(self.epoch + 1, 0)
        return torch.cat(taken)


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


class LoopState:
    """What a run resumes from beyond its config: its networks (a safetensors file each), the
    optimizer, the generator that draws flips, timesteps and noise, the batch order and the
    counters. `state_dict()` is what state.pt holds; loading it back continues bit for bit."""

    def __init__(self, networks: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                 generator: torch.Generator, stream: BatchStream, device: torch.device):
        self.networks, self.optimizer, self.generator, self.stream = networks, optimizer, generator, stream
        self.device = device
        self.step, self.train_seconds = 0, 0.0
        self.tallies = StepTallies(device)

    @property
    def images_seen(self) -> int:
        return self.step * self.stream.batch_size

    def state_dict(self, reason: str) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "epoch": self.stream.epoch, "position": self.stream.position, "step": self.step,
                "train_seconds": self.train_seconds, "skipped_steps": int(self.tallies.skipped),
                "images_seen": self.images_seen, "reason": reason}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.stream.restore(state["epoch"], state["position"])
        self.step, self.train_seconds = state["step"], state["train_seconds"]
        self.tallies = StepTallies(self.device, state["skipped_steps"])

    def save(self, folder: "RunFolder", reason: str) -> Path:
        return folder.checkpoints.save(self.step, self.networks, self.state_dict(reason))

    def load(self, checkpoint: Path) -> None:
        for name, network in self.networks.items():
            network.load_state_dict(load_file(str(checkpoint / f"{name}.safetensors"), device=str(self.device)))
        try:
            self.load_state_dict(read_state(checkpoint))
        except TrainingError as error:
            raise TrainingError(f"{checkpoint}: {error}") from None


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's state.pt (LoopState.state_dict): step, images_seen, train_seconds, …"""
    return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)


class Checkpoints:
    """Atomic checkpoints in run/checkpoints/step-NNNNNNN: written to a temporary folder,
    flushed, then renamed; older ones are deleted only after the new one is complete."""

    def __init__(self, run_dir: Path, keep: int):
        self.directory = Path(run_dir) / "checkpoints"
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

    def at_step(self, step: int | None) -> Path:
        """The latest complete checkpoint, or the one at `step`; a TrainingError if there is none."""
        complete = self.complete()
        if step is not None:
            complete = [path for path in complete if path.name == f"step-{step:07d}"]
            if not complete:
                raise TrainingError(f"{self.directory.parent}: no complete checkpoint at step {step}")
        if not complete:
            raise TrainingError(f"{self.directory.parent}: no complete checkpoint to export")
        return complete[-1]

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
                save_weights(network, temporary / f"{stem}.safetensors")
            (temporary / "state.pt").write_bytes(torch_bytes(state))
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


def save_weights(network: torch.nn.Module, path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(path))


class MetricsLog:
    """metrics.jsonl, and TensorBoard or Weights & Biases beside it when asked for."""

    def __init__(self, path: Path, backend: str, config, run_dir: Path):
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
                import torch.utils.tensorboard as module  # optional: loaded only by a run that logs to it
            elif backend == "wandb":
                import wandb as module  # optional: loaded only by a run that logs to it
            else:
                return None
        except ImportError:
            hint = " (set WANDB_MODE=offline to log without an account)" if backend == "wandb" else ""
            raise TrainingError(f"--log {backend} needs the {backend} package: pip install {backend}{hint}") from None
        return module

    def truncate_after(self, step: int) -> None:
        """Drops lines logged after the checkpoint a run resumes from, so none are doubled."""
        kept = [record for record in read_records(self.path) if record.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

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


def read_records(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line half-written when a run was killed is left out (the
    log is appended to, so a kill can tear its last line)."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return read_records(Path(run_dir) / "metrics.jsonl")


class RunFolder:
    """One run's folder (see the module's docstring); `resumable` names the config settings that
    may differ when the run is resumed, any other difference means another run."""

    def __init__(self, path: str | os.PathLike, keep_checkpoints: int, resumable: set[str]):
        self.path = Path(path)
        self.checkpoints = Checkpoints(self.path, keep_checkpoints)
        self.resumable = resumable
        self.log: MetricsLog | None = None

    def prepare(self, config, resume: bool, overwrite: bool) -> None:
        """Refuses to mix two different runs in one folder."""
        saved = self.path / "config.json"
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        elif saved.is_file():
            if not resume:
                raise TrainingError(f"{self.path}: already holds a run; pass --resume to continue it or --overwrite"
                                    " to start over")
            previous = json.loads(saved.read_text())
            changed = sorted(k for k, v in asdict(config).items()
                             if k not in self.resumable and k in previous and json.loads(json.dumps(v)) != previous[k])
            if changed:
                raise TrainingError(f"{saved}: the run was started with other settings ({', '.join(changed)});"
                                    " use a new --out folder")
        elif self.path.exists() and any(self.path.iterdir()):
            raise TrainingError(f"{self.path}: exists and is not a birdgen run folder; choose an empty or new --out")

    def start(self, config, step: int, machine: str, describe: Callable[[], dict], log_backend: str = "none") -> None:
        """Writes config.json and opens metrics.jsonl; a new run (step 0) gets run.json from
        `describe()`, a resumed one has its log cut back to `step` and this machine added."""
        with writing(self.path, "the run folder"):
            self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.json", json.dumps(asdict(config), indent=2) + "\n")
        self.log = MetricsLog(self.path / "metrics.jsonl", log_backend, config, self.path)
        self.log.truncate_after(step)
        if step == 0:
            self.write_info({"machine": machine, **describe()})
            return
        info = self.info()
        if machine not in [info.get("machine"), *info.get("also_trained_on", [])]:
            info.setdefault("also_trained_on", []).append(machine)
            self.write_info(info)

    def info(self) -> dict:
        """run.json ({} for a folder without one)."""
        path = self.path / "run.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_info(self, info: dict) -> None:
        atomic_write_text(self.path / "run.json", json.dumps(info, indent=2) + "\n")

    def config_values(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def save_preview(self, images: torch.Tensor, step: int) -> None:
        for name in (f"step-{step:07d}.png", "latest.png"):
            save_grid(images, self.path / "samples" / name)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
