"""Model cards: what a model folder's README.md says, written from its records as text only
(`export` writes the files and gathers what they say)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data import Crops
from .features import InceptionFeatures
from .guidance import SPECIES_WEIGHT
from .metrics_file import REPORT_FID, REPORT_KID, EvaluationRecord
from .records import DataRecord, DistillationRecord
from .run_config import DistillConfig, TrainConfig, changed_settings, config_flags
from .species import readable

GRID_SEED = 0
AUTOGUIDANCE_HEADING = "## Autoguidance"
QUALITY_HEADING = "## Quality"


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


def export_note(run_dir: Path, step: int | None, averaged: bool) -> str:
    """The card's line on which weights of the run were exported, when not the default (the latest EMA)."""
    if step is None and averaged:
        return ""
    flags = (f" --checkpoint-step {step}" if step is not None else "") + ("" if averaged else " --raw-weights")
    which = "the training weights (not their EMA)" if not averaged else "the EMA weights"
    of = f"the checkpoint of step {step:,}, not the run's last" if step is not None else "the run's last checkpoint"
    return f"\nThese weights are {which} of {of} (`birdgen export {run_dir}{flags}`).\n"


@dataclass(frozen=True)
class TrainingCard:
    """What a training run's card says: the run's settings and records, and what export measured."""

    name: str
    run_dir: Path
    config: TrainConfig
    crops: Crops
    run: dict  # run.json
    model: object  # the exported BirdModel
    loss_records: list[dict]  # metrics.jsonl
    heldout: str  # the held-out loss section's text
    evaluations: dict[str, EvaluationRecord]
    folder: Path
    step: int | None = None
    averaged: bool = True
    half: bool = True
    guides: str | None = None


def heldout_text(losses: dict[int, float] | None, count: int, split: str) -> str:
    """The held-out loss table (None: the model trained on every image)."""
    if losses is None:
        return "No held-out crops: this model was trained on every image (train_on = all)."
    steps = list(losses)
    return (f"Noise-prediction MSE on {count} held-out crops ({split} split, never trained on),"
            " fixed noise, seed 0:\n\n| timestep | " + " | ".join(str(t) for t in steps)
            + " | mean |\n|---|" + "---|" * (len(steps) + 1) + "\n| MSE | "
            + " | ".join(f"{losses[t]:.4f}" for t in steps) + f" | {sum(losses.values()) / len(losses):.4f} |")


def training_card(card: TrainingCard) -> str:
    config, crops, run, model, records = card.config, card.crops, card.run, card.model, card.loss_records
    final_loss = sum(r["loss"] for r in records[-10:]) / len(records[-10:]) if records else float("nan")
    trained = model.training  # written by export from the checkpoint
    return f"""# {card.name}

A birdgen diffusion model that generates {config.image_size}×{config.image_size} images, trained on
{crops_description(crops)}.

| | |
|---|---|
| network | {network_description(config)}, {model.parameter_count:,} parameters, self-attention at {', '.join(f'{r}×{r}' for r in model.network_config.attention_resolutions) or 'no resolution'} |
| diffusion | {model.diffusion_config.schedule} schedule, {model.diffusion_config.num_steps} steps, {model.diffusion_config.prediction} prediction{f', min-SNR-{config.min_snr_gamma:g} weighting' if config.min_snr_gamma else ''} |
| data | {run.get('train_images', '?')} training crops from `{crops.dataset}` ({model.data.split} split, part `{config.train_on}`{f', {config.test_fraction:.0%} held out' if model.data.split != 'official' else ''}{f'; {len(crops.unusable)} unusable pictures left out' if crops.unusable else ''}) |
| training | {trained.steps:,} steps of batch {config.batch_size} = {trained.images_seen:,} images seen, AdamW lr {config.lr:g}, EMA {config.ema_decay}{f', {config.freeze} frozen' if config.freeze != 'none' else ''} |
| wall time | {trained.train_hours:.2f} h of training steps on {'; '.join([run.get('machine', 'unknown hardware'), *run.get('also_trained_on', [])])} |
| final training loss | {final_loss:.4f} (mean of the last {min(10, len(records))} logged intervals) |
| weights | {'EMA' if card.averaged else 'the training weights (no EMA)'}, {'float16 (loaded as float32)' if card.half else 'float32'} |

Training command (settings in `config.json` of the run):

```
birdgen train --out {card.run_dir} {' '.join(config_flags(changed_settings(config)))}
```
{export_note(card.run_dir, card.step, card.averaged)}
## Held-out denoising loss
{card.heldout}

{quality_section(card.evaluations, card.folder, model.data)}

{guidance_section(model)}{guide_purpose_section(model, card.guides) if card.guides else ''}{species_section(model)}## Samples
DDIM, 50 steps, seed {GRID_SEED}{f", species 1, 2, 3, … in reading order, guidance {SPECIES_WEIGHT:g}" if model.conditional else ""}:

![samples](samples.png)

## Training loss
![loss](loss.png)
"""


def crops_description(crops: Crops) -> str:
    """What the card says the model learned from."""
    settings, kind = crops.settings, crops.kind
    if kind.has_boxes:
        where = "around the bounding box" + (f", {settings.padding:.0%} margin" if settings.crop == "square" else "") \
            if settings.crop in ("square", "bbox") else "ignoring the bounding boxes"
        return f"CUB-200-2011 crops ({settings.crop} crops {where})"
    classes = f"{len(crops.class_names)} class folders" if kind.has_classes else "no classes"
    how = "the middle square of each picture" if settings.crop == "center" else "each whole picture padded to a square"
    return f"the pictures of `{crops.dataset}` ({classes}; {settings.crop} crops: {how})"


def network_description(config: TrainConfig) -> str:
    if config.init_from:
        return f"fine-tuned from `{Path(config.init_from).name}` (its network and noise schedule)"
    attention = '' if config.attention is None else f', attention {"on" if config.attention else "off"}'
    return f"preset `{config.preset}`{attention}"


def species_section(model) -> str:
    """For a species model: what it knows and how to ask for one."""
    if not model.conditional:
        return ""
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


def held_out_rate(memo: dict) -> str:
    """The held-out crops' own near-copy rate (evaluations before it was measured have none)."""
    rate = memo.get("heldout_near_copy_fraction")
    return "not measured" if rate is None else f"{rate:.1%}"


def eval_data(record: DataRecord | None) -> str:
    """What `birdgen eval --data` takes for a model: its own pictures (CUB's folder for a CUB model)."""
    if record is None or record.kind.has_boxes:
        return record.dataset if record is not None else "CUB_200_2011"
    return record.path or record.dataset


def quality_section(evaluations: dict[str, EvaluationRecord], folder: Path, data: DataRecord | None) -> str:
    """The card's quality section: each stored evaluation with its feature space, and the
    memorization check; "not measured" with the command (on the model's own pictures, `data`)
    when there is none."""
    lines = [QUALITY_HEADING]
    if not evaluations:
        lines.append(f"Not measured yet. Run `birdgen eval --model THIS_FOLDER --data {eval_data(data)}` (standard"
                     " InceptionV3 FID and KID, offline: the network is installed with birdgen).")
        return "\n".join(lines) + "\n"
    lines += quality_table(evaluations) + species_lines(evaluations)
    if "mobilenet" in evaluations:
        lines += ["", "MobileNet distances are on their own scale: they are not comparable with published Inception FIDs"
                      f" (such as the original report's {REPORT_FID}). Compare them only with other MobileNet numbers at the same"
                      " image counts."]
    memo = next((m.memorization for _, m in sorted(evaluations.items()) if m.memorization), None)
    if memo:
        lines += memorization_lines(memo, folder)
    return "\n".join(lines) + "\n"


def quality_table(evaluations: dict[str, EvaluationRecord]) -> list[str]:
    """A row per feature space, the report's row, and what the Inception numbers rest on."""
    lines = ["", "| features | generated | real crops | sampler | guide | FD | KID | precision | recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for space, m in sorted(evaluations.items()):
        precision = f"{m.precision:.3f}" if m.precision is not None else "–"
        recall = f"{m.recall:.3f}" if m.recall is not None else "–"
        guide = "none"
        if m.guide:
            guide = f"`{m.guide}`, w {m.guide_weight:g}" + (f", t {m.interval[0]}–{m.interval[1]}" if m.interval else "")
        lines.append(f"| {m.feature_label or space} | {m.num_generated:,} | {m.reference_split}"
                     f" | {m.sampler} {m.steps} | {guide} | {m.fid:.2f} | {m.kid_mean:.4f} ±"
                     f" {m.kid_std:.4f} | {precision} | {recall} |")
    if "inception" in evaluations:
        inception = evaluations["inception"]
        lines += [f"| the original report (InceptionV3) | not stated | not stated | – | – | {REPORT_FID:.2f} |"
                  f" {REPORT_KID:.4f} | – | – |", "",
                  "The report states neither its sample count nor its real images; this card compares"
                  f" {inception.num_generated:,} generated birds with {inception.num_real:,} real crops the"
                  f" model never trained on. FID from fewer real images than its {InceptionFeatures.num_features:,}"
                  f" features (here {inception.num_real:,}) is biased upwards, the more the"
                  " fewer there are: compare FIDs only at equal counts. KID is unbiased, so compare KID first."]
    return lines


def species_lines(evaluations: dict[str, EvaluationRecord]) -> list[str]:
    """For a species model's evaluations: which species the samples followed and how well."""
    lines = []
    for space, m in sorted(evaluations.items()):
        if not m.conditional:
            continue
        lines += ["", f"{space}: a species model, so its samples follow the species of the real crops in turn, with"
                      f" guidance {m.guidance:g}."]
        accuracy = m.species_accuracy
        if accuracy:
            lines += ["", f"Species accuracy ({accuracy['classes']}-way logistic regression on {space} features of the"
                          " training crops): generated samples top-1"
                          f" {accuracy['generated_top1']:.1%}, top-5 {accuracy['generated_top5']:.1%}; the held-out real"
                          f" crops (the ceiling) {accuracy['heldout_top1']:.1%} / {accuracy['heldout_top5']:.1%};"
                          f" chance {accuracy['chance_top1']:.1%}. Samples reach"
                          f" {accuracy['relative_top1']:.0%} of the real crops' top-1."]
    return lines


def memorization_lines(memo: dict, folder: Path) -> list[str]:
    lines = ["", "### Memorization check",
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
    return lines


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


def student_card(name: str, run_dir: Path, out: Path, config: DistillConfig, student, teacher, has_loss: bool,
                 evaluations: dict[str, EvaluationRecord]) -> str:
    """A distilled student's card: how it was distilled, its samples beside its teacher's."""
    d, steps = student.distillation, student.sampling.steps
    guided = f", autoguided by `{teacher.guide.name}` as by default" if teacher.guide is not None else ""
    return f"""# {name}

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

{quality_section(evaluations, out, student.data)}
## Samples
{steps} DDIM step{'s' if steps > 1 else ''}, seed {GRID_SEED}:

![samples](samples.png)

Same noise, rows: the teacher `{d.teacher}` with DDIM 50, the same with DDIM {steps}{guided}; this student with
DDIM {steps}:

![comparison](comparison.png)
{chr(10) + "## Distillation loss" + chr(10) + "![loss](loss.png)" + chr(10) if has_loss else ""}"""
