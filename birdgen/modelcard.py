"""`birdgen export`: a run's EMA weights as a model folder, with an honest model card."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .model_folder import CARD_FILE, METRICS_FILE, load_model, read_config, read_metrics_file
from .data import Crops, split_record
from .diffusion import heldout_loss
from .evaluation import REPORT_FID, REPORT_KID
from .features import InceptionFeatures
from .guidance import GUIDE_WEIGHT, NO_GUIDE, SPECIES_WEIGHT, GuidanceRecord
from .samplers import DDIMSampler, initial_noise, run_to_end
from .records import DistillationRecord
from .run_folder import read_metrics
from .training_loop import TrainConfig, export_run, run_crops, run_networks
from .utils import atomic_write, atomic_write_text, save_grid

GRID_SEED = 0


def plot_loss(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.2), dpi=100)
    axis.plot([r["images_seen"] for r in records], [r["loss"] for r in records], linewidth=0.8)
    axis.set_xlabel("training images seen")
    axis.set_ylabel("training loss")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, "the loss plot", lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)


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


AUTOGUIDANCE_HEADING = "## Autoguidance"


def guidance_section(model) -> str:
    """The card's autoguidance section: what guides the model by default and how to turn it off."""
    if model.guide is None:
        return ""
    resolved = model.resolve_guidance()
    where = (f" for timesteps {resolved.interval[0]}–{resolved.interval[1]} only (of 0–{model.schedule.num_steps - 1},"
             " 0 least noisy)") if resolved.interval else " at every step"
    return f"""{AUTOGUIDANCE_HEADING}
This model samples with **autoguidance** (Karras et al. 2024) by default: every step also runs a smaller,
shorter-trained model of the same task, `{model.guide.name}` ({model.guide.parameter_count:,} parameters), and
moves the prediction away from the guide's, D = D_guide + w (D_main − D_guide), with w = {resolved.guide_weight:g}{where}.
The guide's errors are the kind a weak model makes (blur, smeared shapes), so stepping away from them gives
cleaner birds without labels and without losing variety. Each guided step costs one pass of the guide, about
{model.guide.flops_per_image / model.flops_per_image:.2f}× a pass of this model. `--guide none` (or the app's
toggle) samples without it; `--guide-weight W` and `--guide-interval LOW,HIGH|all` change it.

"""


def guide_purpose_section(guide, main: str) -> str:
    return f"""## What it is for
This is the **autoguidance guide** of `{main}`, not a model to sample birds with: on its own it gives poor,
blurry birds, and that is what makes it useful. Sampling `{main}` runs it beside the main model and steers away
from its predictions (see that model's card). It shares the main model's schedule, prediction target, image
size and training split.

"""


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


def export_note(run_dir: Path, step: int | None, averaged: bool) -> str:
    """The card's line on which weights of the run were exported, when not the default (the latest EMA)."""
    if step is None and averaged:
        return ""
    flags = (f" --checkpoint-step {step}" if step is not None else "") + ("" if averaged else " --raw-weights")
    which = "the training weights (not their EMA)" if not averaged else "the EMA weights"
    of = f"the checkpoint of step {step:,}, not the run's last" if step is not None else "the run's last checkpoint"
    return f"\nThese weights are {which} of {of} (`birdgen export {run_dir}{flags}`).\n"


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
    export_run(run_dir, out, half=half, data=split_record(crops, config.split, config.seed, config.test_fraction,
                                                           config.train_on),
               guidance=guidance, step=step, averaged=averaged)
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

    heldout_text = "No held-out crops: this model was trained on every image (train_on = all)."
    if config.train_on == "train":
        held = crops.split_indices(config.split, "test", config.seed, config.test_fraction)[: 64 * heldout_batches]
        losses = heldout_loss(model.network, model.schedule, crops.tensor(held))
        steps = list(losses)
        heldout_text = (f"Noise-prediction MSE on {len(held)} held-out crops ({model.data.split} split, never trained on),"
                        " fixed noise, seed 0:\n\n| timestep | " + " | ".join(str(t) for t in steps)
                        + " | mean |\n|---|" + "---|" * (len(steps) + 1) + "\n| MSE | "
                        + " | ".join(f"{losses[t]:.4f}" for t in steps)
                        + f" | {sum(losses.values()) / len(losses):.4f} |")

    final_loss = sum(r["loss"] for r in records[-10:]) / len(records[-10:]) if records else float("nan")
    trained = model.training  # written by export_run from the checkpoint
    card = f"""# {out.name}

A birdgen diffusion model that generates {config.image_size}×{config.image_size} images, trained on
{crops_description(crops)}.

| | |
|---|---|
| network | {network_description(config)}, {model.parameter_count:,} parameters, self-attention at {', '.join(f'{r}×{r}' for r in model.network_config.attention_resolutions) or 'no resolution'} |
| diffusion | {model.diffusion_config.schedule} schedule, {model.diffusion_config.num_steps} steps, {model.diffusion_config.prediction} prediction{f', min-SNR-{config.min_snr_gamma:g} weighting' if config.min_snr_gamma else ''} |
| data | {run.get('train_images', '?')} training crops from `{crops.dataset}` ({model.data.split} split, part `{config.train_on}`{f', {config.test_fraction:.0%} held out' if model.data.split != 'official' else ''}{f'; {len(crops.unusable)} unusable pictures left out' if crops.unusable else ''}) |
| training | {trained.steps:,} steps of batch {config.batch_size} = {trained.images_seen:,} images seen, AdamW lr {config.lr:g}, EMA {config.ema_decay} |
| wall time | {trained.train_hours:.2f} h of training steps on {'; '.join([run.get('machine', 'unknown hardware'), *run.get('also_trained_on', [])])} |
| final training loss | {final_loss:.4f} (mean of the last {min(10, len(records))} logged intervals) |
| weights | {'EMA' if averaged else 'the training weights (no EMA)'}, {'float16 (loaded as float32)' if half else 'float32'} |

Training command (settings in `config.json` of the run):

```
birdgen train --out {run_dir} {command_flags(config)}
```
{export_note(run_dir, step, averaged)}
## Held-out denoising loss
{heldout_text}

{quality_section(read_metrics_file(out / METRICS_FILE), out)}

{guidance_section(model)}{guide_purpose_section(model, guides) if guides else ''}{species_section(model)}## Samples
DDIM, 50 steps, seed {GRID_SEED}{f", species 1, 2, 3, … in reading order, guidance {SPECIES_WEIGHT:g}" if model.conditional else ""}:

![samples](samples.png)

## Training loss
![loss](loss.png)
"""
    atomic_write_text(out / CARD_FILE, card)
    return out


def crops_description(crops: Crops) -> str:
    """What the card says the model learned from."""
    settings = crops.settings
    if crops.layout == "cub":
        where = "around the bounding box" + (f", {settings.padding:.0%} margin" if settings.crop == "square" else "") \
            if settings.crop in ("square", "bbox") else "ignoring the bounding boxes"
        return f"CUB-200-2011 crops ({settings.crop} crops {where})"
    kind = f"{len(crops.class_names)} class folders" if crops.layout == "class-folders" else "no classes"
    how = "the middle square of each picture" if settings.crop == "center" else "each whole picture padded to a square"
    return f"the pictures of `{crops.dataset}` ({kind}; {settings.crop} crops: {how})"


def network_description(config: TrainConfig) -> str:
    if config.init_from:
        return f"fine-tuned from `{Path(config.init_from).name}` (its network and noise schedule)"
    attention = '' if config.attention is None else f', attention {"on" if config.attention else "off"}'
    return f"preset `{config.preset}`{attention}"


def command_flags(config: TrainConfig) -> str:
    """The `birdgen train` flags that reproduce config's non-default settings."""
    defaults, flags = TrainConfig(), []
    for key, value in config.__dict__.items():
        if getattr(defaults, key) == value or key == "progress" or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            flags.append(f"{flag} {','.join(str(v) for v in value)}")
        else:
            flags.append(f"{flag} {value}")
    return " ".join(flags)


def species_section(model) -> str:
    """For a species model: what it knows and how to ask for one."""
    if not model.conditional:
        return ""
    from .species import readable

    rows = "\n".join(f"| {class_id} | {readable(name)} |" for class_id, name in model.species)
    word = model.class_word
    known = f"{len(model.species)} species" if word == "species" else f"{len(model.species)} classes (one per folder)"
    return f"""## {word.capitalize()}
A class-conditional model with classifier-free guidance: it knows {known} (and "any
{word}"). Ask for one by id or name, e.g.
`birdgen sample --model THIS_FOLDER --species {model.species[0][0]} --guidance {model.resolve_guidance().species_weight:g}`.

| id | {word} |
|---|---|
{rows}

"""


QUALITY_HEADING = "## Quality"


def held_out_rate(memo: dict) -> str:
    """The held-out crops' own near-copy rate (evaluations before it was measured have none)."""
    rate = memo.get("heldout_near_copy_fraction")
    return "not measured" if rate is None else f"{rate:.1%}"


def quality_section(evaluations: dict[str, dict], folder: Path) -> str:
    """The card's quality section: each stored evaluation with its feature space, and the
    memorization check; "not measured" with the command when there is none."""
    lines = [QUALITY_HEADING]
    if not evaluations:
        lines.append("Not measured yet. Run `birdgen eval --model THIS_FOLDER --data CUB_200_2011` (standard InceptionV3"
                     " FID and KID, offline: the network is installed with birdgen).")
        return "\n".join(lines) + "\n"
    lines += ["", "| features | generated | real crops | sampler | guide | FD | KID | precision | recall |",
              "|---|---|---|---|---|---|---|---|---|"]
    for space, m in sorted(evaluations.items()):
        precision = f"{m['precision']:.3f}" if "precision" in m else "–"
        recall = f"{m['recall']:.3f}" if "recall" in m else "–"
        guide = "none"
        if m.get("guide"):
            interval = m.get("interval")
            guide = f"`{m['guide']}`, w {m['guide_weight']:g}" + (f", t {interval[0]}–{interval[1]}" if interval else "")
        lines.append(f"| {m.get('feature_label', space)} | {m['num_generated']:,} | {m.get('reference_split', m.get('split'))}"
                     f" | {m['sampler']} {m['steps']} | {guide} | {m['fid']:.2f} | {m['kid_mean']:.4f} ±"
                     f" {m['kid_std']:.4f} | {precision} | {recall} |")
    if "inception" in evaluations:
        inception = evaluations["inception"]
        lines += [f"| the original report (InceptionV3) | not stated | not stated | – | – | {REPORT_FID:.2f} |"
                  f" {REPORT_KID:.4f} | – | – |", "",
                  "The report states neither its sample count nor its real images; this card compares"
                  f" {inception['num_generated']:,} generated birds with {inception['num_real']:,} real crops the"
                  f" model never trained on. FID from fewer real images than its {InceptionFeatures.num_features:,}"
                  f" features (here {inception['num_real']:,}) is biased upwards, the more the"
                  " fewer there are: compare FIDs only at equal counts. KID is unbiased, so compare KID first."]
    guided = [(space, m) for space, m in sorted(evaluations.items()) if m.get("species", "").startswith("those")]
    for space, m in guided:
        lines += ["", f"{space}: a species model, so its samples follow the species of the real crops in turn, with"
                      f" guidance {m['guidance']:g}."]
        accuracy = m.get("species_accuracy")
        if accuracy:
            lines += ["", f"Species accuracy ({accuracy['classes']}-way logistic regression on {space} features of the"
                          " training crops): generated samples top-1"
                          f" {accuracy['generated_top1']:.1%}, top-5 {accuracy['generated_top5']:.1%}; the held-out real"
                          f" crops (the ceiling) {accuracy['heldout_top1']:.1%} / {accuracy['heldout_top5']:.1%};"
                          f" chance {accuracy['chance_top1']:.1%}. Samples reach"
                          f" {accuracy['relative_top1']:.0%} of the real crops' top-1."]
    if "mobilenet" in evaluations:
        lines += ["", "MobileNet distances are on their own scale: they are not comparable with published Inception FIDs"
                      f" (such as the original report's {REPORT_FID}). Compare them only with other MobileNet numbers at the same"
                      " image counts."]
    memo = next((m["memorization"] for _, m in sorted(evaluations.items()) if m.get("memorization")), None)
    if memo:
        lines += ["", "### Memorization check",
                  f"Distance from each generated image to its nearest training crop (of {memo['num_train']:,}, mirrored"
                  f" ones included), against the same distance for {memo['num_heldout']:,} held-out crops:", "",
                  "| space | generated (median) | held-out (median) | ratio | near-copies | held-out crops' rate |",
                  "|---|---|---|---|---|---|"]
        for space, label in (("pixel", "pixels (RMS, 0–1)"), ("feature", "features")):
            r = memo[space]
            lines.append(f"| {label} | {r['generated_median']:.4f} | {r['heldout_median']:.4f} | {r['median_ratio']:.2f} |"
                         f" {r['near_copies']} ({r['near_copy_fraction']:.1%}) | {held_out_rate(r)} |")
        lines += ["", f"A near-copy is a generated image closer to a training crop than {memo['near_copy_percentile']:g}%"
                      " of held-out crops are. In total, in either space:"
                      f" {memo['near_copies']} ({memo['near_copy_fraction']:.1%}). Held-out crops, each judged against"
                      f" the threshold the others set, give {held_out_rate(memo)}: the rate of pictures that copy"
                      " nothing. Pictures smoother than photos come closer to training crops in pixels without"
                      " copying them (the memorization calibration in BENCHMARKS.md), so judge pixel near-copies"
                      " by the closest pairs below."]
        if (folder / "memorization.png").is_file():
            lines += ["", "The closest generated images (top) and their nearest training crops (bottom):", "",
                      "![closest pairs](memorization.png)"]
    return "\n".join(lines) + "\n"


def update_card_quality(folder: Path) -> None:
    """Rewrites the quality section of a model card from metrics.json (appends one if missing)."""
    path = Path(folder) / CARD_FILE
    section = quality_section(read_metrics_file(Path(folder) / METRICS_FILE), Path(folder))
    card = path.read_text() if path.is_file() else f"# {Path(folder).name}\n"
    start = next((card.index(h) for h in (QUALITY_HEADING + "\n", "## KID / FID\n") if h in card), None)
    if start is None:
        card = card.rstrip("\n") + "\n\n" + section
    else:
        following = card.find("\n## ", start + 1)
        card = card[:start] + section + ("\n" + card[following + 1:] if following != -1 else "")
    atomic_write_text(path, card)


def guided_teacher_row(record: DistillationRecord) -> str:
    """The card row saying that the root teacher's targets were autoguided, or nothing; a student
    of a student learned the guided sampler through its earlier stage."""
    stage = record
    while stage is not None and stage.guide is None:
        stage = stage.earlier
    if stage is None:
        return ""
    where = f"t {stage.guide_interval[0]}–{stage.guide_interval[1]}" if stage.guide_interval else "every step"
    whose = "the first round's" if stage is record else "the earlier stage's first round's"
    return (f"| guided teacher | {whose} targets are `{stage.teacher}` autoguided by `{stage.guide}` with w"
            f" {stage.guide_weight:g} ({where}), so the student learns the guided sampler |\n")


def earlier_rows(record: DistillationRecord) -> str:
    """Card rows for the stages before this one when a student was distilled from a student."""
    rows, earlier = [], record.earlier
    while earlier:
        rows.append(f"| earlier stage | `{earlier.teacher}` at DDIM {earlier.teacher_steps} steps, {earlier.rounds}"
                    f" round(s) of {earlier.round_steps:,} steps of batch {earlier.batch_size}"
                    f" ({earlier.images_seen:,} images); this stage's teacher is its student"
                    f" `{record.distilled_teacher or '?'}` |")
        record, earlier = earlier, earlier.earlier
    return "".join(row + "\n" for row in reversed(rows))


def export_any_run(run_dir: str | os.PathLike, out: str | os.PathLike, half: bool = True, heldout_batches: int = 4,
                   student_steps: int | None = None, guide: str | None = None, guide_weight: float | None = None,
                   interval: str | None = None, step: int | None = None, guides: str | None = None,
                   averaged: bool = True) -> Path:
    """`birdgen export` and the Train page's Export: a distillation run's student, or a training
    run's weights (see `export_with_card`); `interval` as typed ("200,999" or "all")."""
    from .guidance import parse_interval
    from .run_folder import TrainingError

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


def export_student_with_card(run_dir: str | os.PathLike, out: str | os.PathLike, steps: int | None = None,
                             half: bool = True) -> Path:
    """`birdgen export` for a distillation run: the student folder, a grid at its own steps, the
    teacher beside it on the same noise, and a card saying how it was distilled."""
    from .distillation import DistillConfig, export_student

    run_dir, out = Path(run_dir), Path(out)
    export_student(run_dir, out, steps, half)
    config = DistillConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    student = load_model(out)
    d = student.distillation
    teacher = load_model(d.teacher)  # the root of the chain: a student's teacher cannot sample at DDIM 50
    steps = student.sampling.steps
    noise, _ = initial_noise(64, student.network_config.image_size, GRID_SEED)
    samples = run_to_end(DDIMSampler(student.schedule, steps), student.denoiser(), noise)
    save_grid(samples, out / "samples.png", columns=8)
    teacher_rows = [run_to_end(DDIMSampler(teacher.schedule, n), teacher.denoiser(), noise[:8]) for n in (50, steps)]
    save_grid(torch.cat([*teacher_rows, samples[:8]]), out / "comparison.png", columns=8)  # DDIM is per-image
    records = [r for r in read_metrics(run_dir) if r["student_steps"] >= steps]
    if records:
        plot_loss(records, out / "loss.png")
    guided = f", autoguided by `{teacher.guide.name}` as by default" if teacher.guide is not None else ""
    card = f"""# {out.name}

A distilled student of `{d.teacher}`: it generates {student.network_config.image_size}×{student.network_config.image_size}
birds in **{steps} deterministic DDIM step{'s' if steps > 1 else ''}** (network evaluations), where its teacher
needs about 50. The folder records this sampler (`config.json`, `sampling`), so `birdgen sample --model
THIS_FOLDER` and the app use it by default, and other samplers or step counts are refused (the student
has not learned them).

| | |
|---|---|
| method | {d.method}: each round halves the DDIM steps; the student learns to land in one step where its teacher lands in two (truncated-SNR-weighted x₀ loss, teacher steps clipped to [-1, 1] like the app's sampler) |
| teacher | `{d.distilled_teacher or d.teacher}` at DDIM {d.teacher_steps} steps, {student.parameter_count:,} parameters, same network |
| rounds | {d.rounds} ({' → '.join(str(d.teacher_steps >> r) for r in range(d.rounds + 1))} steps), {d.round_steps:,} steps of batch {d.batch_size} each, AdamW lr {d.lr:g} decayed linearly to 0 per round |
{guided_teacher_row(d)}| distillation | {d.images_seen:,} images seen on {d.machine or 'unknown hardware'} (the whole run: {d.run_hours or 0:.2f} h) |
| data | the teacher's own training crops (its split record is copied into `config.json`) |
{earlier_rows(d)}
Distillation command:

```
birdgen distill --out {run_dir} --teacher {config.teacher} --data {config.data} --teacher-steps {config.teacher_steps} --steps-target {config.steps_target} --round-steps {config.round_steps} --lr {config.lr:g} --batch-size {config.batch_size}{f' --guide {config.guide}' if config.guide else ''}{f' --guide-weight {config.guide_weight:g}' if config.guide_weight is not None else ''}
birdgen export {run_dir} --to {out} --steps {steps}
```

{quality_section(read_metrics_file(out / METRICS_FILE), out)}
## Samples
{steps} DDIM step{'s' if steps > 1 else ''}, seed {GRID_SEED}:

![samples](samples.png)

Same noise, rows: the teacher `{d.teacher}` with DDIM 50, the same with DDIM {steps}{guided}; this student with
DDIM {steps}:

![comparison](comparison.png)
{chr(10) + "## Distillation loss" + chr(10) + "![loss](loss.png)" + chr(10) if records else ""}"""
    atomic_write_text(out / CARD_FILE, card)
    return out
