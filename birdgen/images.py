"""Pixel ranges and image grids: the model's float range [-1, 1] (NCHW) against uint8 pictures
(NHWC), and PNG grids of either. The bottom floor: it imports nothing of birdgen but `utils`."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image

from .utils import atomic_write


def to_model_range(images_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    return images_uint8_nhwc.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-range NCHW images to uint8 NHWC on the CPU."""
    return images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def grid_image(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> Image.Image:
    """Model-range NCHW images (or uint8 NHWC) as one PIL grid, `columns` wide (default: square)."""
    pixels = images if images.dtype == torch.uint8 else to_uint8(images)
    count, height, width, _ = pixels.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = Image.new("RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding), "white")
    for index in range(count):
        row, column = divmod(index, columns)
        canvas.paste(Image.fromarray(pixels[index].numpy()), (padding + column * (width + padding),
                                                               padding + row * (height + padding)))
    return canvas


def save_grid(images: torch.Tensor, path: str | os.PathLike, columns: int | None = None) -> Path:
    """Writes the images as one PNG grid; a single image without the grid's white frame, so that
    it can go straight back in as a picture (e.g. to `birdgen edit`)."""
    grid = grid_image(images, columns, padding=2 if len(images) > 1 else 0)
    return atomic_write(path, "the image", grid.save)  # the format follows the suffix, which the temporary keeps
