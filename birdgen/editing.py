"""Beyond sampling from noise: interpolation between seeds, variations and image-to-image
(SDEdit), and inpainting (RePaint), all on a trained model with the existing samplers and
all as step generators, like `pipeline.generation_steps`.

Pictures come in as bytes (an upload) and are checked before any pixel is decoded; nothing
is written to disk.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .model_folder import BirdModel
from .images import to_model_range
from .guidance import GUIDE_WEIGHT_RANGE, SPECIES_WEIGHT_RANGE, GuidanceError, check_weight
from .pipeline import check_student_sampler
from .species import require_species_model
from .samplers import DDIMSampler, Sampler, SamplerStep, initial_noise, make_sampler

MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to 120 MB; more is refused before decoding
MAX_BYTES = 50 * 2**20
PICTURE_FORMATS = ("PNG", "JPEG")
MASKS = ("centre", "left", "right", "top", "bottom")


class EditError(ValueError):
    """A picture, mask or setting that editing cannot use; the message says why in one line."""


# --- Pictures in --------------------------------------------------------------------------

def load_picture(data: bytes, size: int, name: str = "picture", max_bytes: int | None = None) -> torch.Tensor:
    """An uploaded PNG or JPEG as a (1, 3, size, size) image in model range: EXIF rotation
    applied, transparency flattened onto white, 16-bit and CMYK converted, the centre square
    cut and resized with an antialiasing filter."""
    max_bytes = MAX_BYTES if max_bytes is None else min(max_bytes, MAX_BYTES)
    if not data:
        raise EditError(f"{name}: the file is empty")
    if len(data) > max_bytes:
        raise EditError(f"{name}: {len(data) / 2**20:.1f} MB is too large (at most {max_bytes / 2**20:g} MB)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by our own limit
            image = Image.open(io.BytesIO(data), formats=PICTURE_FORMATS)
        with image:
            width, height = image.size
            if width * height > MAX_PIXELS:  # checked before decoding: a small file can hold a huge picture
                raise EditError(f"{name}: {width}×{height} pixels is too large (at most {MAX_PIXELS // 10**6}"
                                " megapixels)")
            image.load()
            rgb = to_rgb(ImageOps.exif_transpose(image))
    except EditError:
        raise
    except UnidentifiedImageError:
        raise EditError(f"{name}: not a PNG or JPEG picture") from None
    except Image.DecompressionBombError:
        raise EditError(f"{name}: too large (at most {MAX_PIXELS // 10**6} megapixels)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise EditError(f"{name}: truncated or corrupt picture ({str(error).splitlines()[0]})") from None
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    square = rgb.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
    return to_model_range(torch.from_numpy(np.asarray(square, dtype=np.uint8).copy())[None])


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL decodes PNG and JPEG to."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float greyscale: scale to 8 bits
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, "white")
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


# --- Interpolation -----------------------------------------------------------------------

def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985), which keeps Gaussian noise at the norm the
    model expects, unlike a straight line through the middle of the sphere."""
    if weight == 0:
        return a.clone()
    if weight == 1:
        return b.clone()
    cos = torch.sum(a * b) / (a.norm() * b.norm())
    angle = torch.arccos(cos.clamp(-1, 1))
    if angle.abs() < 1e-6:
        return (1 - weight) * a + weight * b
    return (torch.sin((1 - weight) * angle) * a + torch.sin(weight * angle) * b) / torch.sin(angle)


def interpolation_noise(model: BirdModel, seed_a: int, seed_b: int, frames: int) -> torch.Tensor:
    """x_T for `frames` images from seed_a's noise to seed_b's (both ends included)."""
    if not 2 <= frames <= 64:
        raise EditError(f"frames {frames} out of range [2, 64]")
    size, channels = model.network_config.image_size, model.network_config.in_channels
    a = initial_noise(1, size, seed_a, model.device, channels)[0]
    b = initial_noise(1, size, seed_b, model.device, channels)[0]
    return torch.cat([slerp(a, b, i / (frames - 1)) for i in range(frames)])


def species_weights(model: BirdModel, species_a: int, species_b: int, frames: int) -> torch.Tensor:
    """Class weights (frames, num_classes + 1) moving linearly from species_a to species_b."""
    classes = model.network_config.num_classes
    for index in (species_a, species_b):
        if not 0 <= index < classes:
            raise EditError(f"species index {index} out of range [0, {classes})")
    weights = torch.zeros(frames, classes + 1, device=model.device)
    blend = torch.linspace(0, 1, frames, device=model.device)
    weights[:, species_a] += 1 - blend
    weights[:, species_b] += blend
    return weights


def interpolation_steps(model: BirdModel, seed_a: int, seed_b: int, frames: int = 9, steps: int = 50,
                        species: tuple[int, int] | None = None, guidance: float | None = None,
                        guide_weight: float | None = None, interval: tuple[int, int] | None = None
                        ) -> Iterator[SamplerStep]:
    """Deterministic DDIM from each interpolated x_T, so the first and last frames are exactly
    the two seeds' own DDIM samples. For a species model, `species` (two class indices) also
    moves the species label from the first to the second by mixing their class embeddings,
    guided with `guidance`; with seed_a == seed_b only the species changes. `guide_weight` and
    `interval`: autoguidance, as in `GenerationRequest` (None: the model's defaults)."""
    noise = interpolation_noise(model, seed_a, seed_b, frames)
    labels = None
    if species is not None:
        require_species_model(model)
        labels = species_weights(model, *species, frames)
    check_student_sampler(model, "ddim", steps)
    denoiser = model.denoiser(labels, model.resolve_guidance(guidance, guide_weight, interval))
    yield from DDIMSampler(model.schedule, steps, eta=0.0).steps(denoiser, noise)


# --- SDEdit: variations and image-to-image -------------------------------------------------

def final_steps(sampler: Sampler, count: int) -> Sampler:
    """The same sampler, visiting only its last `count` timesteps (the least noisy ones)."""
    shortened = copy.copy(sampler)
    shortened.timesteps = sampler.timesteps[len(sampler.timesteps) - count:]
    shortened.num_steps = count
    return shortened


@dataclass
class EditRequest:
    sampler: str = "ddim"
    steps: int = 50  # of the whole schedule; strength decides how many of them run
    strength: float = 0.6  # 0 returns the input, 1 ignores it
    num_images: int = 8
    seed: int = 0
    eta: float = 0.0
    species: int | None = None  # a species model's class index: turn the picture into that species
    guidance: float | None = None  # species guidance with species; None: the model's default
    guide_weight: float | None = None  # autoguidance w; None: the model's default, 1: off
    interval: tuple[int, int] | None = None  # timesteps where guidance applies; None: the model's

    @property
    def steps_run(self) -> int:
        """The steps SDEdit takes: `strength` of `steps` (strength 0: one step, the input unchanged)."""
        return max(1, round(self.strength * self.steps))

    def validate(self) -> None:
        if not 0 <= self.strength <= 1:
            raise EditError(f"strength {self.strength} out of range [0, 1]")
        if not 1 <= self.num_images <= 64:
            raise EditError(f"number of images {self.num_images} out of range [1, 64]")
        if not 0 <= self.seed < 2**63:
            raise EditError(f"seed {self.seed} out of range [0, 2^63)")
        try:
            for name, value, bounds in (("guidance", self.guidance, SPECIES_WEIGHT_RANGE),
                                        ("guide weight", self.guide_weight, GUIDE_WEIGHT_RANGE)):
                if value is not None:
                    check_weight(name, value, bounds)
        except GuidanceError as error:
            raise EditError(str(error)) from None


def sdedit_steps(model: BirdModel, image: torch.Tensor, request: EditRequest) -> Iterator[SamplerStep]:
    """SDEdit (Meng et al. 2022): noise the input to the timestep that `strength` of the
    sampler's steps start from, x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, then denoise. Every
    image gets its own noise, so the results are variations of the input. Strength 0 yields
    the input unchanged in one step without the network; strength 1 starts from pure noise."""
    request.validate()
    labels = None
    if request.species is not None:
        require_species_model(model)
        labels = torch.full((request.num_images,), request.species, device=model.device)
    check_student_sampler(model, request.sampler, request.steps, request.eta)
    sampler = make_sampler(request.sampler, model.schedule, request.steps, eta=request.eta)
    size, channels = model.network_config.image_size, model.network_config.in_channels
    noise, generator = initial_noise(request.num_images, size, request.seed, model.device, channels)
    x0 = image.to(model.device).expand(request.num_images, -1, -1, -1)
    count = round(request.strength * sampler.num_steps)  # request.steps_run, but 0 where the network never runs
    if count == 0:
        yield SamplerStep(0, 1, 0, x0.clone(), x0.clone())
        return
    shortened = final_steps(sampler, count)
    start = shortened.timesteps[0]
    if request.strength >= 1:
        x_t = noise
    else:
        x_t = model.schedule.add_noise(x0, noise, torch.full((request.num_images,), start, device=model.device))
    guidance = model.resolve_guidance(request.guidance, request.guide_weight, request.interval)
    yield from shortened.steps(model.denoiser(labels, guidance), x_t, generator)


# --- RePaint: inpainting --------------------------------------------------------------------

def make_mask(kind: str, size: int, box: tuple[float, float, float, float] | None = None) -> torch.Tensor:
    """A (1, 1, size, size) mask, 1 where pixels are kept and 0 where they are regenerated.
    `kind`: centre (the middle half), left, right, top or bottom (that half regenerated), or
    box with `box` = (left, top, right, bottom) as fractions of the side."""
    mask = torch.ones(1, 1, size, size)
    half, quarter = size // 2, size // 4
    regions = {"centre": (quarter, quarter, size - quarter, size - quarter), "left": (0, 0, half, size),
               "right": (half, 0, size, size), "top": (0, 0, size, half), "bottom": (0, half, size, size)}
    if kind == "box":
        if box is None or len(box) != 4:
            raise EditError("a box mask needs four fractions: left, top, right, bottom")
        left, top, right, bottom = box
        if not 0 <= left < right <= 1 or not 0 <= top < bottom <= 1:
            raise EditError(f"box {tuple(box)}: need 0 ≤ left < right ≤ 1 and 0 ≤ top < bottom ≤ 1")
        region = (math.floor(left * size), math.floor(top * size), math.ceil(right * size), math.ceil(bottom * size))
    elif kind in regions:
        region = regions[kind]
    else:
        raise EditError(f"unknown mask {kind!r}; choose one of {', '.join(MASKS)} or box")
    x0, y0, x1, y1 = region
    mask[..., y0:y1, x0:x1] = 0
    return mask


def repaint_evaluations(num_steps: int, resample: int) -> int:
    """Network evaluations of RePaint: every step `resample` times but the last, never repeated."""
    return (num_steps - 1) * resample + 1


def hole_preview(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The picture with the region to repaint (mask 0) in magenta."""
    magenta = torch.tensor([1.0, -1.0, 1.0], device=image.device).view(1, 3, 1, 1)
    return image * mask.to(image.device) + (1 - mask.to(image.device)) * magenta


class RePaintSampler(Sampler):
    """RePaint (Lugmayr et al. 2022, Algorithm 1) on the ancestral DDPM update, full or
    respaced. Each step merges the known pixels, noised to the step's level with
    q(x_t | x_0), with the model's update of the unknown ones:
    x_prev = m * (sqrt(ab_prev) x_known + sqrt(1 - ab_prev) eps) + (1 - m) * x_prev_model.
    With `resample` r > 1, every step but the last is repeated r times, going back one step
    with q(x_t | x_prev) = N(sqrt(1 - beta) x_prev, beta I) in between, which lets the
    regenerated region agree with the kept one. The last step lands on x_0 and keeps the
    known pixels exactly.

    Args:
        known: (N or 1, C, H, W) image in model range whose pixels where mask = 1 are kept.
        mask: (1 or N, 1, H, W), 1 = keep, 0 = regenerate.
        resample: r, 1 … 20 (RePaint used 10 with 250 steps).
    """

    name = "repaint"

    def __init__(self, schedule, num_steps: int, known: torch.Tensor, mask: torch.Tensor, resample: int = 1,
                 **options):
        super().__init__(schedule, num_steps, **options)
        if not 1 <= resample <= 20:
            raise EditError(f"resample {resample} out of range [1, 20]")
        self.known, self.mask, self.resample = known, mask, resample
        self.evaluations = repaint_evaluations(num_steps, resample)

    def steps(self, denoiser, noise, generator=None):
        x, index = noise, 0
        known, mask = self.known.to(noise.device), self.mask.to(noise.device)
        for i, t in enumerate(self.timesteps):
            ab_t, ab_prev = self.alpha_bar(i), self.alpha_bar(i + 1)
            beta = 1 - ab_t / ab_prev
            repeats = 1 if i == self.num_steps - 1 else self.resample
            for repeat in range(repeats):
                x0, _ = self.denoise(denoiser, x, t, ab_t)
                mean = ((math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0
                        + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)) * x)
                variance = beta * (1 - ab_prev) / (1 - ab_t)
                unknown = mean + math.sqrt(variance) * self._noise(x, generator) if variance > 0 else mean
                known_prev = math.sqrt(ab_prev) * known + math.sqrt(1 - ab_prev) * self._noise(x, generator) \
                    if ab_prev < 1 else known.expand_as(x)
                x = mask * known_prev + (1 - mask) * unknown
                yield SamplerStep(index, self.evaluations, t, x, mask * known + (1 - mask) * x0)
                index += 1
                if repeat < repeats - 1:  # back to t: q(x_t | x_prev)
                    x = math.sqrt(1 - beta) * x + math.sqrt(beta) * self._noise(x, generator)

    @staticmethod
    def _noise(like: torch.Tensor, generator) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def inpaint_steps(model: BirdModel, image: torch.Tensor, mask: torch.Tensor, steps: int = 50, resample: int = 1,
                  num_images: int = 4, seed: int = 0, guide_weight: float | None = None,
                  interval: tuple[int, int] | None = None) -> Iterator[SamplerStep]:
    """Regenerates the masked part of `image` (num_images different fillings); `guide_weight`
    and `interval` as in `GenerationRequest`."""
    if not 1 <= num_images <= 64:
        raise EditError(f"number of images {num_images} out of range [1, 64]")
    if model.sampling is not None:
        raise EditError(f"{model.name} is a distilled student: RePaint needs the many ancestral DDPM steps it was"
                        " not distilled for; inpaint with its teacher")
    size, channels = model.network_config.image_size, model.network_config.in_channels
    if tuple(image.shape[-2:]) != (size, size) or tuple(mask.shape[-2:]) != (size, size):
        raise EditError(f"image and mask must be {size}×{size} for this model")
    noise, generator = initial_noise(num_images, size, seed, model.device, channels)
    sampler = RePaintSampler(model.schedule, steps, image.to(model.device), mask.to(model.device), resample)
    guidance = model.resolve_guidance(guide_weight=guide_weight, interval=interval)
    yield from sampler.steps(model.denoiser(guidance=guidance), noise, generator)
