"""Background `birdgen train` processes started from the app: one at a time, never via a shell."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .model_folder import atomic_write_text
from .data import read_metadata
from .networks import PRESETS

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
JOB_FILE = ".app-training.json"
# Log often, so that the Train page shows a run's step, speed and loss within seconds of Start
# (a step of batch 32 takes about 2 s on a 2-core CPU).
APP_LOG_EVERY = 2


def runs_dir() -> Path:
    """Where the app keeps runs: $BIRDGEN_RUNS_DIR, else ./runs."""
    return Path(os.environ.get("BIRDGEN_RUNS_DIR") or "runs")


@dataclass
class TrainForm:
    """The settings the app's Train page offers, with their allowed ranges."""

    data: str
    run_name: str
    preset: str = "small"
    attention: bool = False
    batch_size: int = 32  # 1 … 1024
    lr: float = 3e-4  # (0, 0.1]
    steps: int = 2000  # 1 … 10,000,000
    schedule: str = "cosine"
    checkpoint_every: int = 250
    sample_every: int = 250

    def validate(self) -> None:
        if not RUN_NAME.match(self.run_name):
            raise ValueError(f"run name {self.run_name!r}: use letters, digits, '-', '_' or '.' (at most 64)")
        read_metadata(self.data)  # raises DatasetError naming the missing or broken file
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}")
        limits = {"batch_size": (1, 1024), "steps": (1, 10_000_000), "checkpoint_every": (1, 10_000_000),
                  "sample_every": (1, 10_000_000)}
        for name, (low, high) in limits.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} {getattr(self, name)} out of range [{low}, {high}]")
        if not 0 < self.lr <= 0.1:
            raise ValueError(f"learning rate {self.lr} out of range (0, 0.1]")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"unknown schedule {self.schedule!r}")

    def arguments(self) -> list[str]:
        return ["--data", str(Path(self.data).resolve()), "--preset", self.preset,
                "--attention" if self.attention else "--no-attention", "--batch-size", str(self.batch_size),
                "--lr", repr(self.lr), "--steps", str(self.steps), "--schedule", self.schedule,
                "--checkpoint-every", str(self.checkpoint_every), "--sample-every", str(self.sample_every),
                "--log-every", str(APP_LOG_EVERY), "--no-progress"]


@dataclass
class Job:
    pid: int
    run_dir: str
    started: float
    form: dict

    @property
    def log_path(self) -> Path:
        return Path(self.run_dir).with_suffix(".log")  # beside the run: the trainer owns its folder


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reaps our own finished child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def current_job() -> Job | None:
    """The app's training process, if one is running."""
    path = runs_dir() / JOB_FILE
    if not path.is_file():
        return None
    try:
        job = Job(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None
    return job if _alive(job.pid) else None


def last_job() -> Job | None:
    path = runs_dir() / JOB_FILE
    try:
        return Job(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def start_training(form: TrainForm, resume: bool = False) -> Job:
    """Starts `python -m birdgen train` in its own process group, logging to the run folder."""
    form.validate()
    running = current_job()
    if running is not None:
        raise RuntimeError(f"a training run is already going (pid {running.pid}, {running.run_dir}); stop it first")
    run_dir = runs_dir() / form.run_name
    if (run_dir / "config.json").is_file() and not resume:
        raise ValueError(f"{run_dir} already holds a run: resume it or choose another name")
    runs_dir().mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "birdgen", "train", "--out", str(run_dir), *form.arguments()]
    if resume:
        command.append("--resume")
    log = open(run_dir.with_suffix(".log"), "a")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    log.close()
    job = Job(process.pid, str(run_dir), time.time(), asdict(form))
    atomic_write_text(runs_dir() / JOB_FILE, json.dumps(asdict(job)))
    return job


def stop_training(wait_s: float = 60.0) -> bool:
    """Asks the running job to save a checkpoint and exit (SIGTERM); True once it has exited."""
    job = current_job()
    if job is None:
        return True
    os.kill(job.pid, signal.SIGTERM)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if not _alive(job.pid):
            return True
        time.sleep(0.2)
    return False


def log_tail(job: Job, lines: int = 30) -> str:
    try:
        return "\n".join(job.log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def progress_text(records: list[dict], total_steps: int, batch_size: int) -> str:
    """'step S of N · X images/s · about M min left · loss L' from a run's metrics records."""
    latest = records[-1]
    left_s = (total_steps - latest["step"]) * batch_size / max(latest["images_per_s"], 1e-9)
    left = f"{left_s / 60:.0f} min" if left_s >= 90 else f"{left_s:.0f} s"
    return (f"step {latest['step']:,} of {total_steps:,} · {latest['images_per_s']:.1f} images/s · about {left} left ·"
            f" loss {latest['loss']:.4f} · {latest['images_seen']:,} images seen")


def run_folders() -> list[Path]:
    """Run folders (those with a metrics.jsonl), newest first."""
    root = runs_dir()
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if (p / "metrics.jsonl").is_file()]
    return sorted(found, key=lambda p: (p / "metrics.jsonl").stat().st_mtime, reverse=True)

