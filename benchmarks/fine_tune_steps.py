"""What a fine-tune's samples know of their classes after a given number of steps, for settings
of the fine-tune (`birdgen train --data FOLDER --init-from models/small-attn --conditional` plus
the trial's flags, --steps N, no time limit): the class top-1 of 200 class-guided samples (DDIM 25,
class guidance 5; the project's MobileNet logistic-regression classifier) against the held-out real
pictures', for the EMA weights and the raw ones. A step-count proxy, cheaper than the 1,000-sample
evaluation of `fine_tune_folder.py`; steps do the same work on any CPU, so the machine only sets
how long a trial takes. The folder: the 8 unseen species of `fine_tune_folder.py`. Run:
python benchmarks/fine_tune_steps.py defaults:480 lr5e-4:480 … (TRIAL:STEPS; 1 thread each, so two
can run side by side)"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, machine, save
from fine_tune_folder import subset

from birdgen.evaluation import EvalSettings, run_evaluation
from birdgen.model_folder import load_model

TRIALS = {
    "defaults": [],
    "lr5e-4": ["--lr", "5e-4"],
    "lr1e-3": ["--lr", "1e-3"],
    "classlr100": ["--class-lr-scale", "100"],
    "ema0.99": ["--ema-decay", "0.99"],
}
RESULTS = REPO / "benchmarks" / "results" / "fine_tune_steps.json"


def trial(name: str, steps: int, data: Path, folder: Path) -> list[dict]:
    run = folder / f"run-{name}-{steps}"
    subprocess.run([sys.executable, "-m", "birdgen", "train", "--out", str(run), "--data", str(data), "--init-from",
                    str(REPO / "models" / "small-attn"), "--conditional", "--no-progress", "--steps", str(steps),
                    "--max-minutes", "0", "--num-threads", "1", "--checkpoint-every", str(steps), "--sample-every",
                    str(10 ** 6), *TRIALS[name]], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    rows = []
    for weights in ("ema", "raw"):
        model_dir = folder / f"model-{name}-{steps}-{weights}"
        subprocess.run([sys.executable, "-m", "birdgen", "export", str(run), "--to", str(model_dir),
                        *(["--raw-weights"] if weights == "raw" else [])], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
        settings = EvalSettings(num_samples=200, steps=25, memorization=False, guidance=5.0)
        accuracy = run_evaluation(load_model(model_dir), data, settings, "mobilenet",
                                  estimate=False).metrics["species_accuracy"]
        rows.append({"trial": name, "flags": TRIALS[name], "steps": steps, "weights": weights,
                     "top1": accuracy["generated_top1"], "heldout_top1": accuracy["heldout_top1"],
                     "relative_top1": round(accuracy["relative_top1"], 3)})
        print(rows[-1], flush=True)
    return rows


def main():
    data = subset()
    earlier = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in sys.argv[1:]:
            name, steps = spec.split(":")
            earlier += trial(name, int(steps), data, Path(tmp))
    save("fine_tune_steps", {"machine": machine(), "rows": earlier})


if __name__ == "__main__":
    main()
