"""What an FD, KID, precision or recall value means: the same figures between sets of real
crops, real crops made worse, and noise, at the image counts `birdgen eval` reports.

    python benchmarks/metric_calibration.py [--features mobilenet] [--count 1000]

The reference set is the held-out crops of the shipped models' split (random, seed 0, 10%),
as in their metrics.json. Each contender is a set of `--count` images compared with it:
training crops (real vs real: the floor a perfect generator would reach at these counts),
the same crops blurred (Gaussian radius 1 and 2, PIL), the same crops as 16-colour images
(posterized), and uniform noise. A second table compares two disjoint halves of all crops.

A third table calibrates the memorization check: the held-out crops themselves, and the same
crops made worse, judged as if they were samples (distance to the nearest training crop or its
mirror image, in pixels and in features; a near-copy is closer than the other held-out crops'
1st percentile). None of them is a copy, so their rates are what a model that does not copy
gives at that sharpness.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from PIL import Image, ImageFilter

from common import REAL_CUB, REPO, machine, save
from birdgen.model_folder import load_model
from birdgen.data import CropSettings, load_crops, recover_split
from birdgen.evaluation import extract_features, kid_and_fid, precision_recall, real_features
from birdgen.memorization import (NEAR_COPY_PERCENTILE, distances_to_train, heldout_near_copies, pixel_vectors,
                                  pixel_vectors_with_mirrors)
from birdgen.features import choose_feature_space, load_extractor


def degrade(images: np.ndarray, how) -> np.ndarray:
    return np.stack([np.asarray(how(Image.fromarray(image))) for image in images])


def scores(reference: torch.Tensor, contender: torch.Tensor) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figures = {**kid_and_fid(reference, contender), **precision_recall(reference, contender)}
    return {key: round(figures[key], 4) for key in ("fid", "kid_mean", "kid_std", "precision", "recall")}


DEGRADATIONS = {
    "blurred, radius 1": lambda im: im.filter(ImageFilter.GaussianBlur(1)),
    "blurred, radius 2": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "posterized, 16 colours": lambda im: im.quantize(16).convert("RGB"),
}


def memorization_rows(crops, train, heldout, extractor, identity) -> dict:
    """The memorization check's near-copy rates and median ratios for the held-out crops as they
    are and made worse, each crop judged against the threshold the other held-out crops set."""
    train_pixels = pixel_vectors_with_mirrors(crops.images[train])
    train_features = torch.cat([real_features(crops, train, extractor, identity, 16, "cpu", None),
                                real_features(crops, train, extractor, identity, 16, "cpu", None, mirrored=True)])
    real = crops.images[heldout]
    stand_ins = {"held-out crops as they are": real, **{name: degrade(real, how) for name, how in DEGRADATIONS.items()}}
    distances = {}
    for name, stand_in in stand_ins.items():
        found = distances_to_train(pixel_vectors(stand_in), extract_features(extractor, stand_in, 16), train_pixels,
                                   train_features)
        distances[name] = {space: d.numpy() for space, (d, _) in found.items()}
    own = distances["held-out crops as they are"]
    rows = {}
    for name, found in distances.items():
        flagged = {space: heldout_near_copies(own[space], NEAR_COPY_PERCENTILE, found[space]) for space in found}
        rows[name] = {**{f"{space}_near_copies": round(float(flagged[space].mean()), 4) for space in found},
                      **{f"{space}_median_ratio": round(float(np.median(found[space]) / np.median(own[space])), 3)
                         for space in found},
                      "either_near_copies": round(float((flagged["pixel"] | flagged["feature"]).mean()), 4)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="mobilenet", choices=("auto", "inception", "mobilenet"))
    parser.add_argument("--count", type=int, default=1000, help="images per contender set")
    args = parser.parse_args()
    started = time.perf_counter()
    space, note = choose_feature_space(args.features)
    print(note)
    extractor = load_extractor(space).eval()
    identity = extractor.identity
    crops = load_crops(REAL_CUB, CropSettings(size=64), progress=False)
    record = load_model(REPO / "models" / "small").data  # the shipped models' split
    train, heldout = recover_split(record, crops, "models/small")
    reference = real_features(crops, heldout, extractor, identity, 16, "cpu", None)
    rng = np.random.default_rng(0)
    picked = rng.choice(train, size=min(args.count, len(train)), replace=False)
    real = crops.images[picked]
    contenders = {
        "training crops (real)": real,
        **{name: degrade(real, how) for name, how in DEGRADATIONS.items()},
        "uniform noise": rng.integers(0, 256, real.shape, dtype=np.uint8),
    }
    rows = {}
    for name, images in contenders.items():
        features = real_features(crops, picked, extractor, identity, 16, "cpu", None) if name.endswith("(real)") \
            else extract_features(extractor, images, 16)
        rows[name] = scores(reference, features)
        print(f"{name:<26} {rows[name]}")
    order = rng.permutation(len(crops))
    half = len(crops) // 2
    everything = real_features(crops, np.arange(len(crops)), extractor, identity, 16, "cpu", None)
    halves = scores(everything[order[:half]], everything[order[half:2 * half]])
    print(f"two disjoint halves ({half} vs {half}): {halves}")
    memorization = memorization_rows(crops, train, heldout, extractor, identity)
    for name, row in memorization.items():
        print(f"memorization, {name:<26} {row}")
    save(f"metric_calibration_{space}", {
        "machine": machine(), "features": space, "feature_extractor": identity,
        "reference": f"{len(heldout)} held-out crops (random split, seed 0, 10%)", "count": len(picked),
        "rows": rows, "halves": {"count": half, **halves}, "memorization": memorization, "wall_time_s": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()
