"""Training throughput: birdgen's training step versus a plain diffusers training loop
(UNet2DModel + DDPMScheduler + AdamW + EMAModel, as in diffusers' unconditional training
example) at 64x64 and batch 32, plus birdgen's step driving the very same diffusers UNet
(to separate trainer overhead from network speed). Run: python benchmarks/train_throughput.py"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from common import REAL_CUB, RssPeak, alternate, machine, peak_rss_mb_in_child, save

from birdgen.data import load_crops, random_flip
from birdgen.images import to_model_range
from birdgen.diffusion import DiffusionConfig, DiffusionLoss, NoiseSchedule
from birdgen.networks import UNet, parameter_count, preset
from birdgen.loop import EMA, draw_batch
from birdgen.run_folder import BatchStream

BATCH = 32


def diffusers_unet(target_params: int):
    """A UNet2DModel (channels c, 2c, 3c, 4c; one block per level; no attention) whose
    parameter count is closest to target_params."""
    from diffusers import UNet2DModel

    def build(c):
        return UNet2DModel(sample_size=64, in_channels=3, out_channels=3, layers_per_block=1,
                           block_out_channels=(c, 2 * c, 3 * c, 4 * c), norm_num_groups=math.gcd(c, 32),
                           down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4)

    best = min(range(16, 80, 4), key=lambda c: abs(sum(p.numel() for p in build(c).parameters()) - target_params))
    return build(best)


class DiffusersAsBirdgen(torch.nn.Module):
    """Lets birdgen's loss call a diffusers UNet: (x_t, t) -> prediction."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t).sample


def birdgen_step_fn(network, images, schedule):
    network = network.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-4)
    ema = EMA(network, 0.999)
    loss_fn = DiffusionLoss(schedule)
    stream = BatchStream(len(images), BATCH, seed=0)
    generator = torch.Generator().manual_seed(1)
    state = {"step": 0}

    def step():
        x0, t, noise, _ = draw_batch(images, stream, generator, schedule.num_steps)
        loss = loss_fn(network, x0, t, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(network, state["step"])
        state["step"] += 1

    return step


def diffusers_step_fn(unet, images, batch: int = BATCH, device="cpu", bf16: bool = False):
    """The loop body of diffusers' train_unconditional.py, minus Accelerate (whose bf16 mixed
    precision is autocast, as `bf16` gives it), with the example's per-step loss read."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    unet = unet.to(device).train()
    images = images.to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-4)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, 500, 100_000)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
    order = torch.randperm(len(images), device=device)
    state = {"position": 0}

    def step():
        index = order[state["position"]:state["position"] + batch]
        state["position"] = (state["position"] + batch) % (len(images) - batch)
        clean = random_flip(to_model_range(images[index]), torch.Generator(device).manual_seed(state["position"]))
        noise = torch.randn(clean.shape, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(unet(noisy, timesteps).sample.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        return loss.item()

    return step


def build(which: str, images):
    schedule = NoiseSchedule(DiffusionConfig())
    torch.manual_seed(0)
    ours = UNet(preset("small"))
    if which == "birdgen":
        return birdgen_step_fn(ours, images, schedule), parameter_count(ours)
    unet = diffusers_unet(parameter_count(ours))
    if which == "diffusers":
        return diffusers_step_fn(unet, images), parameter_count(unet)
    return birdgen_step_fn(DiffusersAsBirdgen(unet), images, schedule), parameter_count(unet)


def images_tensor():
    if not (REAL_CUB / "images.txt").is_file():
        sys.exit(f"needs the real crops at {REAL_CUB}")
    return torch.from_numpy(load_crops(REAL_CUB, progress=False).images)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--memory-of", choices=("birdgen", "diffusers", "birdgen+diffusers-unet"))
    args = parser.parse_args()
    images = images_tensor()
    if args.memory_of:  # child process: peak RSS growth over building the model and 3 steps
        with RssPeak() as peak:
            step, _ = build(args.memory_of, images)
            for _ in range(3):
                step()
        print(peak.growth_mb)
        return
    contenders, params = {}, {}
    for name in ("birdgen", "diffusers", "birdgen+diffusers-unet"):
        step, params[name] = build(name, images)
        contenders[name] = lambda step=step: [step() for _ in range(args.steps_per_round)]
    description = machine()
    speed = alternate(contenders, args.rounds, BATCH * args.steps_per_round)
    memory = {name: peak_rss_mb_in_child(__file__, "--memory-of", name) for name in contenders}
    save("train_throughput", {
        "machine": description, "batch": BATCH, "image_size": 64,
        "images_per_s": speed, "parameters": params, "peak_memory_growth_mb": memory,
        "ratio_birdgen_vs_diffusers": speed["birdgen"] / speed["diffusers"],
        "ratio_trainer_only": speed["birdgen+diffusers-unet"] / speed["diffusers"],
    })


if __name__ == "__main__":
    main()
