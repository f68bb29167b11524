"""How FID and KID depend on how many images they rest on, for one model, in the standard
InceptionV3 features, and the extrapolated FID at infinitely many (Chong & Forsyth 2020,
"Effectively Unbiased FID and Inception Score and where to find them").

    python benchmarks/fid_sample_count.py [--model models/small-attn] [--max-samples 2000]

The model generates --max-samples birds with its default evaluation sampler (what `birdgen
eval` uses; seed 0, so the first 1,000 are the card's), in float32 like the cards. FID is
biased upwards by roughly a/N_generated + b/N_real; KID is unbiased. Two reference sets:

- the 289 held-out crops (the cards' reference): FID at N generated images, several random
  subsets each, fitted against 1/N; the intercept is FID at infinitely many generated images,
  still with the 289 real crops' own bias in it;
- the 2,600 training crops: FID at (N generated, M real), fitted against 1/N and 1/M together;
  the intercept is FID∞ on both sides (against crops the model trained on, so lower than a
  held-out FID∞ would be by whatever the model learned of those crops in particular).

It also times the Inception features on this machine (images/s) and compares the resize torchmetrics 1.9 takes by default (torch's
antialiased bilinear) with the original TensorFlow resize birdgen uses, on the same images.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from common import REAL_CUB, REPO, machine, save, with_precision
from birdgen.data import CropSettings, cache_dir, load_crops, recover_split
from birdgen.evaluation import EvalSettings, extract_features, generate_uint8, kid_and_fid, resolved_settings
from birdgen.features import InceptionFeatures, find_inception_weights
from birdgen.model_folder import load_model

COUNTS = (250, 500, 750, 1000, 1500, 2000)
REAL_COUNTS = (500, 1000, 1500, 2600)
SUBSETS = 4  # random subsets per count below the maximum


def scores(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = kid_and_fid(real, fake, seed=seed)
    return {"fid": found["fid"], "kid": found["kid_mean"], "kid_std": found["kid_std"]}


def fit_intercept(columns: list[np.ndarray], fid: np.ndarray) -> tuple[float, list[float]]:
    """Least squares fid = FID∞ + sum_i c_i * columns_i (Chong & Forsyth's linear fit in 1/N)."""
    design = np.column_stack([np.ones_like(fid), *columns])
    solution, *_ = np.linalg.lstsq(design, fid, rcond=None)
    return float(solution[0]), [float(c) for c in solution[1:]]


def pick(rng, total: int, count: int) -> np.ndarray:
    return np.arange(total) if count >= total else rng.choice(total, count, replace=False)


def timed_features(extractor, images) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    features = extract_features(extractor, images)
    return features, len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/small-attn")
    parser.add_argument("--max-samples", type=int, default=max(COUNTS))
    args = parser.parse_args()
    started = time.perf_counter()
    model = load_model(REPO / args.model)
    settings = resolved_settings(model, EvalSettings(num_samples=args.max_samples))
    stored = cache_dir() / "benchmarks" / f"fid_sample_count-{model.name}-{args.max_samples}.npy"
    if stored.is_file():  # generation is most of the hour: a rerun scores the same images again
        generated, generation_s = torch.from_numpy(np.load(stored)), None
    else:
        began = time.perf_counter()
        generated = with_precision("fp32", lambda: generate_uint8(model, settings))
        generation_s = time.perf_counter() - began
        stored.parent.mkdir(parents=True, exist_ok=True)
        np.save(stored, generated.numpy())
    extractor = InceptionFeatures(find_inception_weights()).eval()
    crops = load_crops(REAL_CUB, CropSettings(size=64), progress=False)
    train, heldout = recover_split(model.data, crops, args.model)
    fake, fake_rate = timed_features(extractor, generated)
    heldout_real, _ = timed_features(extractor, crops.images[heldout])
    train_real, train_rate = timed_features(extractor, crops.images[train])
    rng = np.random.default_rng(0)

    heldout_rows = []
    for count in COUNTS:
        if count > len(fake):
            continue
        found = [scores(heldout_real, fake[pick(rng, len(fake), count)])
                 for _ in range(1 if count >= len(fake) else SUBSETS)]
        heldout_rows.append({"generated": count, "real": len(heldout), "subsets": len(found),
                             **{key: round(float(np.mean([f[key] for f in found])), 4) for key in ("fid", "kid")},
                             "fid_spread": round(float(np.std([f["fid"] for f in found])), 2),
                             "kid_std": round(float(np.mean([f["kid_std"] for f in found])), 4)})
        print("held-out", heldout_rows[-1])
    points = [(row["generated"], row["fid"]) for row in heldout_rows]
    heldout_inf, heldout_slope = fit_intercept([1 / np.array([n for n, _ in points])], np.array([f for _, f in points]))
    first_thousand = scores(heldout_real, fake[:1000]) if len(fake) >= 1000 else None

    train_rows = []
    for real_count in REAL_COUNTS:
        for count in COUNTS:
            if count > len(fake) or real_count > len(train):
                continue
            draws = 1 if count >= len(fake) and real_count >= len(train) else SUBSETS
            found = [scores(train_real[pick(rng, len(train), real_count)], fake[pick(rng, len(fake), count)])
                     for _ in range(draws)]
            train_rows.append({"generated": count, "real": real_count, "subsets": len(found),
                               "fid": round(float(np.mean([f["fid"] for f in found])), 4),
                               "kid": round(float(np.mean([f["kid"] for f in found])), 4)})
            print("train", train_rows[-1])
    train_inf, train_slopes = fit_intercept([1 / np.array([r["generated"] for r in train_rows]),
                                             1 / np.array([r["real"] for r in train_rows])],
                                            np.array([r["fid"] for r in train_rows]))

    # torchmetrics 1.9's default resize (antialias=True) against the TensorFlow one, same 1,000 images.
    tensorflow_resize = extractor.resize
    extractor.resize = lambda x, size, align_corners: F.interpolate(x, size=size, mode="bilinear",
                                                                    align_corners=align_corners, antialias=True)
    antialiased = scores(extract_features(extractor, crops.images[heldout]), extract_features(extractor, generated[:1000]))
    extractor.resize = tensorflow_resize

    save(f"fid_sample_count_{model.name}", {
        "machine": machine(), "model": model.name, "precision": "fp32",
        "sampler": f"{settings.sampler} {settings.steps}", "guide": model.guide.name if model.guide else None,
        "guide_weight": settings.guide_weight, "seed": settings.seed,
        "generated": len(fake), "generation_s": round(generation_s, 1) if generation_s else "reused from cache",
        "inception_images_per_s": {"generated": round(fake_rate, 2), "train crops": round(train_rate, 2)},
        "heldout": {"rows": heldout_rows, "fid_infinity": round(heldout_inf, 2),
                    "slope_per_inverse_generated": round(heldout_slope[0], 1),
                    "first_1000": {k: round(v, 4) for k, v in first_thousand.items()} if first_thousand else None},
        "train": {"rows": train_rows, "fid_infinity": round(train_inf, 2),
                  "slopes_per_inverse_generated_and_real": [round(s, 1) for s in train_slopes]},
        "resize_check_1000_vs_heldout": {"tensorflow_bilinear": {k: round(v, 4) for k, v in first_thousand.items()}
                                         if first_thousand else None,
                                         "torch_antialiased_bilinear": {k: round(v, 4) for k, v in antialiased.items()}},
        "wall_time_s": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()
