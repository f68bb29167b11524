"""Quality per CPU-second: birdgen's `small` network and an equal-size diffusers UNet2DModel,
each trained with the same objective (epsilon, cosine schedule, AdamW 3e-4, batch 32, EMA),
on the same crops (official train split) for the same wall-clock budget, then compared by
noise-prediction MSE on the held-out (official test) crops at fixed timesteps and fixed noise,
and by the Fréchet distance in birdgen's offline MobileNet features between `--samples`
DDIM-25 samples and as many held-out crops.

Both contenders train at the same time, each in its own process pinned to one torch thread,
so each gets one core of the same machine under the same conditions (a 20-minute run takes
20 minutes, not 40). Run: python benchmarks/quality_per_cpu_second.py --minutes 20"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from common import REAL_CUB, machine, save
from train_throughput import DiffusersAsBirdgen, birdgen_step_fn, diffusers_step_fn, diffusers_unet

from birdgen.data import SplitSettings, load_crops
from birdgen.diffusion import DiffusionConfig, NoiseSchedule, heldout_loss
from birdgen.networks import UNet, parameter_count, preset

CONTENDERS = ("birdgen small", "diffusers UNet2DModel")


def sample_fd(network, schedule, heldout_uint8, count: int) -> float:
    """MobileNet FD between `count` DDIM-25 samples of the network and `count` held-out crops."""
    import warnings

    from birdgen.images import to_uint8
    from birdgen.evaluation import extract_features, kid_and_fid
    from birdgen.features import MobileNetFeatures
    from birdgen.samplers import DDIMSampler, Denoiser, initial_noise, run_to_end

    noise, generator = initial_noise(count, heldout_uint8.shape[1], seed=0)
    images = run_to_end(DDIMSampler(schedule, 25), Denoiser(network, schedule), noise, generator)
    extractor = MobileNetFeatures()
    fake, real = extract_features(extractor, to_uint8(images)), extract_features(extractor, heldout_uint8[:count])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small-sample FD: compared only between the two contenders
        return kid_and_fid(real, fake, subsets=10)["fid"]


def train_and_score(name: str, minutes: float, heldout_count: int, samples: int) -> dict:
    torch.set_num_threads(1)
    crops = load_crops(REAL_CUB, progress=False)
    train_indices, heldout_indices = crops.split(SplitSettings("official"))
    train_images = torch.from_numpy(crops.images[train_indices])
    heldout = crops.tensor(heldout_indices[:heldout_count])
    schedule = NoiseSchedule(DiffusionConfig())
    torch.manual_seed(0)
    ours = UNet(preset("small"))
    if name == "birdgen small":
        network, scored, step = ours, ours, birdgen_step_fn(ours, train_images, schedule)
    else:
        network = diffusers_unet(parameter_count(ours))
        scored, step = DiffusersAsBirdgen(network), diffusers_step_fn(network, train_images)

    steps, cpu_start = 0, time.process_time()
    deadline = time.perf_counter() + minutes * 60
    while time.perf_counter() < deadline:
        step()
        steps += 1
    cpu_seconds = time.process_time() - cpu_start
    scored.eval()
    losses = heldout_loss(scored, schedule, heldout)
    heldout_uint8 = crops.images[crops.split(SplitSettings("official"))[1][:heldout_count]]
    result = {"parameters": parameter_count(network), "steps": steps, "images_seen": steps * 32,
              "train_cpu_seconds": round(cpu_seconds, 1), "heldout_mse": losses,
              "heldout_mse_mean": sum(losses.values()) / len(losses),
              "mobilenet_fd": sample_fd(scored, schedule, heldout_uint8, samples), "fd_images": samples}
    print(name, result, flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per contender")
    parser.add_argument("--heldout", type=int, default=512, help="held-out crops to score")
    parser.add_argument("--samples", type=int, default=256, help="samples per contender for the FD")
    args = parser.parse_args()
    if not (REAL_CUB / "images.txt").is_file():
        sys.exit(f"needs the real data at {REAL_CUB}")
    load_crops(REAL_CUB, progress=False)  # fill the crop cache once, before the clocks start
    description = machine()
    with ProcessPoolExecutor(len(CONTENDERS), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(train_and_score, name, args.minutes, args.heldout, args.samples)
                   for name in CONTENDERS}
        results = {name: future.result() for name, future in futures.items()}
    save("quality_per_cpu_second", {
        "machine": description + "; each contender in its own process with 1 torch thread, concurrently",
        "minutes_each": args.minutes, "results": results,
        "ratio_heldout_mse_diffusers_vs_birdgen": results["diffusers UNet2DModel"]["heldout_mse_mean"]
        / results["birdgen small"]["heldout_mse_mean"],
        "ratio_fd_diffusers_vs_birdgen": results["diffusers UNet2DModel"]["mobilenet_fd"]
        / results["birdgen small"]["mobilenet_fd"]})


if __name__ == "__main__":
    main()
