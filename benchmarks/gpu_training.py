"""Training speed on one GPU: images/s, TFLOP/s and the share of the chip's bf16 peak for the
`small`, `small-attn` and `baseline` presets, each against the diffusers training loop
(UNet2DModel of about the same parameter count, DDPMScheduler, AdamW, EMAModel, bf16 autocast as
Accelerate's mixed precision gives it) on the same GPU; then peak memory and images/s of
`birdgen train` across batch sizes (the original report's Figures 8-9), plotted.

    python benchmarks/gpu_training.py            # on a GPU: about 3 minutes
    python benchmarks/gpu_training.py --smoke    # on the CPU: checks the script in a minute

birdgen's side is `birdgen train` itself (the sync-free CUDA path, its own data draw, EMA and
logging), run for --steps steps per setting; images/s is the median of its logged intervals
after the first. FLOPs per image of a training step (forward + backward) are counted once per
network with torch.utils.flop_counter. Results: benchmarks/results/gpu_training.json and
gpu_training_batch.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import REAL_CUB, REPO, machine, save
from train_throughput import diffusers_step_fn
from birdgen.data import CropSettings, load_crops
from birdgen.networks import UNet, parameter_count, preset
from birdgen.run_folder import read_metrics
from birdgen.run_config import TrainConfig
from birdgen.train import train

# Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), FLOP/s.
BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}
PRESETS = ("small", "small-attn", "baseline")
# diffusers UNet2DModel shapes per preset: channel multipliers, blocks per level, attention levels.
PEER_SHAPES = {"small": ((1, 2, 3, 4), 1, ()), "small-attn": ((1, 2, 3, 4), 1, (3,)),
               "baseline": ((1, 2, 2, 2), 2, (2, 3))}


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAKS.items() if key in name), None)


def diffusers_unet(name: str, target_params: int, image_size: int):
    """The UNet2DModel of PEER_SHAPES[name] whose parameter count is closest to target_params."""
    from diffusers import UNet2DModel

    multipliers, blocks, attention = PEER_SHAPES[name]

    def build(c):
        down = tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(len(multipliers)))
        up = tuple("AttnUpBlock2D" if len(multipliers) - 1 - i in attention else "UpBlock2D"
                   for i in range(len(multipliers)))
        return UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3, layers_per_block=blocks,
                           block_out_channels=tuple(c * m for m in multipliers), norm_num_groups=math.gcd(c, 32),
                           down_block_types=down, up_block_types=up)

    count = {}
    for c in range(16, 200, 8):
        count[c] = sum(p.numel() for p in build(c).parameters())
        if count[c] > 1.5 * target_params:
            break
    return build(min(count, key=lambda c: abs(count[c] - target_params)))


def flops_per_image(network: torch.nn.Module, image_size: int, device, call) -> float:
    """Forward + backward FLOPs of one training batch of 2, per image."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, image_size, image_size, device=device)
    t = torch.randint(0, 1000, (2,), device=device)
    with FlopCounterMode(display=False) as counter:
        call(network, x, t).float().square().mean().backward()
    network.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def birdgen_speed(preset_name: str, batch: int, steps: int, log_every: int, crops, device, out: Path) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = TrainConfig(data=str(REAL_CUB), preset=preset_name, batch_size=batch, steps=steps, log_every=log_every,
                         checkpoint_every=10 * steps, sample_every=10 * steps, split="random", test_fraction=0.1,
                         prediction="v", min_snr_gamma=5.0, device=str(device), progress=False, keep_checkpoints=1)
    run = out / f"{preset_name}-{batch}"
    train(config, run, overwrite=True, crops=crops)
    speeds = [r["images_per_s"] for r in read_metrics(run)][1:]  # the first interval holds warm-up
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"images_per_s": statistics.median(speeds), "peak_memory_mb": memory}


def diffusers_speed(unet, images: torch.Tensor, batch: int, steps: int, device) -> float:
    """The diffusers example's loop (train_throughput.py's peer) with bf16 autocast, on `device`."""
    step = diffusers_step_fn(unet, images, batch, device, bf16=device.type == "cuda")
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times[len(times) // 4:])


def plot_batches(rows: list[dict], device_name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed_axis, memory_axis) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    for name in sorted({r["preset"] for r in rows}):
        mine = sorted((r["batch"], r["images_per_s"], r["peak_memory_mb"]) for r in rows if r["preset"] == name)
        speed_axis.plot([m[0] for m in mine], [m[1] for m in mine], "o-", label=name)
        if all(m[2] is not None for m in mine):
            memory_axis.plot([m[0] for m in mine], [m[2] / 1024 for m in mine], "o-", label=name)
    for axis, label in ((speed_axis, "training images/s"), (memory_axis, "peak GPU memory, GiB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle(f"birdgen train on {device_name}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny settings on the CPU, to check the script")
    parser.add_argument("--steps", type=int, default=120, help="training steps per setting")
    parser.add_argument("--batch", type=int, default=256, help="batch of the preset comparison")
    parser.add_argument("--batches", default="32,64,128,256,512,1024", help="batch sizes of the sweep (small-attn)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    steps, log_every, batch = (args.steps, 20, args.batch) if not args.smoke else (6, 2, 4)
    batches = [int(b) for b in args.batches.split(",")] if not args.smoke else [2, 4]
    presets = PRESETS if not args.smoke else ("small",)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    crops = load_crops(REAL_CUB, CropSettings(size=64), progress=False)
    images = torch.from_numpy(crops.images)
    peak = bf16_peak(device)
    rows, sweep = [], []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        for name in presets:
            ours = UNet(preset(name)).to(device)
            peer = diffusers_unet(name, parameter_count(ours), 64).to(device)
            flops = {"birdgen": flops_per_image(ours, 64, device, lambda n, x, t: n(x, t)),
                     "diffusers": flops_per_image(peer, 64, device, lambda n, x, t: n(x, t).sample)}
            del ours
            speed = {"birdgen": birdgen_speed(name, batch, steps, log_every, crops, device, out)["images_per_s"],
                     "diffusers": diffusers_speed(peer, images, batch, steps, device)}
            del peer
            for side in ("birdgen", "diffusers"):
                tflops = flops[side] * speed[side] / 1e12
                rows.append({"preset": name, "side": side, "batch": batch, "images_per_s": round(speed[side], 1),
                             "gflop_per_image": round(flops[side] / 1e9, 2), "tflop_per_s": round(tflops, 2),
                             "share_of_bf16_peak": round(tflops * 1e12 / peak, 4) if peak else None})
            print(json.dumps(rows[-2:]), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for size in batches:
            result = birdgen_speed("small-attn" if not args.smoke else "small", size, steps, log_every, crops, device,
                                   out)
            sweep.append({"preset": "small-attn" if not args.smoke else "small", "batch": size, **result})
            print(json.dumps(sweep[-1]), flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    results = {"machine": machine(device), "device": device_name, "bf16_peak_flops": peak, "smoke": args.smoke,
               "steps_per_setting": steps, "presets": rows, "batch_sweep": sweep,
               "ratios_vs_diffusers": {name: round(next(r["images_per_s"] for r in rows if r["preset"] == name
                                                        and r["side"] == "birdgen")
                                                   / next(r["images_per_s"] for r in rows if r["preset"] == name
                                                          and r["side"] == "diffusers"), 2) for name in presets},
               "seconds": round(time.perf_counter() - started, 1)}
    name = "gpu_training" if not args.smoke else "gpu_training_smoke"
    save(name, results)
    plot_batches(sweep, device_name, REPO / "benchmarks" / "results" / f"{name}_batch.png")


if __name__ == "__main__":
    main()
