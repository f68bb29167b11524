"""The `birdgen` command line (also `python -m birdgen`)."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
import types
import typing
from dataclasses import fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .model_folder import ModelError, build_model, load_model, push_model
from .data import CROP_MODES, SPLITS, CropSettings, DatasetError, SplitSettings, load_crops, summarize
from .datacheck import check_dataset
from .distillation import distill
from .diffusion import DiffusionConfig
from .download import DownloadError, download
from .editing import (MASKS, EditError, EditRequest, hole_preview, inpaint_steps, interpolation_steps, load_picture,
                      make_mask, sdedit_steps)
from .evaluation import EVAL_SAMPLING, MIN_SAMPLES, EvalSettings, run_evaluation, save_evaluation, summary
from .features import FEATURE_SPACES, INCEPTION_ENV, INCEPTION_FILE, INCEPTION_PACKAGE, choose_feature_space
from .metrics_file import EvaluationRecord, read_shown
from .guidance import (GUIDE_WEIGHT, GUIDE_WEIGHT_RANGE, NO_GUIDE, SPECIES_WEIGHT, SPECIES_WEIGHT_RANGE,
                       parse_interval)
from .networks import PRESETS, parameter_count, preset
from .pipeline import DEFAULT_SAMPLING, GenerationRequest, generation_steps, make_request_sampler
from .samplers import DEFAULT_STEPS, SAMPLERS, run_steps
from .species import readable, require_species_model, resolve_species, species_names
from .export import export_any_run, set_guide
from .run_config import DistillConfig, TrainConfig, resolve
from .run_folder import TrainingError
from .sources import open_source
from .train import train
from .images import save_grid
from .utils import WriteError, atomic_write_bytes, machine_description, resolve_device
from .visualize import interpolation_gif

USER_ERRORS = (DatasetError, ModelError, TrainingError, DownloadError, EditError, ValueError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except WriteError as error:  # the machine's fault (a full disk, a read-only folder), not the command's
        print(f"birdgen: error: {error}", file=sys.stderr)
        return 1
    except USER_ERRORS as error:
        print(f"birdgen: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("birdgen: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="birdgen", description="Diffusion models that generate 64x64 birds.")
    commands = parser.add_subparsers(title="commands")

    data = commands.add_parser("data", help="get CUB-200-2011; check and prepare any set of pictures").add_subparsers(
        title="data commands")
    get = data.add_parser("download", help="download, verify (MD5) and extract CUB_200_2011.tgz")
    get.add_argument("--dest", default="data", help="folder to put CUB_200_2011/ in (default: ./data)")
    get.set_defaults(handler=cmd_download)
    check = data.add_parser("check", help="report on a folder, zip or CUB root before training: unreadable files,"
                                          " modes, sizes, classes, duplicates, the split, advice and a preview")
    check.add_argument("path", help="a folder of pictures (flat, or one folder per class), a .zip of one, or a CUB root")
    add_crop_flags(check)
    check.add_argument("--json", action="store_true", help="print the report as JSON (for scripts) instead of text")
    check.set_defaults(handler=cmd_check)
    prep = data.add_parser("prepare", help="crop and cache the pictures; print counts per split and class")
    prep.add_argument("--root", required=True, help="a CUB_200_2011 folder, a folder of pictures or a .zip of one")
    add_crop_flags(prep)
    prep.add_argument("--strict", action="store_true", help="fail on the first unusable picture instead of leaving"
                                                            " it out")
    prep.set_defaults(handler=cmd_prepare)

    species = commands.add_parser("species", help="list the species a species model knows")
    species.add_argument("--model", required=True, help="model folder or Hub id")
    species.set_defaults(handler=cmd_species)

    presets = commands.add_parser("presets", help="list the U-Net presets and their parameter counts")
    presets.set_defaults(handler=cmd_presets)

    sample = commands.add_parser("sample", help="generate an image grid")
    source = sample.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model folder or Hugging Face Hub id (owner/name)")
    source.add_argument("--preset", choices=list(PRESETS), help="a randomly initialised network (for testing)")
    sample.add_argument("--sampler", choices=SAMPLERS,
                        help=f"default: a distilled student's own, else {DEFAULT_SAMPLING[0]} {DEFAULT_SAMPLING[1]}")
    sample.add_argument("--steps", type=int, help=f"network evaluations (defaults with --sampler: {DEFAULT_STEPS})")
    sample.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the initial noise: the same seed gives the same"
                        " birds (default 0)")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM noise, 0 (deterministic) … 1")
    sample.add_argument("--species", action="append", metavar="ID|NAME",
                        help="species (or class) model only: a class id (17) or name (Cardinal, or a class folder's"
                             " name as written); repeat it, or say 'all', for one row of --num images per class")
    add_guidance_flags(sample)
    sample.add_argument("--out", default="samples.png", help="grid PNG to write (default samples.png)")
    sample.add_argument("--individual", metavar="DIR", help="also write each image as DIR/NNNN.png")
    sample.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sample.set_defaults(handler=cmd_sample)

    trainer = commands.add_parser(
        "train", help="train a model (resumable; torchrun for several GPUs)", argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
            "A guide for autoguidance (cleaner birds from a model you have): train the same kind of network,\n"
            "smaller and much shorter, on the same split, e.g. for models/small-attn\n"
            "  birdgen train --out runs/guide --data DIR --split random --test-fraction 0.1 --preset small-attn\n"
            "      --channels 32,64,64 --prediction v --min-snr-gamma 5 --lr 5e-4 --steps 4000\n"
            "  birdgen export runs/guide --to models/small-attn-guide --guides small-attn --raw-weights\n"
            "  birdgen set-guide --model models/small-attn --guide models/small-attn-guide --guide-weight 2\n"
            "      --guide-interval 200,999\n"
            "(--raw-weights: the un-averaged weights guide better than the EMA; compare a few checkpoints.)\n"
            "It must share the model's schedule, prediction target, image size (and species); see the README."))
    trainer.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    trainer.add_argument("--config", help="YAML or JSON file of settings; flags override it")
    trainer.add_argument("--resume", action="store_true", default=False, help="continue from the last checkpoint")
    trainer.add_argument("--overwrite", action="store_true", default=False, help="delete the run folder first")
    add_config_flags(trainer)
    trainer.set_defaults(handler=cmd_train)

    distiller = commands.add_parser("distill", help="distil a model into a few-step student (resumable)",
                                    argument_default=argparse.SUPPRESS)
    distiller.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    distiller.add_argument("--resume", action="store_true", default=False, help="continue from the last checkpoint")
    distiller.add_argument("--overwrite", action="store_true", default=False, help="delete the run folder first")
    add_config_flags(distiller, DistillConfig)
    distiller.set_defaults(handler=cmd_distill)

    add_model_folder_parsers(commands)
    add_editing_parsers(commands)
    add_eval_parser(commands)
    return parser


def add_eval_parser(commands) -> None:
    parser = commands.add_parser("eval", help="FD/KID, precision/recall and a memorization check against real crops")
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--data", required=True, help="the dataset the model trained on: its CUB_200_2011 folder,"
                        " folder of pictures or zip")
    parser.add_argument("--features", choices=("auto", *FEATURE_SPACES), default="auto",
                        help="inception (the standard FID network, installed by requirements.txt: numbers comparable"
                             " with published FIDs) or mobilenet (ships with birdgen; faster, on its own scale);"
                             " auto (default): inception, else mobilenet where it is not installed")
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout",
                        help="real crops to compare with: the model's held-out crops (default) or its training crops")
    parser.add_argument("--num-samples", type=int, default=1000,
                        help=f"generated images (at least {MIN_SAMPLES}; default 1000)")
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help=f"default: a distilled student's own, else {EVAL_SAMPLING[0]} {EVAL_SAMPLING[1]}")
    parser.add_argument("--steps", type=int, help="network evaluations (default: the sampler's)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise, 0 (deterministic, default) … 1")
    parser.add_argument("--batch-size", type=int, default=64, help="images per generation batch (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first batch; batch k uses seed + k × batch")
    parser.add_argument("--no-memorization", action="store_true", help="skip the nearest-training-crop check")
    parser.add_argument("--replace", action="store_true",
                        help="replace a stored evaluation with the same settings (features, samples, sampler, steps,"
                             " guidance, seed); without it such a run is refused, and other settings are added beside"
                             " the stored ones")
    add_guidance_flags(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--inception-weights",
                        help=f"path to a copy of {INCEPTION_PACKAGE}'s {INCEPTION_FILE} (else ${INCEPTION_ENV},"
                             " else the installed package's); its sha256 is checked before use")
    parser.set_defaults(handler=cmd_eval)


def cmd_eval(args) -> int:
    choose_feature_space(args.features, args.inception_weights)  # a missing extractor fails before loading anything
    model = load_guided_model(args, resolve_device(args.device))
    settings = EvalSettings(args.split, args.num_samples, args.sampler, args.steps, args.eta, args.batch_size,
                            args.seed, not args.no_memorization, args.guidance, args.guide_weight,
                            args.guide_interval)
    local = Path(args.model).is_dir()  # results go into a local folder, never into the Hub cache
    evaluation = run_evaluation(model, args.data, settings, args.features, args.inception_weights,
                                stage_progress(), print, keep_stored=local and not args.replace)
    print(summary(evaluation.metrics))
    if local:
        path, replaced = save_evaluation(model, evaluation, replace=args.replace)
        stored = EvaluationRecord.from_dict(evaluation.metrics)
        shown = read_shown(path)[stored.feature_space]
        print(f"wrote {path}" + (f" (replaced: {replaced.short()})" if replaced else "")
              + ("" if shown.key() == stored.key() else
                 f"; the card and the pages still show {shown.short()}, the most samples"))
    return 0


def stage_progress():
    """Evaluation progress: on a terminal one bar per stage, closed when the stage ends (so none
    stays open under the next); in a log (not a terminal) one line per finished stage."""

    bars: dict[str, tqdm] = {}
    started: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if not sys.stderr.isatty():
            started.setdefault(stage, time.perf_counter())
            if done >= total:
                print(f"{stage.capitalize()}: {total} images in {time.perf_counter() - started[stage]:.1f} s",
                      file=sys.stderr, flush=True)
            return
        if stage not in bars:  # one bar per stage, made on its first report
            bars[stage] = tqdm(total=total, desc=stage.capitalize(), unit="img")
        bars[stage].update(done - bars[stage].n)
        if done >= total:
            bars.pop(stage).close()

    return progress


def add_model_folder_parsers(commands) -> None:
    """export, set-guide and push: commands that write or publish a model folder."""
    export = commands.add_parser("export", help="turn a run (training or distillation) into a model folder with a"
                                                " model card")
    export.add_argument("run", help="run folder")
    export.add_argument("--to", required=True, help="model folder to write, e.g. models/NAME")
    export.add_argument("--fp32", action="store_true", help="store float32 weights (default: float16)")
    export.add_argument("--heldout-batches", type=int, default=4, help="batches of held-out crops for the card's loss")
    export.add_argument("--steps", type=int, help="distillation runs: the student for this many steps (default: the"
                                                  " run's target; every round's student is kept)")
    export.add_argument("--checkpoint-step", type=int, metavar="STEP",
                        help="training runs: export the checkpoint of this step (default: the latest)")
    export.add_argument("--raw-weights", action="store_true",
                        help="training runs: export the optimizer's own weights instead of their EMA (an"
                             " autoguidance guide guides better without the averaging; default: EMA)")
    export.add_argument("--guide", metavar="FOLDER", help="name this guide model in the folder's config, so that"
                        " sampling autoguides by default (default: keep the link the folder already has)")
    export.add_argument("--guide-weight", type=float, metavar="W",
                        help=f"with --guide: autoguidance w ({GUIDE_WEIGHT_RANGE[0]:g}-{GUIDE_WEIGHT_RANGE[1]:g},"
                             f" default {GUIDE_WEIGHT:g})")
    export.add_argument("--guide-interval", metavar="LOW,HIGH|all",
                        help="with --guide: timesteps where guidance applies (default: all)")
    export.add_argument("--guides", metavar="MODEL", help="this model is the autoguidance guide of MODEL: its card"
                                                          " says so")
    export.set_defaults(handler=cmd_export)

    link = commands.add_parser("set-guide", help="name the guide a model folder autoguides with by default")
    link.add_argument("--model", required=True, help="model folder")
    link.add_argument("--guide", required=True, metavar=f"FOLDER|{NO_GUIDE}",
                      help=f"the guide model folder; '{NO_GUIDE}' removes the link")
    link.add_argument("--guide-weight", type=float, metavar="W",
                      help=f"autoguidance w ({GUIDE_WEIGHT_RANGE[0]:g}-{GUIDE_WEIGHT_RANGE[1]:g}, default {GUIDE_WEIGHT:g})")
    link.add_argument("--guide-interval", metavar="LOW,HIGH|all",
                      help="timesteps where guidance applies, 0 least noisy (default: all)")
    link.set_defaults(handler=cmd_set_guide)

    push = commands.add_parser("push", help="upload a model folder to the Hugging Face Hub")
    push.add_argument("folder")
    push.add_argument("repo_id", help="owner/name")
    push.add_argument("--private", action="store_true")
    push.set_defaults(handler=cmd_push)


def add_editing_parsers(commands) -> None:
    interpolate = commands.add_parser("interpolate", help="morph one seed's bird into another's (DDIM, spherical)")
    interpolate.add_argument("--model", required=True, help="model folder or Hub id")
    interpolate.add_argument("--seeds", type=int, nargs=2, required=True, metavar=("A", "B"))
    interpolate.add_argument("--frames", type=int, default=9, help="images from A to B, ends included (2-64)")
    interpolate.add_argument("--steps", type=int, default=50, help="DDIM steps (deterministic, eta 0)")
    interpolate.add_argument("--out", default="interpolation.png", help="strip PNG to write")
    interpolate.add_argument("--gif", help="also write an animated GIF (there and back)")
    interpolate.add_argument("--species", nargs=2, metavar=("FROM", "TO"),
                             help="species model only: also move from one species to another (ids or names)")
    add_guidance_flags(interpolate)
    interpolate.add_argument("--device", default="auto")
    interpolate.set_defaults(handler=cmd_interpolate)

    edit = commands.add_parser("edit", help="variations / image-to-image of a picture (SDEdit)")
    edit.add_argument("--model", required=True, help="model folder or Hub id")
    edit.add_argument("--image", required=True, help="PNG or JPEG; its centre square is used")
    edit.add_argument("--strength", type=float, default=0.6, help="0 returns the picture, 1 ignores it")
    edit.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    edit.add_argument("--steps", type=int, default=50, help="steps of the whole schedule; strength × steps run")
    edit.add_argument("--eta", type=float, default=0.0)
    edit.add_argument("--num", type=int, default=8)
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--out", default="edited.png", help="grid PNG: the input first, then the results")
    edit.add_argument("--species", metavar="ID|NAME", help="species model only: turn the picture into this species")
    add_guidance_flags(edit)
    edit.add_argument("--device", default="auto")
    edit.set_defaults(handler=cmd_edit)

    inpaint = commands.add_parser("inpaint", help="regenerate part of a picture (RePaint)")
    inpaint.add_argument("--model", required=True, help="model folder or Hub id")
    inpaint.add_argument("--image", required=True, help="PNG or JPEG; its centre square is used")
    inpaint.add_argument("--mask", choices=(*MASKS, "box"), default="centre", help="the region to regenerate")
    inpaint.add_argument("--box", type=float, nargs=4, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"),
                         help="with --mask box: the region as fractions of the side, e.g. 0.2 0.2 0.8 0.6")
    inpaint.add_argument("--steps", type=int, default=50, help="DDPM steps (respaced)")
    inpaint.add_argument("--resample", type=int, default=5, help="RePaint's resampling per step (1-20)")
    inpaint.add_argument("--num", type=int, default=4)
    inpaint.add_argument("--seed", type=int, default=0)
    inpaint.add_argument("--out", default="inpainted.png", help="grid PNG: the masked input first, then the results")
    add_guidance_flags(inpaint, species=False)
    inpaint.add_argument("--device", default="auto")
    inpaint.set_defaults(handler=cmd_inpaint)


def add_guidance_flags(parser: argparse.ArgumentParser, species: bool = True) -> None:
    """--guide, --guide-weight, --guide-interval (and --guidance for species): one set for every
    command that samples; unset, each takes the model's default from its config.json."""
    if species:
        parser.add_argument("--guidance", type=float, help="species guidance with --species: 0 ignores the species, 1 is"
                            f" the plain conditional model, higher follows it more closely ({SPECIES_WEIGHT_RANGE[0]:g}-"
                            f"{SPECIES_WEIGHT_RANGE[1]:g}; default: the model's, else {SPECIES_WEIGHT:g})")
    parser.add_argument("--guide", metavar=f"FOLDER|{NO_GUIDE}", help="autoguidance: a weaker model of the same kind"
                        f" to guide with; '{NO_GUIDE}' samples without one (default: the guide the model's config"
                        " names, if any)")
    parser.add_argument("--guide-weight", type=float, metavar="W", help="autoguidance w: 1 is the model alone, higher"
                        f" moves further from the guide ({GUIDE_WEIGHT_RANGE[0]:g}-{GUIDE_WEIGHT_RANGE[1]:g}; default:"
                        f" the model's, else {GUIDE_WEIGHT:g} with --guide)")
    parser.add_argument("--guide-interval", metavar="LOW,HIGH|all", help="training timesteps where guidance applies"
                        " (0 is the least noisy), e.g. 200,999; 'all' for every step (default: the model's)")


def load_guided_model(args, device):
    """The model named by --model, with the guide that --guide picks (else its config's)."""
    model = load_model(args.model, device, guide=args.guide)
    args.guide_interval = parse_interval(args.guide_interval, model.schedule.num_steps) if args.guide_interval \
        else None
    return model


def guidance_text(model, args, species: bool) -> str:
    """What guided this run, for the command's last line ('' when nothing did)."""
    resolved = model.resolve_guidance(args.guidance if species else None, args.guide_weight, args.guide_interval)
    text = resolved.describe(species, model.guide.name if model.guide else None)
    return f" ({text})" if text else ""


def add_config_flags(parser: argparse.ArgumentParser, config_class=TrainConfig) -> None:
    """One flag per config field: --batch-size, --lr, --attention/--no-attention, …"""
    hints = typing.get_type_hints(config_class)
    comments = field_comments(config_class)
    for field in fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        if isinstance(kind, types.UnionType):  # "X | None": the flag takes an X
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        default = "unset" if field.default in (None, "") else (
            ",".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default)
        help_text = f"{comments[field.name]} (default: {default})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, dest=field.name, type=int_list, metavar="N,N,…", help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=kind, help=help_text)


def field_comments(config_class) -> dict[str, str]:
    """Each field's comment in the config dataclass's source: the one place a setting is explained."""

    found = dict(re.findall(r"^    (\w+): [^#\n]+#\s*(.+)$", inspect.getsource(config_class), re.MULTILINE))
    missing = [f.name for f in fields(config_class) if f.name not in found]
    if missing:
        raise AssertionError(f"{config_class.__name__}: explain {', '.join(missing)} in a comment")
    return found


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_download(args) -> int:
    root = download(args.dest)
    print(f"CUB-200-2011 is ready at {root}")
    return 0


def add_crop_flags(parser: argparse.ArgumentParser) -> None:
    """How pictures become crops and which split is held out: the same settings `birdgen train` takes."""
    crop, split = CropSettings(), SplitSettings()
    parser.add_argument("--size", type=int, default=crop.size, help=f"crop side in pixels (default {crop.size})")
    parser.add_argument("--crop", choices=("auto", *CROP_MODES), default=crop.crop,
                        help="auto (square around CUB's boxes, center for folders), square/bbox (CUB), center (the"
                             " middle square) or full (the whole picture padded to a square); default auto")
    parser.add_argument("--padding", type=float, default=crop.padding,
                        help="square crops: margin around the box (fraction)")
    parser.add_argument("--background", default=crop.background, help="what transparent pictures are composited onto:"
                        f" white, black, gray or #rrggbb (default {crop.background})")
    parser.add_argument("--split", choices=SPLITS, default=split.split,
                        help="auto (official for CUB, stratified for class folders, else random), official, random"
                             " or stratified (each class's share held out); default auto")
    parser.add_argument("--seed", type=int, default=split.seed,
                        help=f"seed of a random or stratified split (default {split.seed})")
    parser.add_argument("--test-fraction", type=float, default=split.test_fraction,
                        help=f"random and stratified splits: share held out (default {split.test_fraction})")


def crop_and_split(args) -> tuple[CropSettings, SplitSettings]:
    return (CropSettings(args.size, args.crop, args.padding, args.background),
            SplitSettings(args.split, args.seed, args.test_fraction))


def cmd_check(args) -> int:
    started = time.perf_counter()
    report = check_dataset(args.path, *crop_and_split(args), progress=not args.json)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.text())
        print(f"({time.perf_counter() - started:.1f} s)")
    return 0 if report.trainable else 1


def cmd_prepare(args) -> int:
    started = time.perf_counter()
    crop, split = crop_and_split(args)
    crops = load_crops(args.root, crop, strict=args.strict)
    print(summarize(crops, split))
    print(f"({time.perf_counter() - started:.1f} s)")
    return 0


def cmd_presets(args) -> int:
    for name in PRESETS:
        config = preset(name)
        network = build_model(config, DiffusionConfig()).network
        attention = ",".join(f"{r}x{r}" for r in config.attention_resolutions) or "none"
        print(f"{name:<12} {parameter_count(network):>11,} parameters  channels {config.channels}"
              f"  blocks/level {config.blocks_per_level}  attention {attention}  time → {config.time_conditioning}")
    return 0


def cmd_sample(args) -> int:
    device = resolve_device(args.device)
    if args.model:
        model = load_guided_model(args, device)
    else:
        model = build_model(preset(args.preset), DiffusionConfig(), device)
        args.guide_interval = None
    species = ()
    if args.species:
        require_species_model(model)
        species = tuple(range(model.network_config.num_classes)) if [s.lower() for s in args.species] == ["all"] \
            else tuple(resolve_species(model, text) for text in args.species)
    request = GenerationRequest(args.sampler, args.steps, args.num, args.seed, args.eta, species, args.guidance,
                                args.guide_weight, args.guide_interval)
    print(f"{model.name}: {model.parameter_count:,} parameters on {machine_description(device)}")
    sampler = make_request_sampler(model, request)
    step, seconds = run_with_bar(generation_steps(model, request), f"Sampling ({sampler.name})")
    path = save_grid(step.x, args.out, columns=args.num if len(species) > 1 else None)
    if args.individual:
        for index, image in enumerate(step.x):
            save_grid(image[None], Path(args.individual) / f"{index:04d}.png")
    if species:
        names = species_names(model)
        print(f"rows: {', '.join(names[s] for s in species)}")
    print(f"{request.total_images} images, {step.num_steps} {sampler.name} steps{guidance_text(model, args, bool(species))}"
          f" in {seconds:.1f} s on {device}; wrote {path}")
    return 0


def cmd_species(args) -> int:
    model = load_model(args.model)
    require_species_model(model)
    print(f"{model.name} knows {len(model.species)} species (id, name):")
    for class_id, name in model.species:
        print(f"{class_id:>4}  {readable(name)}")
    return 0


def run_with_bar(steps, label: str):
    """Runs a step generator with a terminal progress bar sized by the steps' own num_steps;
    returns the last step and the seconds taken."""


    started, bar = time.perf_counter(), tqdm(desc=label, unit="step")

    def on_step(step) -> None:
        bar.total = step.num_steps
        bar.update(1)

    try:
        last = run_steps(steps, on_step)
    finally:
        bar.close()
    return last, time.perf_counter() - started


def read_picture(path: str, size: int):
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise EditError(f"{path}: cannot read ({error.strerror})") from None
    return load_picture(data, size, path)


def cmd_interpolate(args) -> int:
    model = load_guided_model(args, resolve_device(args.device))
    species = None
    if args.species:
        species = tuple(resolve_species(model, text) for text in args.species)
    steps = interpolation_steps(model, args.seeds[0], args.seeds[1], args.frames, args.steps, species, args.guidance,
                                args.guide_weight, args.guide_interval)
    last, seconds = run_with_bar(steps, f"Interpolating ({args.frames} frames)")
    path = save_grid(last.x, args.out, columns=args.frames)
    if args.gif:
        atomic_write_bytes(args.gif, interpolation_gif(last.x.cpu()), "the GIF")
    print(f"{args.frames} frames from seed {args.seeds[0]} to {args.seeds[1]} in {seconds:.1f} s; wrote {path}"
          + (f" and {args.gif}" if args.gif else ""))
    return 0


def cmd_edit(args) -> int:
    model = load_guided_model(args, resolve_device(args.device))
    image = read_picture(args.image, model.network_config.image_size)
    species = None
    if args.species:
        species = resolve_species(model, args.species)
    request = EditRequest(args.sampler, args.steps, args.strength, args.num, args.seed, args.eta, species,
                          args.guidance, args.guide_weight, args.guide_interval)
    request.validate()
    last, seconds = run_with_bar(sdedit_steps(model, image, request), f"Editing (strength {args.strength:g})")
    path = save_grid(torch.cat([image.to(last.x.device), last.x]), args.out)
    print(f"{args.num} edits of {args.image} in {seconds:.1f} s; wrote {path} (the input first)")
    return 0


def cmd_inpaint(args) -> int:
    model = load_guided_model(args, resolve_device(args.device))
    size = model.network_config.image_size
    image = read_picture(args.image, size)
    mask = make_mask(args.mask, size, tuple(args.box) if args.box else None)
    steps = inpaint_steps(model, image, mask, args.steps, args.resample, args.num, args.seed, args.guide_weight,
                          args.guide_interval)
    last, seconds = run_with_bar(steps, f"Inpainting ({args.mask})")
    path = save_grid(torch.cat([hole_preview(image, mask).to(last.x.device), last.x]), args.out)
    print(f"{args.num} inpaintings of {args.image} in {seconds:.1f} s; wrote {path} (the masked input first)")
    return 0


def given_settings(config_class, values: dict) -> dict:
    """The settings a run command was given: a --config file's (training only), else on --resume
    the run folder's saved ones; then every flag given on top."""
    given = {}
    if values.get("config"):
        given = config_class.from_file(values["config"]).__dict__
        given = {k: v for k, v in given.items() if v != getattr(config_class(), k)}
    saved = Path(values["out"]) / "config.json"
    if values["resume"] and not values.get("config") and saved.is_file():
        given = config_class.from_dict(json.loads(saved.read_text()), str(saved)).__dict__
    return given | {f.name: values[f.name] for f in fields(config_class) if f.name in values}


def require_data(data: str, hint: str) -> None:
    """A missing or unreadable dataset fails here, before any work starts."""
    if not data:
        raise TrainingError(f"no data folder: pass --data DIR ({hint})")
    open_source(data)


def cmd_train(args) -> int:
    values = vars(args)
    run = resolve(given_settings(TrainConfig, values))
    require_data(run.config.data, "a CUB_200_2011 folder, or set data in --config")
    latest = train(run, values["out"], resume=values["resume"], overwrite=values["overwrite"])
    print(f"Checkpoint: {latest}")
    return 0


def cmd_distill(args) -> int:
    values = vars(args)
    config = DistillConfig.from_dict(given_settings(DistillConfig, values))
    require_data(config.data, "the dataset the teacher trained on")
    latest = distill(config, values["out"], resume=values["resume"], overwrite=values["overwrite"])
    print(f"Checkpoint: {latest}")
    return 0


def cmd_export(args) -> int:
    folder = export_any_run(args.run, args.to, half=not args.fp32, heldout_batches=args.heldout_batches,
                            student_steps=args.steps, guide=args.guide, guide_weight=args.guide_weight,
                            interval=args.guide_interval, step=args.checkpoint_step, guides=args.guides,
                            averaged=not args.raw_weights)
    print(f"Wrote model folder {folder}")
    return 0


def cmd_set_guide(args) -> int:
    model = load_model(args.model, guide=NO_GUIDE)
    interval = parse_interval(args.guide_interval, model.schedule.num_steps) if args.guide_interval else None
    set_guide(args.model, args.guide, args.guide_weight, interval)
    print(f"{args.model}: " + ("no guide" if args.guide == NO_GUIDE else f"autoguided by {args.guide} by default"))
    return 0


def cmd_push(args) -> int:
    print(push_model(args.folder, args.repo_id, private=args.private))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
