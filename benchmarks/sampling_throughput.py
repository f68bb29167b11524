"""Sampling throughput on the same network weights: birdgen's DDIM (50 steps) and
DPM-Solver++ (20 steps) versus diffusers' DDIMScheduler and DPMSolverMultistepScheduler
stepping that network in the loop of diffusers' pipelines. Run:
python benchmarks/sampling_throughput.py [--model models/small-attn]"""

from __future__ import annotations

import argparse

import torch

from common import alternate, machine, save

from birdgen.checkpoint import build_model, load_model
from birdgen.diffusion import DiffusionConfig
from birdgen.networks import preset
from birdgen.samplers import initial_noise, make_sampler, run_to_end

BATCH = 16


def diffusers_loop(model, scheduler, steps, noise):
    """What DDIMPipeline / DPMSolverMultistep pipelines do per call, on birdgen's network."""
    network = model.network
    scheduler.set_timesteps(steps)
    image = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = network(image, t.expand(len(image)))
            image = scheduler.step(output, t, image).prev_sample
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="model folder (default: a random `small-attn` network)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if args.model:
        model = load_model(args.model)
    else:
        torch.manual_seed(0)
        model = build_model(preset("small-attn"), DiffusionConfig())
    config = model.diffusion_config
    common = dict(num_train_timesteps=config.num_steps, timestep_spacing="trailing",
                  prediction_type="v_prediction" if config.prediction == "v" else "epsilon",
                  beta_schedule="squaredcos_cap_v2" if config.schedule == "cosine" else "linear",
                  beta_start=config.beta_start, beta_end=config.beta_end)
    ddim = DDIMScheduler(**common, clip_sample=True, set_alpha_to_one=True)
    dpm = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    noise, _ = initial_noise(BATCH, model.network_config.image_size, seed=0)
    schedule, denoiser = model.schedule, model.denoiser()
    contenders = {
        "birdgen ddim-50": lambda: run_to_end(make_sampler("ddim", schedule, 50), denoiser, noise),
        "diffusers ddim-50": lambda: diffusers_loop(model, ddim, 50, noise),
        "birdgen dpmpp-20": lambda: run_to_end(make_sampler("dpmpp", schedule, 20), denoiser, noise),
        "diffusers dpmpp-20": lambda: diffusers_loop(model, dpm, 20, noise),
    }
    description = machine()
    speed = alternate(contenders, args.rounds, BATCH)
    save("sampling_throughput", {
        "machine": description, "model": model.name, "batch": BATCH, "images_per_s": speed,
        "ratio_ddim": speed["birdgen ddim-50"] / speed["diffusers ddim-50"],
        "ratio_dpmpp": speed["birdgen dpmpp-20"] / speed["diffusers dpmpp-20"],
    })


if __name__ == "__main__":
    main()
