"""KID and FID (torchmetrics) between generated birds and real crops.

Features are extracted once per image with one extractor (InceptionV3 pool features, the
torch-fidelity weights that torchmetrics uses) and fed to both metrics; the real crops'
features are cached per dataset settings, so a second evaluation only extracts the
generated images.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from .checkpoint import METRICS_FILE, BirdModel, atomic_write_text
from .data import CubCrops, cache_dir, to_uint8
from .pipeline import GenerationRequest, generate

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_ENV = "BIRDGEN_INCEPTION_WEIGHTS"
KID_SUBSET_SIZE = 1000

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class InceptionWeightsMissing(FileNotFoundError):
    pass


def hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The InceptionV3 weights: an explicit path, $BIRDGEN_INCEPTION_WEIGHTS, or the torch hub cache."""
    candidates = [Path(p) for p in (path, os.environ.get(INCEPTION_ENV)) if p]
    for candidate in candidates:
        if not candidate.is_file():
            raise InceptionWeightsMissing(f"{candidate}: Inception weights file not found")
        return candidate
    if hub_weights_path().is_file():
        return hub_weights_path()
    raise InceptionWeightsMissing(
        f"InceptionV3 weights for KID/FID not found: download {INCEPTION_URL} on a connected machine and put it at"
        f" {hub_weights_path()} (or pass --inception-weights PATH, or set {INCEPTION_ENV})")


class InceptionFeatures(nn.Module):
    """uint8 NCHW images -> 2048 InceptionV3 pool features, exactly as torchmetrics' FID computes them."""

    num_features = 2048

    def __init__(self, weights: Path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(weights))
        self.identity = f"inception-v3-compat:{file_sha256(weights)}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images).reshape(images.shape[0], -1)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class _Precomputed(nn.Module):
    """Lets torchmetrics take features that were extracted once, elsewhere."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@torch.no_grad()
def extract_features(extractor: nn.Module, images_uint8_nhwc: np.ndarray | torch.Tensor, batch_size: int = 64,
                     device="cpu", progress: Progress | None = None, stage: str = "features") -> torch.Tensor:
    images = torch.as_tensor(images_uint8_nhwc)
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].permute(0, 3, 1, 2).contiguous().to(device)
        chunks.append(extractor(batch).double().cpu())
        if progress:
            progress(stage, min(start + batch_size, len(images)), len(images))
    return torch.cat(chunks)


def kid_and_fid(real: torch.Tensor, fake: torch.Tensor, subset_size: int = KID_SUBSET_SIZE, subsets: int = 100,
                seed: int = 0) -> dict:
    """KID (mean, std over random subsets) and FID from two feature matrices (N, D)."""
    dim = real.shape[1]
    size = min(subset_size, len(real), len(fake))
    if size < subset_size:
        warnings.warn(f"KID subset size lowered from {subset_size} to {size} to fit {len(real)} real and"
                      f" {len(fake)} generated images")
    if min(len(real), len(fake)) < dim:
        warnings.warn(f"FID from {min(len(real), len(fake))} images with {dim} feature dimensions: the covariance"
                      " is rank-deficient and FID is biased upwards; compare only runs with the same counts")
    fid = FrechetInceptionDistance(feature=_Precomputed(dim))
    kid = KernelInceptionDistance(feature=_Precomputed(dim), subset_size=size, subsets=subsets)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "kid_subset_size": size, "kid_subsets": subsets}


def real_features(crops: CubCrops, indices: np.ndarray, extractor: nn.Module, identity: str, batch_size: int,
                  device, progress: Progress | None, cache: bool = True) -> torch.Tensor:
    """Features of the real crops, cached by (crop cache, indices, extractor)."""
    key = hashlib.sha256(json.dumps([str(crops.cache_path), indices.tolist(), identity]).encode()).hexdigest()[:20]
    path = cache_dir() / "features" / f"real-{key}.npy"
    if cache and crops.cache_path is not None and path.is_file():
        return torch.from_numpy(np.load(path))
    features = extract_features(extractor, crops.images[indices], batch_size, device, progress, "real images")
    if cache and crops.cache_path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.stem}.tmp{os.getpid()}.npy")
        np.save(temporary, features.numpy())
        os.replace(temporary, path)
    return features


@dataclass
class EvalSettings:
    split: str = "test"  # "test", "train" or "all" of the official split
    num_samples: int = 1000
    sampler: str = "ddim"
    steps: int | None = 50
    eta: float = 0.0
    batch_size: int = 64
    seed: int = 0


def evaluate(model: BirdModel, crops: CubCrops, settings: EvalSettings, extractor: nn.Module, identity: str,
             progress: Progress | None = None) -> dict:
    """Generates settings.num_samples birds and scores them against the real crops."""
    if settings.num_samples < 2:
        raise ValueError(f"num_samples {settings.num_samples} must be at least 2")
    if settings.batch_size < 1:
        raise ValueError(f"batch_size {settings.batch_size} must be at least 1")
    started = time.perf_counter()
    device = model.device
    extractor = extractor.to(device).eval()
    indices = crops.split_indices("official", settings.split)
    real = real_features(crops, indices, extractor, identity, settings.batch_size, device, progress)
    fake_chunks, done = [], 0
    while done < settings.num_samples:
        count = min(settings.batch_size, settings.num_samples - done)
        request = GenerationRequest(settings.sampler, settings.steps, count, settings.seed + done, settings.eta)
        images = generate(model, request).images
        fake_chunks.append(extract_features(extractor, to_uint8(images), settings.batch_size, device))
        done += count
        if progress:
            progress("generated images", done, settings.num_samples)
    scores = kid_and_fid(real, torch.cat(fake_chunks), seed=settings.seed)
    import torchmetrics

    return {**scores, "num_real": len(real), "num_generated": settings.num_samples, **asdict(settings),
            "feature_extractor": identity, "model": model.name, "image_size": model.network_config.image_size,
            "torch": torch.__version__, "torchmetrics": torchmetrics.__version__,
            "wall_time_s": round(time.perf_counter() - started, 1)}


def write_metrics(model: BirdModel, metrics: dict) -> Path:
    path = model.path / METRICS_FILE
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    return path


def add_eval_parser(commands) -> None:
    parser = commands.add_parser("eval", help="KID and FID of a model against the real crops")
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--data", required=True, help="CUB_200_2011 folder")
    parser.add_argument("--split", choices=("test", "train", "all"), default="test")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sampler", choices=("ddpm", "ddim", "dpmpp"), default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--inception-weights", help=f"path to {INCEPTION_FILE} (else ${INCEPTION_ENV} or the torch hub cache)")
    parser.set_defaults(handler=cmd_eval)


def cmd_eval(args) -> int:
    from .checkpoint import load_model
    from .data import load_crops
    from .utils import pick_device

    weights = find_inception_weights(args.inception_weights)  # fail before any work starts
    device = pick_device(args.device)
    model = load_model(args.model, device)
    crops = load_crops(args.data, model.network_config.image_size)
    extractor = InceptionFeatures(weights)
    settings = EvalSettings(args.split, args.num_samples, args.sampler, args.steps, args.eta, args.batch_size, args.seed)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.setdefault(stage, tqdm(total=total, desc=stage.capitalize(), unit="img"))
        bar.update(done - bar.n)

    metrics = evaluate(model, crops, settings, extractor, extractor.identity, progress)
    for bar in bars.values():
        bar.close()
    path = write_metrics(model, metrics) if Path(args.model).is_dir() else None  # never into the Hub cache
    print(f"KID {metrics['kid_mean']:.4f} ± {metrics['kid_std']:.4f}  FID {metrics['fid']:.2f}"
          f"  ({metrics['num_generated']} generated vs {metrics['num_real']} real; wrote {path})")
    return 0
