"""birdgen: denoising diffusion models that generate 64x64 birds from CUB-200-2011."""

__version__ = "0.1.0"
