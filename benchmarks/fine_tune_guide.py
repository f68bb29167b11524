"""Does a fine-tuned model sample better with an autoguidance guide (Karras et al. 2024) taken
from its own run? The guide is an earlier checkpoint of the same fine-tune (its raw weights: a
weaker model of the same classes that costs nothing to train), the main model the EMA of a
later one. For each guide (none, and each --guide-steps checkpoint at each --weights w): 200
samples (DDIM 25) class-guided at class guidance 5 (top-1 of the project's classifier against
the held-out real pictures', FD, precision, recall on MobileNet features) and 200 "any class"
samples (class guidance 0: FD, precision, recall).
The folder: the 8 unseen species of `fine_tune_folder.py`; the run: one kept by
`fine_tune_steps.py` (its checkpoints). Run:
python benchmarks/fine_tune_guide.py --run RUN --step 480 --guide-steps 160 --weights 2 [--threads 1]"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import REPO, cpu_flags, machine, save
from fine_tune_folder import subset

from birdgen.evaluation import EvalSettings, run_evaluation
from birdgen.model_folder import load_model


def export(run: Path, step: int, out: Path, raw: bool, guides: str | None = None) -> Path:
    subprocess.run([sys.executable, "-m", "birdgen", "export", str(run), "--to", str(out), "--checkpoint-step",
                    str(step), *(["--raw-weights"] if raw else []), *(["--guides", guides] if guides else [])],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def scores(model, data: Path, guidance: float, guide_weight: float, num_samples: int) -> dict:
    settings = EvalSettings(num_samples=num_samples, steps=25, memorization=False, guidance=guidance,
                            guide_weight=guide_weight)
    m = run_evaluation(model, data, settings, "mobilenet", estimate=False).metrics
    row = {"fd": round(m["fid"], 1), "precision": round(m["precision"], 3), "recall": round(m["recall"], 3)}
    if guidance:
        row["relative_top1"] = round(m["species_accuracy"]["relative_top1"], 3)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="a fine-tune's run folder with the checkpoints named")
    parser.add_argument("--step", type=int, required=True, help="the main model: the EMA of this checkpoint")
    parser.add_argument("--guide-steps", type=int, nargs="+", required=True)
    parser.add_argument("--weights", type=float, nargs="+", default=[2.0])
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data, run, description = subset(), Path(args.run), machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        main_dir = export(run, args.step, Path(tmp) / "main", raw=False)
        contenders = [("none", None, 1.0)] + [(f"raw weights of step {g}", g, w) for g in args.guide_steps
                                               for w in args.weights]
        for name, guide_step, weight in contenders:
            guide = "none" if guide_step is None else str(export(run, guide_step, Path(tmp) / f"guide-{guide_step}",
                                                                 raw=True, guides=str(main_dir)))
            model = load_model(main_dir, guide=guide)
            for guidance, kind in ((5.0, "class-guided (w 5)"), (0.0, "any class")):
                rows.append({"guide": name, "guide_weight": weight, "samples": kind,
                             **scores(model, data, guidance, weight, args.num_samples)})
                print(rows[-1], flush=True)
    save("fine_tune_guide" + (f"_{args.label}" if args.label else ""),
         {"machine": description, "cpu_flags": cpu_flags(), "run": run.name, "main_step": args.step,
          "num_samples": args.num_samples, "rows": rows})


if __name__ == "__main__":
    main()
