"""One configurable U-Net (Ho et al. 2020, with the improvements of Nichol & Dhariwal 2021)
and the named presets birdgen ships.

Layout: an optional space-to-depth stem, `len(channels)` levels of residual blocks
(self-attention where the feature map is one of `attention_resolutions` pixels wide),
a middle block, then the mirror path that consumes one skip connection per block.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .utils import check_field_types

TIME_CONDITIONING = ("every_block", "input")


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 64  # pixels, square
    in_channels: int = 3
    channels: tuple[int, ...] = (64, 128, 128)  # feature channels per level
    blocks_per_level: int = 1
    attention_resolutions: tuple[int, ...] = (8,)  # feature-map widths with self-attention; () = none
    head_channels: int = 32  # channels per attention head
    stem_factor: int = 2  # 1 = plain conv stem; 2 = pixel-unshuffle, so level 0 runs at half size
    time_conditioning: str = "every_block"  # or "input": embedding concatenated to the stem only
    time_embedding_channels: int = 128
    dropout: float = 0.0
    num_classes: int = 0  # species the network is conditioned on; 0 = unconditional

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if not self.channels or min(self.channels) < 8:
            raise ValueError(f"channels {self.channels}: need at least one level of at least 8 channels")
        if self.blocks_per_level < 1:
            raise ValueError(f"blocks_per_level {self.blocks_per_level} must be at least 1")
        if self.time_conditioning not in TIME_CONDITIONING:
            raise ValueError(f"time_conditioning {self.time_conditioning!r}: choose one of {TIME_CONDITIONING}")
        if self.stem_factor not in (1, 2, 4):
            raise ValueError(f"stem_factor {self.stem_factor} must be 1, 2 or 4")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout {self.dropout} out of range [0, 1)")
        if self.num_classes < 0:
            raise ValueError(f"num_classes {self.num_classes} must not be negative")
        divisor = self.downsampling_factor
        if self.image_size % divisor:
            raise ValueError(f"image size {self.image_size} is not divisible by the U-Net's total "
                             f"downsampling factor {divisor}")

    @property
    def downsampling_factor(self) -> int:
        return self.stem_factor * 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown U-Net config keys: {', '.join(unknown)}")
        check_field_types(cls, values)
        return cls(**values)


PRESETS: dict[str, UNetConfig] = {
    # The original report's large model: attention at 16x16 and 8x8, timestep in every block.
    "baseline": UNetConfig(channels=(128, 256, 256, 256), blocks_per_level=2, attention_resolutions=(16, 8),
                           stem_factor=1, time_embedding_channels=512, dropout=0.1),
    # The Keras DDIM example's shape: few channels, no attention, the timestep embedding
    # concatenated to the input only, a skip connection from every block.
    "keras": UNetConfig(channels=(32, 64, 96, 128), blocks_per_level=2, attention_resolutions=(),
                        stem_factor=1, time_conditioning="input", time_embedding_channels=32),
    "keras-attn": UNetConfig(channels=(32, 64, 96, 128), blocks_per_level=2, attention_resolutions=(8,),
                             stem_factor=1, time_conditioning="input", time_embedding_channels=32),
    # What learns fastest per CPU-second (see README): a pixel-unshuffle stem puts the first
    # level at 32x32; attention only at 8x8, where it is cheap.
    "small": UNetConfig(channels=(64, 128, 128), blocks_per_level=1, attention_resolutions=(), stem_factor=2),
    "small-attn": UNetConfig(channels=(64, 128, 128), blocks_per_level=1, attention_resolutions=(8,),
                             stem_factor=2),
}


def preset(name: str, **overrides) -> UNetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = PRESETS[name].to_dict()
    values.update(overrides)
    return UNetConfig(**values)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, sec. 3.5)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """Up to 32 groups of at least 4 channels; the largest such count that divides `channels`, so
    that any channel widths work (48 + 96 = 144 channels after a skip concatenation: 24 groups)."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, embedding_channels: int | None, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(embedding_channels, out_channels) if embedding_channels else None
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time is not None:
            h = h + self.time(embedding)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (b, heads, hw, c/heads)
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class Block(nn.Module):
    """A residual block, followed by self-attention where the level asks for it."""

    def __init__(self, in_channels, out_channels, embedding_channels, dropout, attention, head_channels):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, embedding_channels, dropout)
        self.attention = SelfAttention(out_channels, head_channels) if attention else None

    def forward(self, x, embedding):
        x = self.res(x, embedding)
        return self.attention(x) if self.attention is not None else x


class UNet(nn.Module):
    """Predicts the network output (noise or velocity) for images x_t at timesteps t."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        emb = c.time_embedding_channels
        every_block = c.time_conditioning == "every_block"
        block_emb = 4 * emb if every_block else None
        if every_block:
            self.time_mlp = nn.Sequential(nn.Linear(emb, 4 * emb), nn.SiLU(), nn.Linear(4 * emb, 4 * emb))
        if c.num_classes:
            # One row per species and a last one for "no species" (classifier-free guidance);
            # zero at the start, so a conditional network starts as the unconditional one.
            self.class_embedding = nn.Embedding(c.num_classes + 1, block_emb or emb)
            nn.init.zeros_(self.class_embedding.weight)
        stem_in = c.in_channels * c.stem_factor ** 2
        self.stem = nn.Conv2d(stem_in, c.channels[0], 3, padding=1)
        first = c.channels[0] + (0 if every_block else emb)

        resolution = c.image_size // c.stem_factor
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_channels = [first]
        current = first
        for level, width in enumerate(c.channels):
            attention = resolution in c.attention_resolutions
            for _ in range(c.blocks_per_level):
                self.down.append(Block(current, width, block_emb, c.dropout, attention, c.head_channels))
                current = width
                skip_channels.append(current)
            if level < len(c.channels) - 1:
                self.downsample.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
                skip_channels.append(current)
                resolution //= 2
        mid_attention = bool(c.attention_resolutions)
        self.mid = nn.ModuleList([
            Block(current, current, block_emb, c.dropout, mid_attention, c.head_channels),
            Block(current, current, block_emb, c.dropout, False, c.head_channels),
        ])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, width in reversed(list(enumerate(c.channels))):
            attention = resolution in c.attention_resolutions
            for _ in range(c.blocks_per_level + 1):
                self.up.append(Block(current + skip_channels.pop(), width, block_emb, c.dropout, attention,
                                     c.head_channels))
                current = width
            if level > 0:
                self.upsample.append(nn.Conv2d(current, current, 3, padding=1))
                resolution *= 2
        self.out_norm = group_norm(current)
        self.out = nn.Conv2d(current, c.in_channels * c.stem_factor ** 2, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def null_class(self) -> int:
        """The "no species" index of the class embedding."""
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """`labels`: class indices 0 … num_classes (the last means "no species"), or float weights
        (N, num_classes + 1) that mix the classes' embeddings (to move between species); None = no
        species. An unconditional network ignores them."""
        c = self.config
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        embedding = timestep_embedding(t, c.time_embedding_channels).to(x.dtype)
        if c.stem_factor > 1:
            x = F.pixel_unshuffle(x, c.stem_factor)
        h = self.stem(x)
        if c.time_conditioning == "every_block":
            embedding = self.time_mlp(embedding)
        if c.num_classes:
            if labels is None:
                labels = torch.full((x.shape[0],), self.null_class, device=x.device, dtype=torch.long)
            if labels.is_floating_point():
                class_embedding = labels.to(self.class_embedding.weight.dtype) @ self.class_embedding.weight
            else:
                class_embedding = self.class_embedding(labels)
            embedding = embedding + class_embedding.to(embedding.dtype)  # ADM-style: e(t) + e(y)
        if c.time_conditioning != "every_block":
            h = torch.cat([h, embedding[:, :, None, None].expand(-1, -1, *h.shape[2:]).to(h.dtype)], dim=1)
            embedding = None
        skips = [h]
        blocks = iter(self.down)
        for level in range(len(c.channels)):
            for _ in range(c.blocks_per_level):
                h = next(blocks)(h, embedding)
                skips.append(h)
            if level < len(c.channels) - 1:
                h = self.downsample[level](h)
                skips.append(h)
        for block in self.mid:
            h = block(h, embedding)
        blocks = iter(self.up)
        for level in range(len(c.channels)):
            for _ in range(c.blocks_per_level + 1):
                h = next(blocks)(torch.cat([h, skips.pop()], dim=1), embedding)
            if level < len(c.channels) - 1:
                h = self.upsample[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.out(F.silu(self.out_norm(h)))
        if c.stem_factor > 1:
            h = F.pixel_shuffle(h, c.stem_factor)
        return h


# What a fine-tune may hold fixed (TrainConfig.freeze): "outer", the first level (the widest
# feature maps: stem, its down and up blocks, the output), or "convolutions", every
# convolution, so that only the conditioning path (timestep MLP, the blocks' embedding
# projections, the class embedding) and the norms learn, and no convolution needs a weight
# gradient.
FREEZABLE = ("none", "outer", "convolutions")
# How the Train page names them: what learns.
FREEZE_LABELS = {"convolutions": "the conditioning only (convolutions frozen; fastest)",
                 "outer": "all but the widest level", "none": "every weight"}


def frozen_parameters(model: UNet, part: str) -> list[nn.Parameter]:
    """The parameters that `part` (one of FREEZABLE) holds fixed."""
    if part not in FREEZABLE:
        raise ValueError(f"freeze {part!r}: choose one of {', '.join(FREEZABLE)}")
    if part == "none":
        return []
    if part == "convolutions":
        return [p for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()]
    per_level = model.config.blocks_per_level
    outer = [model.stem, *model.down[:per_level], *model.up[-(per_level + 1):], model.out_norm, model.out]
    return [p for module in outer for p in module.parameters()]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
