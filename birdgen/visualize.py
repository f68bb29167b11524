"""Pictures of the diffusion process: forward noising, the reverse chain, GIFs."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from .model_folder import BirdModel
from .images import grid_image, to_uint8
from .diffusion import NoiseSchedule
from .pipeline import GenerationRequest, generation_steps
from .samplers import SamplerStep, initial_noise, run_steps


def forward_frames(schedule: NoiseSchedule, x0: torch.Tensor, timesteps, seed: int = 0) -> list[Image.Image]:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps for each t, with one fixed eps, as grids."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    frames = []
    for t in timesteps:
        x_t = schedule.add_noise(x0, noise, torch.full((len(x0),), int(t), dtype=torch.long))
        frames.append(grid_image(x_t))
    return frames


def signal_and_noise(schedule: NoiseSchedule) -> dict[str, np.ndarray]:
    """Per-step signal and noise scales (sqrt(ab_t), sqrt(1 - ab_t)) and log10 SNR, for plotting."""
    alpha_bar = schedule.alpha_bar64.numpy()
    return {"signal": np.sqrt(alpha_bar), "noise": np.sqrt(1 - alpha_bar), "log10_snr": np.log10(alpha_bar / (1 - alpha_bar))}


@dataclass
class ReverseChain:
    """Every step of one sampler run, stored compactly as uint8 NHWC."""

    timesteps: list[int] = field(default_factory=list)
    samples: list[torch.Tensor] = field(default_factory=list)  # x after each step
    predictions: list[torch.Tensor] = field(default_factory=list)  # predicted x_0 at each step
    noise: torch.Tensor | None = None  # x_T

    def __len__(self) -> int:
        return len(self.timesteps)

    def frame(self, index: int, show_prediction: bool = True) -> Image.Image:
        """x_t (left) beside the predicted x_0 (right) after step `index`."""
        left = grid_image(self.samples[index], padding=2)
        if not show_prediction:
            return left
        right = grid_image(self.predictions[index], padding=2)
        canvas = Image.new("RGB", (left.width + right.width + 8, left.height), "white")
        canvas.paste(left, (0, 0))
        canvas.paste(right, (left.width + 8, 0))
        return canvas

    def strip(self, every: int | None = None, row: int = 0, count: int = 10) -> Image.Image:
        """One image's chain from pure noise to the final bird: x_T, then the sample at every
        `every`-th training timestep (with DDPM at 1000 steps and every=100: the report's
        figure), or at `count` evenly spaced steps."""
        if every:
            picks = [i for i, t in enumerate(self.timesteps) if t % every == 0 or i == len(self) - 1]
        else:
            picks = evenly_spaced(len(self), count)
        columns = [to_uint8(self.noise[row:row + 1])[0]] + [self.samples[i][row] for i in picks]
        labels = [f"t={self.timesteps[0] + 1}"] + [f"t={self.timesteps[i]}" for i in picks]
        size = columns[0].shape[0]
        canvas = Image.new("RGB", (len(columns) * (size + 4), size + 16), "white")
        draw = ImageDraw.Draw(canvas)
        for index, (pixels, label) in enumerate(zip(columns, labels)):
            canvas.paste(Image.fromarray(pixels.numpy()), (index * (size + 4), 0))
            draw.text((index * (size + 4) + 2, size + 2), label, fill="black")
        return canvas


def record_chain(model: BirdModel, request: GenerationRequest, on_step=None) -> ReverseChain:
    """Runs a sampler and keeps every step; `on_step(step)` can drive a progress bar."""
    noise, _ = initial_noise(request.num_images, model.network_config.image_size, request.seed, model.device,
                             model.network_config.in_channels)
    chain = ReverseChain(noise=noise.cpu())

    def keep(step: SamplerStep) -> None:
        chain.timesteps.append(step.t)
        chain.samples.append(to_uint8(step.x))
        chain.predictions.append(to_uint8(step.x0))
        if on_step is not None:
            on_step(step)

    run_steps(generation_steps(model, request, noise), keep)
    return chain


def to_gif(frames: list[Image.Image], seconds_per_frame: float = 0.08, hold_last_s: float = 1.5) -> bytes:
    """An endlessly looping GIF of the frames, holding the last one a little longer."""
    durations = [int(seconds_per_frame * 1000)] * (len(frames) - 1) + [int(hold_last_s * 1000)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return buffer.getvalue()


def interpolation_gif(images: torch.Tensor, size: int = 256) -> bytes:
    """Interpolation frames (model range) as a GIF that plays forth and back, each frame `size` px."""
    frames = enlarged(images, size)
    return to_gif(frames + frames[-2:0:-1], seconds_per_frame=0.15, hold_last_s=0.15)


def enlarged(images: torch.Tensor, size: int = 256) -> list[Image.Image]:
    return [grid_image(image[None], padding=0).resize((size, size)) for image in images]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def evenly_spaced(count: int, limit: int) -> list[int]:
    """At most `limit` indices spread over range(count), always including the last."""
    if count <= limit:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, limit).round().astype(int).tolist()))
