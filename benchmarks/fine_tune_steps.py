"""What a fine-tune's samples know of their classes after a given number of steps, for settings
of the fine-tune (`birdgen train --data FOLDER --init-from models/small-attn --conditional` plus
the trial's flags, no time limit): one run per trial, exported at each asked step from its
checkpoints, and the class top-1 of 200 class-guided samples (DDIM 25, class guidance 5; the
project's MobileNet logistic-regression classifier) against the held-out real pictures', for the
EMA weights (and with --raw the raw ones). A step-count proxy, cheaper than the 1,000-sample
evaluation of `fine_tune_folder.py`; the learning rate is constant after warm-up, so the first N
steps of a longer run are the N-step run. With --avx2 the run is capped at AVX2 in float32
(`fine_tune_pace.AVX2`), the arithmetic of the project's AVX2 machines.
The folder: the 8 unseen species of `fine_tune_folder.py`. Run:
python benchmarks/fine_tune_steps.py [--avx2] [--raw] defaults:160,320,480 lr5e-4:480 …
(TRIAL:STEPS,…; 1 thread each, so two can run side by side)"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import REPO, cpu_flags, machine, save
from fine_tune_folder import subset
from fine_tune_pace import AVX2

from birdgen.evaluation import EvalSettings, run_evaluation
from birdgen.model_folder import load_model

TRIALS = {
    "defaults": [],
    "lr2e-4": ["--lr", "2e-4"],
    "lr5e-4": ["--lr", "5e-4"],
    "lr1e-3": ["--lr", "1e-3"],
    "classlr100": ["--class-lr-scale", "100"],
    "ema0.99": ["--ema-decay", "0.99"],
    "lr5e-4-freeze-outer": ["--lr", "5e-4", "--freeze", "outer"],
    "lr5e-4-freeze-convolutions": ["--lr", "5e-4", "--freeze", "convolutions"],
    "lr5e-4-high-noise": ["--lr", "5e-4", "--high-noise-share", "0.5"],
}
RESULTS = REPO / "benchmarks" / "results" / "fine_tune_steps.json"


def trial(name: str, steps: list[int], data: Path, folder: Path, avx2: bool, raw: bool) -> list[dict]:
    run = folder / f"run-{name}"
    every = math.gcd(*steps)
    precision = ["--precision", "fp32"] if avx2 else []
    subprocess.run([sys.executable, "-m", "birdgen", "train", "--out", str(run), "--data", str(data), "--init-from",
                    str(REPO / "models" / "small-attn"), "--conditional", "--no-progress", "--steps", str(max(steps)),
                    "--max-minutes", "0", "--num-threads", "1", "--checkpoint-every", str(every),
                    "--keep-checkpoints", str(max(steps) // every + 1), "--sample-every", str(10 ** 6),
                    *precision, *TRIALS[name]], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   env={**os.environ, **(AVX2 if avx2 else {})})
    rows = []
    for step in steps:
        for weights in ("ema", "raw") if raw else ("ema",):
            model_dir = folder / f"model-{name}-{step}-{weights}"
            subprocess.run([sys.executable, "-m", "birdgen", "export", str(run), "--to", str(model_dir),
                            "--checkpoint-step", str(step), *(["--raw-weights"] if weights == "raw" else [])],
                           check=True, cwd=REPO, stdout=subprocess.DEVNULL)
            settings = EvalSettings(num_samples=200, steps=25, memorization=False, guidance=5.0)
            accuracy = run_evaluation(load_model(model_dir), data, settings, "mobilenet",
                                      estimate=False).metrics["species_accuracy"]
            rows.append({"trial": name, "flags": TRIALS[name], "steps": step, "weights": weights,
                         "arithmetic": "AVX2 cap, fp32" if avx2 else "native, auto precision",
                         "top1": accuracy["generated_top1"], "heldout_top1": accuracy["heldout_top1"],
                         "relative_top1": round(accuracy["relative_top1"], 3)})
            print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trials", nargs="+", help="TRIAL:STEPS[,STEPS…]")
    parser.add_argument("--avx2", action="store_true", help="train capped at AVX2, in float32")
    parser.add_argument("--raw", action="store_true", help="also evaluate the raw (un-averaged) weights")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = subset()
    description = machine()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for spec in args.trials:
            name, steps = spec.split(":")
            rows += trial(name, sorted(int(s) for s in steps.split(",")), data, Path(tmp), args.avx2, args.raw)
    earlier = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    runs = earlier.get("runs") or [{"machine": earlier.get("machine"), "note": earlier.get("note"),
                                    "rows": earlier["rows"]}]
    save("fine_tune_steps", {"runs": [*runs, {"machine": description, "cpu_flags": cpu_flags(), "rows": rows}]})


if __name__ == "__main__":
    main()
