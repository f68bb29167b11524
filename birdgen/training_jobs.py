"""Background `birdgen train` processes started from the app: one at a time, never via a shell."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import cache_dir
from .diffusion import SCHEDULES
from .export import export_to_new_folder
from .model_folder import CONFIG_FILE
from .networks import FREEZABLE, PRESETS
from .run_config import FINE_TUNE_DEFAULTS, TrainConfig, config_flags, measured_recipe, time_outlook
from .sources import open_source
from .utils import atomic_write_bytes, atomic_write_text

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
JOB_FILE = ".app-training.json"
# Log often, so that the Train page shows a run's step, speed and loss within seconds of Start
# (a step of batch 32 takes about 2 s on a 2-core CPU).
APP_LOG_EVERY = 2


def runs_dir() -> Path:
    """Where the app keeps runs: $BIRDGEN_RUNS_DIR, else ./runs."""
    return Path(os.environ.get("BIRDGEN_RUNS_DIR") or "runs")


# The Train page's ranges: (low, high) for each number it takes.
FORM_LIMITS = {"batch_size": (1, 1024), "steps": (1, 10_000_000), "checkpoint_every": (1, 10_000_000),
               "sample_every": (1, 10_000_000), "max_minutes": (0, 100_000)}
LR_RANGE = (1e-6, 0.1)


@dataclass
class TrainForm:
    """The settings the app's Train page offers, with their allowed ranges (FORM_LIMITS, LR_RANGE).
    `init_from` a model folder fine-tunes it (its network and noise settings come with it, and
    `preset`, `attention` and `schedule` do not apply); empty trains from scratch."""

    data: str
    run_name: str
    preset: str = "small"
    attention: bool = False
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    steps: int = 2000
    schedule: str = TrainConfig.schedule
    checkpoint_every: int = 250
    sample_every: int = 250
    init_from: str = ""
    conditional: bool = False
    max_minutes: float = 0.0  # 0: until `steps`
    skip_unreadable: bool = False
    freeze: str = TrainConfig.freeze  # a fine-tune's frozen part (networks.FREEZABLE)

    @classmethod
    def fine_tune(cls, data: str, run_name: str, init_from: str, conditional: bool) -> "TrainForm":
        """The form's defaults for a fine-tune: FINE_TUNE_DEFAULTS, as `birdgen train --init-from` has them."""
        chosen = {k: FINE_TUNE_DEFAULTS[k] for k in ("lr", "steps", "max_minutes", "checkpoint_every", "sample_every",
                                                     "freeze")}
        return cls(data, run_name, init_from=init_from, conditional=conditional, **chosen)

    def validate(self) -> None:
        if not RUN_NAME.match(self.run_name):
            raise ValueError(f"run name {self.run_name!r}: use letters, digits, '-', '_' or '.' (at most 64)")
        open_source(self.data)  # raises DatasetError naming the missing or broken file
        if self.init_from and not (Path(self.init_from) / CONFIG_FILE).is_file():
            raise ValueError(f"start from {self.init_from}: not a model folder (no {CONFIG_FILE})")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}")
        for name, (low, high) in FORM_LIMITS.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} {getattr(self, name)} out of range [{low}, {high}]")
        if self.freeze not in FREEZABLE or (self.freeze != "none" and not self.init_from):
            raise ValueError(f"freeze {self.freeze!r}: a fine-tune holds one of {', '.join(FREEZABLE)} fixed; training"
                             " from scratch holds none")
        if not LR_RANGE[0] <= self.lr <= LR_RANGE[1]:
            raise ValueError(f"learning rate {self.lr} out of range [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}]")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}")

    def arguments(self) -> list[str]:
        """`birdgen train`'s flags for this form: every setting it shows, said outright (so that the
        fine-tune defaults fill in only what the page does not offer)."""
        network = {"init_from": str(Path(self.init_from).resolve()), "freeze": self.freeze} if self.init_from else {
            "preset": self.preset, "attention": self.attention, "schedule": self.schedule}
        values = {"data": str(Path(self.data).resolve()), **network, "batch_size": self.batch_size, "lr": self.lr,
                  "steps": self.steps, "checkpoint_every": self.checkpoint_every, "sample_every": self.sample_every,
                  "max_minutes": float(self.max_minutes), "conditional": self.conditional,
                  **({"skip_unreadable": True} if self.skip_unreadable else {}), "log_every": APP_LOG_EVERY,
                  "progress": False}
        return config_flags(values)


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
        job = Job(**json.loads(path.read_text()))
        TrainForm(**job.form)  # a job file written by an older form is no job of this page's
        return job
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


def run_failure(job: Job) -> str | None:
    """The one-line error a finished run ended with (a full disk, unusable pictures, …), if it did."""
    last = log_tail(job, 1).strip()
    return last.removeprefix("birdgen: error: ") if last.startswith("birdgen: error: ") else None


def progress_text(records: list[dict], total_steps: int, batch_size: int, max_minutes: float = 0.0,
                  elapsed_s: float | None = None) -> str:
    """'step S of N · X images/s · about M min left · loss L' from a run's metrics records (the
    time left is the sooner of the steps' end and the `max_minutes` window, `elapsed_s` into it)."""
    latest = records[-1]
    left_s = (total_steps - latest["step"]) * batch_size / max(latest["images_per_s"], 1e-9)
    if max_minutes and elapsed_s is not None:
        left_s = max(0.0, min(left_s, 60 * max_minutes - elapsed_s))
    left = f"{left_s / 60:.0f} min" if left_s >= 90 else f"{left_s:.0f} s"
    return (f"step {latest['step']:,} of {total_steps:,} · {latest['images_per_s']:.1f} images/s · about {left} left ·"
            f" loss {latest['loss']:.4f} · {latest['images_seen']:,} images seen")


def run_outlook(records: list[dict], form: dict) -> str:
    """What the run's measured pace buys on this machine (`run_config.time_outlook`), for the Train page."""
    text = time_outlook(records[-1]["images_per_s"], form["batch_size"], form["steps"], form.get("max_minutes", 0.0),
                        measured_recipe(form))
    return text[0].upper() + text[1:] + "."


UPLOAD_LIMIT_MB = 200  # the largest zip the Train page takes (Streamlit's own default upload limit)


def save_upload(name: str, data: bytes) -> Path:
    """An uploaded zip, kept in the cache directory under its content hash (never extracted:
    `sources.ZipSource` reads it in place), so that the run that trains on it can read it too."""
    if len(data) > UPLOAD_LIMIT_MB * 2**20:
        raise ValueError(f"{name}: {len(data) / 2**20:.0f} MB, over the {UPLOAD_LIMIT_MB} MB upload limit")
    if not name.lower().endswith(".zip"):
        raise ValueError(f"{name}: upload a .zip of your picture folder")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(name).stem)[:48] or "pictures"
    path = cache_dir() / "uploads" / f"{hashlib.sha256(data).hexdigest()[:12]}" / f"{stem}.zip"
    if not path.is_file():
        atomic_write_bytes(path, data, "the uploaded zip")
    return path


def export_to_models(run_dir: str | os.PathLike, name: str, models: Path) -> Path:
    """The Train page's Export: the run's latest EMA weights as models/NAME (a new folder only:
    a model that is there already is never replaced from the page)."""
    if not RUN_NAME.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '-', '_' or '.' (at most 64)")
    return export_to_new_folder(run_dir, models / name)


def run_folders() -> list[Path]:
    """Run folders (those with a metrics.jsonl), newest first."""
    root = runs_dir()
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if (p / "metrics.jsonl").is_file()]
    return sorted(found, key=lambda p: (p / "metrics.jsonl").stat().st_mtime, reverse=True)

