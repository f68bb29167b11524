"""`birdgen export`: a run folder (training or distillation) turned into a model folder, the
model card's files beside it (samples, loss plot, held-out loss; `modelcard` writes the text),
and the guide link a folder's config.json names (`birdgen set-guide`)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import matplotlib
import torch
from safetensors.torch import load_file

from .data import split_record
from .diffusion import DiffusionConfig, heldout_loss
from .guidance import GUIDE_WEIGHT, NO_GUIDE, SPECIES_WEIGHT, GuidanceRecord, parse_interval
from .images import save_grid
from .metrics_file import METRICS_FILE, read_shown
from .model_folder import CARD_FILE, diffusion_from_dict, load_model, read_config, save_model
from .modelcard import (AUTOGUIDANCE_HEADING, GRID_SEED, QUALITY_HEADING, TrainingCard, guidance_section,
                        heldout_text, quality_section, student_card, training_card)
from .networks import UNet, UNetConfig
from .records import DistillationRecord, SamplingRecord
from .run_config import DistillConfig, TrainConfig, TrainRun
from .run_folder import RunFolder, TrainingError, read_metrics, read_state
from .samplers import DDIMSampler, initial_noise, run_to_end
from .distillation import METHOD, student_file
from .train import run_crops
from .utils import atomic_write, atomic_write_text

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

GUIDE_LINK = ("guide", "guide_weight", "interval")  # what naming or removing a guide sets; species_weight stays


def without_guide_link(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in GUIDE_LINK}


def guidance_record_for_export(out: Path, guide: str | None, guide_weight: float | None,
                               interval: tuple[int, int] | None) -> dict | None:
    """The guidance record a model folder gets: the record it already has (so that re-exporting keeps
    the link and the species weight), with the link to `guide` (its path relative to the folder),
    its weight and interval in place of the old link's where a guide is given."""
    out = Path(out)
    existing = read_config(out)[2].get("guidance") if (out / "config.json").is_file() else None
    kept = existing.to_dict() if existing else {}
    if guide is None:
        return kept or None
    link = GuidanceRecord(os.path.relpath(Path(guide).resolve(), out.resolve()),
                          GUIDE_WEIGHT if guide_weight is None else guide_weight, interval=interval).to_dict()
    return {**without_guide_link(kept), **{key: link[key] for key in GUIDE_LINK if key in link}}


def set_guide(folder: str | os.PathLike, guide: str, guide_weight: float | None = None,
              interval: tuple[int, int] | None = None) -> Path:
    """Names `guide` as the default autoguidance of the model folder (config.json and card),
    after checking that it can guide it; `guide` "none" removes the link (the guide, its weight
    and interval; a species model keeps its species weight)."""
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    if guide == NO_GUIDE:
        kept = without_guide_link(raw.pop("guidance", {}))
        if kept:
            raw["guidance"] = kept
    else:
        raw["guidance"] = guidance_record_for_export(folder, guide, guide_weight, interval)
    atomic_write_text(folder / "config.json", json.dumps(raw, indent=2) + "\n")
    load_model(folder)  # a guide that cannot guide fails here, naming the problem
    update_card_section(folder, AUTOGUIDANCE_HEADING, guidance_section(load_model(folder)))
    return folder


def update_card_section(folder: Path, heading: str, section: str) -> None:
    """Replaces the card's section under `heading` (or adds it before the quality section)."""
    path = Path(folder) / CARD_FILE
    card = path.read_text() if path.is_file() else f"# {Path(folder).name}\n"
    if heading + "\n" in card:
        start = card.index(heading + "\n")
        following = card.find("\n## ", start + 1)
        card = card[:start] + section + (card[following + 1:] if following != -1 else "")
    elif QUALITY_HEADING + "\n" in card:
        start = card.index(QUALITY_HEADING + "\n")
        card = card[:start] + section + card[start:]
    else:
        card = card.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, card)


def update_card_quality(folder: Path) -> None:
    """Rewrites the quality section of a model card from metrics.json (appends one if missing)."""
    path = Path(folder) / CARD_FILE
    section = quality_section(read_shown(Path(folder) / METRICS_FILE), Path(folder),
                              read_config(Path(folder))[2].get("data"))
    card = path.read_text() if path.is_file() else f"# {Path(folder).name}\n"
    start = next((card.index(h) for h in (QUALITY_HEADING + "\n", "## KID / FID\n") if h in card), None)
    if start is None:
        card = card.rstrip("\n") + "\n\n" + section
    else:
        following = card.find("\n## ", start + 1)
        card = card[:start] + section + ("\n" + card[following + 1:] if following != -1 else "")
    atomic_write_text(path, card)


def plot_loss(records: list[dict], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 3.2), dpi=100)
    axis.plot([r["images_seen"] for r in records], [r["loss"] for r in records], linewidth=0.8)
    axis.set_xlabel("training images seen")
    axis.set_ylabel("training loss")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, "the loss plot", lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)


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
    folder = RunFolder(run_dir, 1, set())
    info = folder.info()
    if "network" in info and "diffusion" in info:
        return UNetConfig.from_dict(info["network"]), diffusion_from_dict(info["diffusion"])
    config = TrainConfig.from_dict(folder.config_values(), str(folder.path / "config.json"))
    run = TrainRun.of(config)
    return replace(run.network, num_classes=len(info.get("species") or [])), run.diffusion


def export_with_card(run_dir: str | os.PathLike, out: str | os.PathLike, half: bool = True,
                     heldout_batches: int = 4, guide: str | None = None, guide_weight: float | None = None,
                     interval: tuple[int, int] | None = None, step: int | None = None,
                     guides: str | None = None, averaged: bool = True) -> Path:
    """`birdgen export` for a training run. `guide`…: the autoguidance to name in the folder's
    config (else the link it already has is kept); `step`: a checkpoint other than the latest;
    `guides`: this model is the guide of that model (its card says so); `averaged`: the EMA
    weights, else the optimizer's own."""
    run_dir, out = Path(run_dir), Path(out)
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    crops = run_crops(config)
    guidance = guidance_record_for_export(out, guide, guide_weight, interval)
    export_run(run_dir, out, half=half, data=split_record(crops, config.split_settings), guidance=guidance, step=step,
               averaged=averaged)
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    model = load_model(out)
    noise, generator = initial_noise(64, config.image_size, GRID_SEED)
    labels = torch.arange(64) % model.network_config.num_classes if model.conditional else None
    denoiser = model.denoiser(labels, model.resolve_guidance(SPECIES_WEIGHT, guide_weight=1.0))
    images = run_to_end(DDIMSampler(model.schedule, min(50, model.schedule.num_steps)), denoiser, noise, generator)
    save_grid(images, out / "samples.png", columns=8)
    records = read_metrics(run_dir)
    if records:
        plot_loss(records, out / "loss.png")
    losses, held = None, []
    if config.train_on == "train":
        held = crops.split(config.split_settings, need_heldout=True)[1][: 64 * heldout_batches]
        losses = heldout_loss(model.network, model.schedule, crops.tensor(held))
    card = TrainingCard(out.name, run_dir, config, crops, run, model, records,
                        heldout_text(losses, len(held), model.data.split), read_shown(out / METRICS_FILE), out,
                        step, averaged, half, guides)
    atomic_write_text(out / CARD_FILE, training_card(card))
    return out


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


def export_student_with_card(run_dir: str | os.PathLike, out: str | os.PathLike, steps: int | None = None,
                             half: bool = True) -> Path:
    """`birdgen export` for a distillation run: the student folder, a grid at its own steps, the
    teacher beside it on the same noise, and a card saying how it was distilled."""
    run_dir, out = Path(run_dir), Path(out)
    export_student(run_dir, out, steps, half)
    config = DistillConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    student = load_model(out)
    teacher = load_model(student.distillation.teacher)  # the root of the chain: a student's teacher cannot sample at DDIM 50
    steps = student.sampling.steps
    noise, _ = initial_noise(64, student.network_config.image_size, GRID_SEED)
    samples = run_to_end(DDIMSampler(student.schedule, steps), student.denoiser(), noise)
    save_grid(samples, out / "samples.png", columns=8)
    teacher_rows = [run_to_end(DDIMSampler(teacher.schedule, n), teacher.denoiser(), noise[:8]) for n in (50, steps)]
    save_grid(torch.cat([*teacher_rows, samples[:8]]), out / "comparison.png", columns=8)  # DDIM is per-image
    records = [r for r in read_metrics(run_dir) if r["student_steps"] >= steps]
    if records:
        plot_loss(records, out / "loss.png")
    card = student_card(out.name, run_dir, out, config, student, teacher, bool(records), read_shown(out / METRICS_FILE))
    atomic_write_text(out / CARD_FILE, card)
    return out


def export_any_run(run_dir: str | os.PathLike, out: str | os.PathLike, half: bool = True, heldout_batches: int = 4,
                   student_steps: int | None = None, guide: str | None = None, guide_weight: float | None = None,
                   interval: str | None = None, step: int | None = None, guides: str | None = None,
                   averaged: bool = True) -> Path:
    """`birdgen export` and the Train page's Export: a distillation run's student, or a training
    run's weights (see `export_with_card`); `interval` as typed ("200,999" or "all")."""
    run_dir = Path(run_dir)
    run_info = run_dir / "run.json"
    if not (run_dir / "config.json").is_file():
        raise TrainingError(f"{run_dir}: not a run folder (no config.json)")
    if run_info.is_file() and json.loads(run_info.read_text()).get("kind") == "distillation":
        if not averaged:
            raise TrainingError(f"{run_dir}: --raw-weights applies to training runs, not to a distillation run")
        return export_student_with_card(run_dir, out, student_steps, half=half)
    if student_steps is not None:
        raise TrainingError(f"{run_dir}: --steps picks a student of a distillation run; this is a training run")
    steps = parse_interval(interval, run_networks(run_dir)[1].num_steps) if interval else None
    return export_with_card(run_dir, out, half=half, heldout_batches=heldout_batches, guide=guide,
                            guide_weight=guide_weight, interval=steps, step=step, guides=guides, averaged=averaged)


def export_to_new_folder(run_dir: str | os.PathLike, target: Path) -> Path:
    """The run's latest EMA weights as a new model folder `target` (never replacing one), written
    beside it and moved in when whole, so that no picker ever lists half a model."""
    if target.exists():
        raise ValueError(f"{target} already exists: choose another name")
    staging = target.parent / f".exporting-{os.getpid()}"
    try:
        export_any_run(run_dir, staging / target.name)
        os.replace(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
