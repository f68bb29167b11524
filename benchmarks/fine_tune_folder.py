"""Fine-tuning a shipped model on a folder of pictures of classes it never saw, with the defaults
a fine-tune gets (`birdgen train --data FOLDER --init-from models/small-attn --conditional`:
15 minutes of the machine), then the project's evaluation against the folder's own held-out
pictures: species top-1 of the samples against the held-out real pictures' (the same classifier),
pixel near-copies against the rate held-out pictures give, FD. Also writes the same-noise
picture before/after (row 1 the shipped model, then one row per class, the same seeds).

The folder: 8 species of ../shared/data/CUB_extra_folder (60 pictures each; the stratified split
holds out 12 of each), copied to the cache directory. Run:
python benchmarks/fine_tune_folder.py [--run runs/ft-extra8] [--weights 3 5] [--step N] [--label L]"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import REAL_CUB, REPO, cpu_flags, machine, save

from birdgen.data import cache_dir
from birdgen.run_config import TrainConfig, changed_settings, config_flags
from birdgen.evaluation import EvalSettings, run_evaluation
from birdgen.memorization import save_pairs
from birdgen.model_folder import load_model
from birdgen.pipeline import GenerationRequest, generate
from birdgen.images import save_grid

EXTRA = REAL_CUB.parent / "CUB_extra_folder"
SPECIES = ("American_Redstart", "Anna_Hummingbird", "Blue_Grosbeak", "Cactus_Wren", "Horned_Puffin",
           "Pileated_Woodpecker", "Summer_Tanager", "Western_Grebe")


def subset() -> Path:
    """The 8 species' folders, copied once (the shared folder is read-only)."""
    folder = cache_dir() / "benchmarks" / "extra8"
    if not folder.is_dir():
        staging = folder.with_name(".extra8-copying")
        shutil.rmtree(staging, ignore_errors=True)
        for name in SPECIES:
            shutil.copytree(EXTRA / name, staging / name)
        staging.rename(folder)
    return folder


def relative(part: str) -> str:
    """A command-line word with this machine's paths written relative to the repository or the cache."""
    return part.replace(str(REPO) + "/", "").replace(str(cache_dir()), "$BIRDGEN_CACHE_DIR")


def same_noise_picture(base: str, tuned, out: Path, count: int = 8) -> None:
    """Row 1: the shipped model from seeds 0…count-1; then each class of the fine-tuned model from
    the same noise (DDIM 50, its default class guidance)."""
    before = load_model(REPO / base, guide="none")
    rows = [generate(before, GenerationRequest("ddim", 50, count, seed=0)).images]
    for index in range(len(tuned.species)):
        rows.append(generate(tuned, GenerationRequest("ddim", 50, count, seed=0, species=(index,))).images)
    save_grid(torch.cat(rows), out, columns=count)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="runs/ft-extra8", help="run folder (trained first unless it has checkpoints)")
    parser.add_argument("--base", default="models/small-attn")
    parser.add_argument("--weights", type=float, nargs="+", default=[None],
                        help="class guidance weights to evaluate (default: the exported model's own)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--picture", default="docs/fine-tune-before-after.jpg", help="'' for none")
    parser.add_argument("--step", type=int, help="evaluate the run's checkpoint of this step (default: the latest)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--label", default="", help="results file suffix (default: fine_tune_folder.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not EXTRA.is_dir():
        sys.exit(f"needs {EXTRA}")
    data, run = subset(), REPO / args.run
    description = machine()
    command = [sys.executable, "-m", "birdgen", "train", "--out", str(run), "--data", str(data), "--init-from",
               str(REPO / args.base), "--conditional", "--no-progress"]
    if not (run / "checkpoints").is_dir():
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO)
        print(f"trained in {time.perf_counter() - started:.0f} s")
    model_dir = run.with_name(run.name + "-model" + (f"-{args.step}" if args.step else ""))
    step = ["--checkpoint-step", str(args.step)] if args.step else []
    subprocess.run([sys.executable, "-m", "birdgen", "export", str(run), "--to", str(model_dir), *step], check=True,
                   cwd=REPO)
    model = load_model(model_dir)
    rows = []
    for weight in args.weights:
        evaluation = run_evaluation(model, data, EvalSettings(num_samples=args.num_samples, guidance=weight),
                                    "mobilenet")
        m = evaluation.metrics
        accuracy, memo = m["species_accuracy"], m["memorization"]
        rows.append({"species_weight": m["guidance"], "sampler": f"{m['sampler']} {m['steps']}",
                     "generated_top1": round(accuracy["generated_top1"], 4),
                     "heldout_top1": round(accuracy["heldout_top1"], 4),
                     "relative_top1": round(accuracy["relative_top1"], 4),
                     "pixel_near_copies": round(memo["pixel"]["near_copy_fraction"], 4),
                     "heldout_rate": round(memo["pixel"]["heldout_near_copy_fraction"], 4),
                     "feature_near_copies": round(memo["feature"]["near_copy_fraction"], 4),
                     "fd": round(m["fid"], 1), "kid": round(m["kid_mean"], 4), "precision": round(m["precision"], 3),
                     "recall": round(m["recall"], 3)})
        print(rows[-1], flush=True)
        save_pairs(evaluation.closest_pairs, model_dir / f"closest-pairs-w{m['guidance']:g}.png")
    if args.picture:
        same_noise_picture(args.base, model, REPO / args.picture)
    info = (run / "run.json").read_text()
    trained = TrainConfig(**json.loads((run / "config.json").read_text()))  # a kept run: the flags it ran with
    shown = " ".join(relative(part) for part in ["birdgen", "train", *config_flags(changed_settings(trained))])  # no machine's paths in the results
    save("fine_tune_folder" + (f"_{args.label}" if args.label else ""), {"machine": description,
                              "cpu_flags": cpu_flags(), "step": model.training.steps, "species": list(SPECIES), "command": shown,
                              "training": model.training.to_dict(), "num_train": model.data.num_train,
                              "num_heldout": model.data.num_images - model.data.num_train,
                              "run_machine": json.loads(info).get("machine"), "rows": rows,
                              "picture": args.picture})


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
