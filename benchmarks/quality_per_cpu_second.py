"""Quality per CPU-second: birdgen's `small` network and an equal-size diffusers UNet2DModel,
each trained with the same objective (epsilon, cosine schedule, AdamW 3e-4, batch 32, EMA),
on the same crops (official train split) for the same wall-clock budget, then compared by
noise-prediction MSE on the held-out (official test) crops at fixed timesteps and fixed noise.
Run: python benchmarks/quality_per_cpu_second.py --minutes 20"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import REAL_CUB, machine, save
from train_throughput import DiffusersAsBirdgen, birdgen_step_fn, diffusers_step_fn, diffusers_unet

from birdgen.data import load_crops
from birdgen.diffusion import DiffusionConfig, NoiseSchedule, heldout_loss
from birdgen.networks import UNet, parameter_count, preset


def train_for(step, seconds: float) -> int:
    steps, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        step()
        steps += 1
    return steps


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per contender")
    parser.add_argument("--heldout", type=int, default=512, help="held-out crops to score")
    args = parser.parse_args()
    if not (REAL_CUB / "images.txt").is_file():
        sys.exit(f"needs the real data at {REAL_CUB}")
    crops = load_crops(REAL_CUB, progress=False)
    train_images = torch.from_numpy(crops.images[crops.split_indices("official", "train")])
    heldout = crops.tensor(crops.split_indices("official", "test")[: args.heldout])
    schedule = NoiseSchedule(DiffusionConfig())
    description = machine()

    torch.manual_seed(0)
    ours = UNet(preset("small"))
    theirs = diffusers_unet(parameter_count(ours))
    results = {}
    for name, network, step in (("birdgen small", ours, birdgen_step_fn(ours, train_images, schedule)),
                                ("diffusers UNet2DModel", theirs, diffusers_step_fn(theirs, train_images))):
        steps = train_for(step, args.minutes * 60)
        scored = network if name.startswith("birdgen") else DiffusersAsBirdgen(network)
        scored.eval()
        losses = heldout_loss(scored, schedule, heldout)
        results[name] = {"parameters": parameter_count(network), "steps": steps, "images_seen": steps * 32,
                         "heldout_mse": losses, "heldout_mse_mean": sum(losses.values()) / len(losses)}
        print(name, results[name], flush=True)
    save("quality_per_cpu_second", {
        "machine": description, "minutes_each": args.minutes, "results": results,
        "ratio_heldout_mse_diffusers_vs_birdgen": results["diffusers UNet2DModel"]["heldout_mse_mean"]
        / results["birdgen small"]["heldout_mse_mean"]})


if __name__ == "__main__":
    main()
