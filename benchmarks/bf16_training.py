"""Training in bf16 autocast against float32 on this CPU: the same fine-tune of `small-attn`
(batch 32, the same seed, data and batches) for --steps steps in each precision, in turns
(fp32, bf16, fp32, bf16): images/s, the loss curve of each, and how far apart the two runs'
samples are from the same noise, beside how far training moved them from where they started.
Run: python benchmarks/bf16_training.py [--steps 40] [--rounds 2]"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from common import REAL_CUB, REPO, machine, save

from birdgen.data import load_crops
from birdgen.model_folder import load_model
from birdgen.pipeline import GenerationRequest, generate
from birdgen.precision import cpu_has_native_bf16
from birdgen.run_folder import read_metrics
from birdgen.export import export_run
from birdgen.run_config import TrainConfig
from birdgen.train import train


def one_run(precision: str, steps: int, crops, folder: Path) -> dict:
    config = TrainConfig(data=str(REAL_CUB), init_from=str(REPO / "models" / "small-attn"), prediction="v",
                         min_snr_gamma=5.0, lr=2e-4, warmup_steps=10, steps=steps, log_every=10, sample_every=10**6,
                         checkpoint_every=10**6, precision=precision, progress=False, split="random",
                         test_fraction=0.1)
    train(config, folder / "run", crops=crops)
    records = read_metrics(folder / "run")
    export_run(folder / "run", folder / "model", half=False)
    model = load_model(folder / "model")
    images = generate(model, GenerationRequest("ddim", 20, 16, seed=7)).images
    return {"images_per_s": statistics.median(r["images_per_s"] for r in records[1:] or records),
            "loss": [round(r["loss"], 5) for r in records], "samples": images}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not (REAL_CUB / "images.txt").is_file():
        sys.exit(f"needs the real data at {REAL_CUB}")
    description = machine()
    crops = load_crops(REAL_CUB, progress=False)
    runs = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for precision in runs:
            with tempfile.TemporaryDirectory() as folder:
                runs[precision].append(one_run(precision, args.steps, crops, Path(folder)))
    base = generate(load_model(REPO / "models" / "small-attn", guide="none"),
                    GenerationRequest("ddim", 20, 16, seed=7)).images
    fp32, bf16 = runs["fp32"][0], runs["bf16"][0]
    difference = lambda a, b: round(float((a - b).abs().mean() * 127.5), 2)  # noqa: E731 (mean |Δ| in 0-255 levels)
    save("bf16_training", {
        "machine": description, "native_bf16": cpu_has_native_bf16(), "steps": args.steps, "batch": 32,
        "images_per_s": {p: [round(r["images_per_s"], 1) for r in rs] for p, rs in runs.items()},
        "speedup": round(statistics.median(r["images_per_s"] for r in runs["bf16"])
                         / statistics.median(r["images_per_s"] for r in runs["fp32"]), 2),
        "loss_fp32": fp32["loss"], "loss_bf16": bf16["loss"],
        "max_loss_difference": round(max(abs(a - b) for a, b in zip(fp32["loss"], bf16["loss"])), 5),
        "fp32_again_same": runs["fp32"][0]["loss"] == runs["fp32"][-1]["loss"],
        "samples_bf16_vs_fp32_mean_abs_levels": difference(bf16["samples"], fp32["samples"]),
        "samples_fp32_vs_start_mean_abs_levels": difference(fp32["samples"], base)})


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
