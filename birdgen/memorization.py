"""The memorization check: how close generated images come to the training crops, in pixels and
in features, against how close real crops the model never saw come (a model that copies puts
some samples far closer than any held-out photo)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import Crops
from .images import grid_image
from .utils import atomic_write

NEAR_COPY_PERCENTILE = 1.0
MEMORIZATION_PAIRS_FILE = "memorization.png"


def nearest(queries: torch.Tensor, references: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each query's nearest reference, in chunks to bound memory."""
    distances, indices = [], []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start:start + chunk].double(), references.double())
        best = d.min(dim=1)
        distances.append(best.values)
        indices.append(best.indices)
    return torch.cat(distances), torch.cat(indices)


def pixel_vectors(images_uint8_nhwc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Flattened pixels in [0, 1], so that distance / sqrt(H*W*3) is an RMS pixel difference."""
    images = torch.as_tensor(images_uint8_nhwc)
    return images.reshape(len(images), -1).double() / 255


def pixel_vectors_with_mirrors(images_uint8_nhwc: np.ndarray) -> torch.Tensor:
    """The pixel vectors of training crops, then of their mirror images (training flips them)."""
    return torch.cat([pixel_vectors(images_uint8_nhwc), pixel_vectors(images_uint8_nhwc[:, :, ::-1].copy())])


def distances_to_train(pixels: torch.Tensor, features: torch.Tensor, train_pixels: torch.Tensor,
                       train_features: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(distance, index) of each image's nearest training crop, per space: the RMS difference in
    [0, 1] in pixels, the Euclidean distance in features."""
    pixel_d, pixel_i = nearest(pixels, train_pixels)
    return {"pixel": (pixel_d / np.sqrt(train_pixels.shape[1]), pixel_i),
            "feature": nearest(features, train_features)}


@dataclass
class MemorizationSets:
    """The features and pixels the copy check compares: training crops (with their mirror
    images, since training flips), held-out crops, and generated images."""

    train_pixels: torch.Tensor  # (2 * N_train, D): the crops, then their mirror images
    train_features: torch.Tensor  # (2 * N_train, F), the same order
    heldout_pixels: torch.Tensor
    heldout_features: torch.Tensor
    generated_pixels: torch.Tensor
    generated_features: torch.Tensor


def heldout_near_copies(heldout_d: np.ndarray, percentile: float, judged: np.ndarray | None = None) -> np.ndarray:
    """Which held-out crops would count as near-copies if they were samples: each judged against
    the threshold the other held-out crops set (leave-one-out). A crop's own distance is among
    those that set its threshold otherwise, so the in-sample rate is `percentile` by construction;
    out of sample, with the few hundred held-out crops a folder has, it is about twice that (the
    1st percentile of 96 crops lies between the smallest two, below which a new draw falls with
    probability about 2/97), and it is this rate that a model which does not copy matches.
    `judged`: the distances of stand-ins for the crops (crop i made blurry, say) to judge in
    their place, each against the threshold the other crops set."""
    judged = heldout_d if judged is None else judged
    return np.array([judged[i] < np.percentile(np.delete(heldout_d, i), percentile) for i in range(len(heldout_d))])


def memorization_report(sets: MemorizationSets, percentile: float = NEAR_COPY_PERCENTILE) -> dict:
    """How close generated images come to training crops, measured against how close unseen
    real crops come. A model that generalises puts its samples about as far from the training
    set as held-out photos are (median ratio near 1 or above); a copying model puts some far
    closer than any held-out photo ("near-copies": closer than the held-out crops'
    `percentile`-th percentile), more often than held-out crops judged the same way are."""
    report: dict = {"near_copy_percentile": percentile}
    found, heldout_found = {}, {}
    heldout = distances_to_train(sets.heldout_pixels, sets.heldout_features, sets.train_pixels, sets.train_features)
    generated = distances_to_train(sets.generated_pixels, sets.generated_features, sets.train_pixels,
                                   sets.train_features)
    for space in ("pixel", "feature"):
        heldout_d = heldout[space][0]
        generated_d, generated_i = generated[space]
        threshold = float(np.percentile(heldout_d.numpy(), percentile))
        heldout_found[space] = heldout_near_copies(heldout_d.numpy(), percentile)
        report[space] = {
            "generated_median": float(generated_d.median()), "heldout_median": float(heldout_d.median()),
            "median_ratio": float(generated_d.median() / heldout_d.median()),
            "near_copy_threshold": threshold, "near_copy_fraction": float((generated_d < threshold).double().mean()),
            "near_copies": int((generated_d < threshold).sum()),
            "heldout_near_copy_fraction": float(heldout_found[space].mean()),
        }
        found[space] = (generated_d, generated_i, generated_d < threshold)
    flagged = found["pixel"][2] | found["feature"][2]  # a near-copy in either space
    report["near_copy_fraction"], report["near_copies"] = float(flagged.double().mean()), int(flagged.sum())
    report["heldout_near_copy_fraction"] = float((heldout_found["pixel"] | heldout_found["feature"]).mean())
    distances, indices, _ = found["pixel"]
    report["_closest"] = [(int(g), int(indices[g])) for g in distances.argsort()[:8]]
    return report


def sets_image(crops: Crops, train_indices: np.ndarray, index: int) -> np.ndarray:
    """The training crop behind row `index` of MemorizationSets.train_* (mirrored in the second half)."""
    image = crops.images[train_indices[index % len(train_indices)]]
    return np.ascontiguousarray(image[:, ::-1]) if index >= len(train_indices) else image


def memorization_check(crops: Crops, train_indices: np.ndarray, heldout_indices: np.ndarray,
                       train_features: torch.Tensor, heldout_features: torch.Tensor, generated: torch.Tensor,
                       generated_features: torch.Tensor) -> tuple[dict, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The memorization record of an evaluation (`memorization_report`, with the closest pairs
    named by training image id) and those pairs' images. `train_features`: the training crops',
    then their mirror images'."""
    sets = MemorizationSets(
        train_pixels=pixel_vectors_with_mirrors(crops.images[train_indices]), train_features=train_features,
        heldout_pixels=pixel_vectors(crops.images[heldout_indices]), heldout_features=heldout_features,
        generated_pixels=pixel_vectors(generated), generated_features=generated_features)
    report = memorization_report(sets)
    closest = report.pop("_closest")
    count = len(train_indices)
    report["closest_pairs"] = [
        {"generated_index": g, "train_image_id": int(crops.image_ids[train_indices[t % count]]),
         "mirrored": t >= count} for g, t in closest]
    report["num_train"], report["num_heldout"] = count, len(heldout_indices)
    pairs = [(generated[g], torch.from_numpy(sets_image(crops, train_indices, t))) for g, t in closest]
    return report, pairs


def save_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    """Each generated image (top row) above its nearest training crop (bottom row)."""
    top = torch.stack([g for g, _ in pairs])
    bottom = torch.stack([t for _, t in pairs])
    grid = grid_image(torch.cat([top, bottom]), columns=len(pairs))
    atomic_write(path, "the closest pairs", grid.save)
