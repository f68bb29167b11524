"""The `birdgen` command line (also `python -m birdgen`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
import typing
from dataclasses import fields
from pathlib import Path

from .checkpoint import ModelError, build_model, load_model, push_model
from .data import CROP_MODES, DatasetError, load_crops, summarize
from .diffusion import DiffusionConfig
from .download import DownloadError, download
from .networks import PRESETS, parameter_count, preset
from .pipeline import GenerationRequest, generation_steps, make_request_sampler
from .samplers import DEFAULT_STEPS, SAMPLERS
from .training_loop import TrainConfig, TrainingError, train
from .utils import machine_description, pick_device, save_grid

USER_ERRORS = (DatasetError, ModelError, TrainingError, DownloadError, ValueError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except USER_ERRORS as error:
        print(f"birdgen: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("birdgen: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="birdgen", description="Diffusion models that generate 64x64 birds.")
    commands = parser.add_subparsers(title="commands")

    data = commands.add_parser("data", help="get and prepare CUB-200-2011").add_subparsers(title="data commands")
    get = data.add_parser("download", help="download, verify (MD5) and extract CUB_200_2011.tgz")
    get.add_argument("--dest", default="data", help="folder to put CUB_200_2011/ in (default: ./data)")
    get.set_defaults(handler=cmd_download)
    prep = data.add_parser("prepare", help="crop and cache the images; print counts per split and species")
    prep.add_argument("--root", required=True, help="the CUB_200_2011 folder")
    prep.add_argument("--size", type=int, default=64, help="crop size in pixels (default 64)")
    prep.add_argument("--crop", choices=CROP_MODES, default="square")
    prep.add_argument("--padding", type=float, default=0.1, help="square crops: margin around the box (fraction)")
    prep.add_argument("--split", choices=("official", "random"), default="official")
    prep.add_argument("--seed", type=int, default=0, help="seed of the random split")
    prep.add_argument("--strict", action="store_true", help="fail on a corrupt image instead of skipping it")
    prep.set_defaults(handler=cmd_prepare)

    presets = commands.add_parser("presets", help="list the U-Net presets and their parameter counts")
    presets.set_defaults(handler=cmd_presets)

    sample = commands.add_parser("sample", help="generate an image grid")
    source = sample.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model folder or Hugging Face Hub id (owner/name)")
    source.add_argument("--preset", choices=list(PRESETS), help="a randomly initialised network (for testing)")
    sample.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    sample.add_argument("--steps", type=int, help=f"network evaluations (defaults: {DEFAULT_STEPS})")
    sample.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM noise, 0 (deterministic) … 1")
    sample.add_argument("--out", default="samples.png", help="grid PNG to write (default samples.png)")
    sample.add_argument("--individual", metavar="DIR", help="also write each image as DIR/NNNN.png")
    sample.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sample.set_defaults(handler=cmd_sample)

    trainer = commands.add_parser("train", help="train a model (resumable; torchrun for several GPUs)",
                                  argument_default=argparse.SUPPRESS)
    trainer.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    trainer.add_argument("--config", help="YAML or JSON file of settings; flags override it")
    trainer.add_argument("--resume", action="store_true", default=False, help="continue from the last checkpoint")
    trainer.add_argument("--overwrite", action="store_true", default=False, help="delete the run folder first")
    add_config_flags(trainer)
    trainer.set_defaults(handler=cmd_train)

    export = commands.add_parser("export", help="turn a run into a model folder with a model card")
    export.add_argument("run", help="run folder")
    export.add_argument("--to", required=True, help="model folder to write, e.g. models/NAME")
    export.add_argument("--fp32", action="store_true", help="store float32 weights (default: float16)")
    export.add_argument("--heldout-batches", type=int, default=4, help="batches of held-out crops for the card's loss")
    export.set_defaults(handler=cmd_export)

    push = commands.add_parser("push", help="upload a model folder to the Hugging Face Hub")
    push.add_argument("folder")
    push.add_argument("repo_id", help="owner/name")
    push.add_argument("--private", action="store_true")
    push.set_defaults(handler=cmd_push)

    from .evaluation import add_eval_parser

    add_eval_parser(commands)
    return parser


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field: --batch-size, --lr, --attention/--no-attention, …"""
    hints = typing.get_type_hints(TrainConfig)
    for field in fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        if isinstance(kind, types.UnionType):  # "X | None": the flag takes an X
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        help_text = f"(default: {field.default})"
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, dest=field.name, type=int_list, metavar="N,N,…", help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=kind, help=help_text)


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_download(args) -> int:
    root = download(args.dest)
    print(f"CUB-200-2011 is ready at {root}")
    return 0


def cmd_prepare(args) -> int:
    started = time.perf_counter()
    crops = load_crops(args.root, args.size, args.crop, args.padding, strict=args.strict)
    print(summarize(crops, args.split, args.seed))
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
    device = pick_device(args.device)
    if args.model:
        model = load_model(args.model, device)
    else:
        model = build_model(preset(args.preset), DiffusionConfig(), device)
    request = GenerationRequest(args.sampler, args.steps, args.num, args.seed, args.eta)
    print(f"{model.name}: {model.parameter_count:,} parameters on {machine_description(device)}")
    from tqdm.auto import tqdm

    started = time.perf_counter()
    total = make_request_sampler(model, request).num_steps
    with tqdm(total=total, desc=f"Sampling ({args.sampler})", unit="step") as bar:
        for step in generation_steps(model, request):
            bar.update(1)
    seconds = time.perf_counter() - started
    path = save_grid(step.x, args.out)
    if args.individual:
        from .utils import grid_image

        folder = Path(args.individual)
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(step.x):
            grid_image(image[None], padding=0).save(folder / f"{index:04d}.png")
    print(f"{args.num} images, {step.num_steps} {args.sampler} steps in {seconds:.1f} s on {device}; wrote {path}")
    return 0


def cmd_train(args) -> int:
    values = vars(args)
    config = TrainConfig.from_file(values["config"]) if values.get("config") else TrainConfig()
    saved = Path(values["out"]) / "config.json"
    if values["resume"] and not values.get("config") and saved.is_file():
        config = TrainConfig.from_dict(json.loads(saved.read_text()), str(saved))
    overrides = {f.name: values[f.name] for f in fields(TrainConfig) if f.name in values}
    config = TrainConfig.from_dict({**config.__dict__, **overrides})
    if not config.data:
        raise TrainingError("no data folder: pass --data DIR (a CUB_200_2011 folder) or set data in --config")
    from .data import read_metadata

    read_metadata(config.data)  # a data folder that is not a CUB layout fails before any work starts
    latest = train(config, values["out"], resume=values["resume"], overwrite=values["overwrite"])
    print(f"Checkpoint: {latest}")
    return 0


def cmd_export(args) -> int:
    from .modelcard import export_with_card

    folder = export_with_card(args.run, args.to, half=not args.fp32, heldout_batches=args.heldout_batches)
    print(f"Wrote model folder {folder}")
    return 0


def cmd_push(args) -> int:
    print(push_model(args.folder, args.repo_id, private=args.private))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
