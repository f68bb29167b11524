"""Sampling throughput. On the same network weights: birdgen's DDIM (50 steps) and
DPM-Solver++ (20 steps) versus diffusers' DDIMScheduler and DPMSolverMultistepScheduler
stepping that network in the loop of diffusers' pipelines. And what a user would pick
instead: diffusers' DDIMPipeline with a UNet2DModel of the same parameter count. Run:
python benchmarks/sampling_throughput.py [--model models/small-attn]"""

from __future__ import annotations

import argparse

import torch

from common import alternate, machine, save
from train_throughput import diffusers_unet

from birdgen.model_folder import build_model, load_model
from birdgen.diffusion import DiffusionConfig
from birdgen.networks import parameter_count, preset
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
    from diffusers import DDIMPipeline, DDIMScheduler, DPMSolverMultistepScheduler

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
    pipeline = DDIMPipeline(unet=diffusers_unet(parameter_count(model.network)).eval(),
                            scheduler=DDIMScheduler(**common, clip_sample=True, set_alpha_to_one=True))
    pipeline.set_progress_bar_config(disable=True)
    noise, _ = initial_noise(BATCH, model.network_config.image_size, seed=0)
    schedule, denoiser = model.schedule, model.denoiser()
    contenders = {
        "birdgen ddim-50": lambda: run_to_end(make_sampler("ddim", schedule, 50), denoiser, noise),
        "diffusers ddim-50": lambda: diffusers_loop(model, ddim, 50, noise),
        "birdgen dpmpp-20": lambda: run_to_end(make_sampler("dpmpp", schedule, 20), denoiser, noise),
        "diffusers dpmpp-20": lambda: diffusers_loop(model, dpm, 20, noise),
        "diffusers DDIMPipeline, UNet2DModel of equal size, ddim-50": lambda: pipeline(
            batch_size=BATCH, num_inference_steps=50, generator=torch.Generator().manual_seed(0), output_type="np"),
    }
    description = machine()
    speed = alternate(contenders, args.rounds, BATCH)
    save("sampling_throughput", {
        "machine": description, "model": model.name, "batch": BATCH, "images_per_s": speed,
        "ratio_ddim": speed["birdgen ddim-50"] / speed["diffusers ddim-50"],
        "ratio_dpmpp": speed["birdgen dpmpp-20"] / speed["diffusers dpmpp-20"],
        "ratio_ddim_vs_ddim_pipeline_equal_size": speed["birdgen ddim-50"]
        / speed["diffusers DDIMPipeline, UNet2DModel of equal size, ddim-50"],
        "parameters": {"birdgen": parameter_count(model.network),
                       "diffusers UNet2DModel": parameter_count(pipeline.unet)},
    })


if __name__ == "__main__":
    main()
