"""Sample quality and memorization: FD and KID (torchmetrics), precision and recall, and a
nearest-neighbour copy check, all against the crops a model never trained on.

Features come from one extractor per evaluation (`birdgen.features`: the standard FID
InceptionV3, installed with birdgen, or the offline MobileNetV1) and are computed once per image; the real
crops' features are cached per dataset, split and extractor.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchmetrics
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from .data import Crops, cache_dir, model_crops, recover_split
from .export import update_card_quality
from .features import FEATURE_LABELS, choose_feature_space, load_extractor
from .images import to_uint8
from .memorization import MEMORIZATION_PAIRS_FILE, memorization_check, save_pairs
from .metrics_file import (METRICS_FILE, REPORT_FID, REPORT_KID, EvaluationRecord, add_or_replace, key_of,
                           species_text, stored_alike)
from .model_folder import BirdModel
from .pipeline import GenerationRequest, generate, model_sampling, planned_flops
from .records import DataRecord
from .species import species_index
from .utils import atomic_write, duration_text

KID_SUBSET_SIZE = 1000
PRECISION_RECALL_K = 3  # Kynkäänniemi et al. 2019
MIN_SAMPLES = 10
EVAL_SAMPLING = ("ddim", 50)  # the sampler of the published numbers
PROBE_IMAGES, PROBE_STEPS = 8, 4  # the pace probe: small enough to run before every estimate

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class EvaluationError(ValueError):
    """Evaluation cannot run as asked; the message says why in one line."""


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
    """KID (mean, std over random subsets; the subset size fitted to the smaller set) and the
    Fréchet distance from two feature matrices (N, D)."""
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


def kth_neighbour_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PRECISION_RECALL_K) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the
    union of balls reaching every point's k-th nearest neighbour; precision is the share of
    generated points inside the real manifold, recall the share of real points inside the
    generated one."""
    if min(len(real), len(fake)) <= k:
        raise EvaluationError(f"precision/recall with k={k} needs more than {k} images in each set"
                              f" (got {len(real)} real, {len(fake)} generated)")
    real, fake = real.double(), fake.double()
    real_radii, fake_radii = kth_neighbour_radii(real, k), kth_neighbour_radii(fake, k)
    cross = torch.cdist(fake, real)  # (fake, real)
    precision = (cross <= real_radii[None, :]).any(dim=1).double().mean()
    recall = (cross <= fake_radii[:, None]).any(dim=0).double().mean()
    return {"precision": float(precision), "recall": float(recall), "precision_recall_k": k,
            "precision_recall_images": min(len(real), len(fake))}


def equal_sizes(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sets cut to the smaller one's size by a seeded random subset: k-NN radii shrink
    as a set grows, so precision and recall from sets of different sizes are biased (the larger
    set looks narrower); Kynkäänniemi et al. compare equal-sized sets."""
    size = min(len(real), len(fake))
    generator = torch.Generator().manual_seed(seed)
    real = real[torch.randperm(len(real), generator=generator)[:size]] if len(real) > size else real
    fake = fake[torch.randperm(len(fake), generator=generator)[:size]] if len(fake) > size else fake
    return real, fake


def real_features_path(crops: Crops, indices: np.ndarray, identity: str, mirrored: bool) -> Path:
    """The feature cache's file for these real crops: keyed by (crop cache, indices, extractor)."""
    key = hashlib.sha256(json.dumps([str(crops.cache_path), indices.tolist(), identity, mirrored]).encode())
    return cache_dir() / "features" / f"real-{key.hexdigest()[:20]}.npy"


def real_features_cached(crops: Crops, indices: np.ndarray, identity: str, mirrored: bool) -> bool:
    """Whether `real_features` will read these crops' features from disk (a cached crop set only)."""
    return crops.cache_path is not None and real_features_path(crops, indices, identity, mirrored).is_file()


def real_features(crops: Crops, indices: np.ndarray, extractor: nn.Module, identity: str, batch_size: int,
                  device, progress: Progress | None, mirrored: bool = False, cache: bool = True) -> torch.Tensor:
    """Features of real crops (mirrored left-right if asked), cached per `real_features_path`."""
    path = real_features_path(crops, indices, identity, mirrored)
    if cache and real_features_cached(crops, indices, identity, mirrored):
        return torch.from_numpy(np.load(path))
    images = crops.images[indices]
    if mirrored:
        images = np.ascontiguousarray(images[:, :, ::-1])
    stage = "mirrored training crops" if mirrored else f"real crops ({len(indices)})"
    features = extract_features(extractor, images, batch_size, device, progress, stage)
    if cache and crops.cache_path is not None:
        atomic_write(path, "the feature cache", lambda temporary: np.save(temporary, features.numpy()))
    return features


@dataclass
class Evaluation:
    """What `evaluate` found: the record stored in metrics.json, and the closest
    (generated, training crop) image pairs of the memorization check, uint8 HWC."""

    metrics: dict
    closest_pairs: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EvalSettings:
    reference: str = "heldout"  # real crops to compare with: the model's "heldout" crops or its "train" crops
    num_samples: int = 1000
    sampler: str | None = None  # None: a distilled student's own sampler, else EVAL_SAMPLING
    steps: int | None = None  # None: the sampler's default (EVAL_SAMPLING's 50 steps when sampler is None too)
    eta: float = 0.0
    batch_size: int = 64
    seed: int = 0
    memorization: bool = True
    guidance: float | None = None  # species models follow the reference crops' species with this; None: the model's
    guide_weight: float | None = None  # autoguidance w; None: the model's default, 1: off
    interval: tuple[int, int] | None = None  # timesteps where guidance applies; None: the model's default

    def validate(self) -> None:
        if self.reference not in ("heldout", "train"):
            raise EvaluationError(f"unknown reference split {self.reference!r}; choose heldout (the crops the model"
                                  " never trained on) or train")
        if self.num_samples < MIN_SAMPLES:
            raise EvaluationError(f"num_samples {self.num_samples} is too few: FD, KID and precision/recall need at"
                                  f" least {MIN_SAMPLES} generated images (1,000 or more for numbers worth comparing)")
        if self.batch_size < 1:
            raise EvaluationError(f"batch_size {self.batch_size} must be at least 1")


def resolve_sampler(model: BirdModel, settings: EvalSettings) -> EvalSettings:
    """The settings with the sampler and steps resolved for `model` (what metrics.json records)."""
    sampler, steps = model_sampling(model, settings.sampler, settings.steps, EVAL_SAMPLING)
    return replace(settings, sampler=sampler, steps=steps)


def resolved_settings(model: BirdModel, settings: EvalSettings) -> EvalSettings:
    """The settings with the sampler, steps and guidance resolved for `model`, as metrics.json records them."""
    settings = resolve_sampler(model, settings)
    guidance = model.resolve_guidance(settings.guidance, settings.guide_weight, settings.interval)
    return replace(settings, guidance=guidance.species_weight if model.conditional else None,
                   guide_weight=guidance.guide_weight,
                   interval=guidance.interval or (0, model.schedule.num_steps - 1))


def guide_name(model: BirdModel, settings: EvalSettings) -> str | None:
    """The guide that took part in an evaluation with resolved `settings` (None: none did)."""
    return model.guide.name if model.guide is not None and settings.guide_weight != 1 else None


def measurement(model: BirdModel, settings: EvalSettings, feature_space: str) -> dict:
    """What an evaluation of `model` with `settings` will record of EVALUATION_KEY's fields."""
    settings = resolved_settings(model, settings)
    return {"feature_space": feature_space, **asdict(settings), "num_generated": settings.num_samples,
            "guide": guide_name(model, settings)}


def batch_request(settings: EvalSettings, count: int, seed: int, labels: tuple[int, ...] = ()) -> GenerationRequest:
    """One generation batch of an evaluation: `count` birds, or one of each of `labels` (class indices)."""
    request = GenerationRequest(settings.sampler, settings.steps, count, seed, settings.eta,
                                guide_weight=settings.guide_weight, interval=settings.interval)
    return replace(request, num_images=1, species=labels, guidance=settings.guidance) if labels else request


def generate_uint8(model: BirdModel, settings: EvalSettings, progress: Progress | None = None,
                   species: list[int] | None = None) -> torch.Tensor:
    """settings.num_samples generated birds as uint8 NHWC, in seeded batches (seed + index of the
    first); for a species model, image i is of species[i % len(species)] (class indices)."""
    chunks, done = [], 0
    settings = resolve_sampler(model, settings)
    while done < settings.num_samples:
        count = min(settings.batch_size, settings.num_samples - done)
        labels = tuple(species[(done + i) % len(species)] for i in range(count)) if species else ()
        chunks.append(to_uint8(generate(model, batch_request(settings, count, settings.seed + done, labels)).images))
        done += count
        if progress:
            progress("generating", done, settings.num_samples)
    return torch.cat(chunks)


def real_sets(model: BirdModel, settings: EvalSettings) -> list[tuple[str, bool]]:
    """The (split part, mirrored) sets of real crops whose features `evaluate` needs: the reference,
    and for the species classifier or the memorization check the training crops, their mirror
    images and the held-out crops."""
    needed = [(settings.reference, False)]
    if model.conditional or settings.memorization:
        needed += [part for part in (("train", False), ("train", True), ("heldout", False)) if part not in needed]
    return needed


@dataclass(frozen=True)
class Pace:
    """This machine's measured speed: network work while sampling, and feature extraction."""

    flops_per_s: float
    features_per_s: float


def measure_pace(model: BirdModel, settings: EvalSettings, extractor: nn.Module) -> Pace:
    """Times a short generation (PROBE_IMAGES images, PROBE_STEPS steps, the evaluation's sampler
    and guidance) and the features of PROBE_IMAGES images, each after one untimed warm-up run."""
    settings = resolved_settings(model, settings)
    steps = settings.steps if model.sampling else min(settings.steps, PROBE_STEPS)  # a student keeps its own
    probe = batch_request(replace(settings, steps=steps), PROBE_IMAGES, settings.seed,
                          (0,) * PROBE_IMAGES if model.conditional else ())
    images = torch.randint(0, 256, (PROBE_IMAGES, 3, model.network_config.image_size,
                                    model.network_config.image_size), dtype=torch.uint8)

    def seconds(work) -> float:
        work()
        started = time.perf_counter()
        work()
        return time.perf_counter() - started

    with torch.no_grad():
        generation_s = seconds(lambda: generate(model, probe))
        features_s = seconds(lambda: extractor.to(model.device).eval()(images.to(model.device)))
    return Pace(planned_flops(model, probe) * PROBE_IMAGES / generation_s, PROBE_IMAGES / features_s)


@dataclass(frozen=True)
class EvaluationEstimate:
    generation_s: float
    features_s: float
    num_generated: int
    real_to_extract: int  # real crops whose features are not in the cache yet

    @property
    def seconds(self) -> float:
        return self.generation_s + self.features_s

    def text(self) -> str:
        real = f" and of {self.real_to_extract:,} real crops" if self.real_to_extract else ""
        return (f"Estimated time on this machine: {duration_text(self.seconds)} (generating {self.num_generated:,}"
                f" birds {duration_text(self.generation_s)}, features of the generated birds{real}"
                f" {duration_text(self.features_s)}), from its measured pace"
                + ("." if self.real_to_extract else "; the real crops' features are cached."))


def estimate_evaluation(model: BirdModel, crops: Crops, settings: EvalSettings, identity: str, pace: Pace) -> \
        EvaluationEstimate:
    """How long `evaluate` will take here: the generation's network work at the measured pace, and
    the features of the generated birds and of every real crop set not cached yet."""
    settings = resolved_settings(model, settings)
    train, heldout = recover_split(model.data, crops, str(model.path or model.name))
    parts = {"train": train, "heldout": heldout}
    uncached = sum(len(parts[part]) for part, mirrored in real_sets(model, settings)
                   if not real_features_cached(crops, parts[part], identity, mirrored))
    per_image = planned_flops(model, batch_request(settings, 1, settings.seed, (0,) if model.conditional else ()))
    return EvaluationEstimate(settings.num_samples * per_image / pace.flops_per_s,
                              (settings.num_samples + uncached) / pace.features_per_s, settings.num_samples, uncached)


def species_accuracy(train_features: torch.Tensor, train_labels: np.ndarray, heldout_features: torch.Tensor,
                     heldout_labels: np.ndarray, generated_features: torch.Tensor, requested: np.ndarray,
                     names: dict[int, str], seed: int = 0) -> dict:
    """A species classifier (multinomial logistic regression on standardised features of the
    training crops and their mirror images) scores the held-out crops, which is the ceiling
    a perfect generator would reach, and the generated images against the species each was
    asked for: top-1 and top-5 accuracy, and per species."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000, random_state=seed))
    classifier.fit(train_features.numpy(), train_labels)
    known = classifier.classes_

    def scores(features: torch.Tensor, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ranked = known[np.argsort(-classifier.predict_proba(features.numpy()), axis=1)]
        return ranked[:, 0] == labels, (ranked[:, :5] == labels[:, None]).any(axis=1)

    heldout_top1, heldout_top5 = scores(heldout_features, heldout_labels)
    top1, top5 = scores(generated_features, requested)
    per_species = {names[int(c)]: round(float(top1[requested == c].mean()), 3) for c in np.unique(requested)}
    result = {"classes": len(known), "chance_top1": 1 / len(known),
              "heldout_top1": float(heldout_top1.mean()), "heldout_top5": float(heldout_top5.mean()),
              "generated_top1": float(top1.mean()), "generated_top5": float(top5.mean()),
              "per_species_top1": per_species}
    result["relative_top1"] = result["generated_top1"] / max(result["heldout_top1"], 1e-9)
    return result


def evaluate(model: BirdModel, crops: Crops, settings: EvalSettings, extractor: nn.Module, identity: str,
             feature_space: str, progress: Progress | None = None) -> Evaluation:
    """Generates settings.num_samples birds and scores them against the real crops of the
    model's own split."""
    settings.validate()
    settings = resolved_settings(model, settings)
    started = time.perf_counter()
    where = str(model.path or model.name)
    train_indices, heldout_indices = recover_split(model.data, crops, where)
    reference = heldout_indices if settings.reference == "heldout" else train_indices
    if len(reference) <= PRECISION_RECALL_K:
        raise EvaluationError(f"{where}: only {len(reference)} {settings.reference} crops; precision/recall needs more"
                              f" than {PRECISION_RECALL_K}")
    device = model.device
    extractor = extractor.to(device).eval()
    features = {}
    parts = {"train": train_indices, "heldout": heldout_indices}
    extracted: dict[tuple[str, bool], torch.Tensor] = {}

    def crops_features(part: str, mirrored: bool = False) -> torch.Tensor:
        """Each part's features once per evaluation (the reference set is also a memorization set)."""
        if (part, mirrored) not in extracted:
            extracted[part, mirrored] = real_features(crops, parts[part], extractor, identity, settings.batch_size,
                                                      device, progress, mirrored)
        return extracted[part, mirrored]

    for part, mirrored in real_sets(model, settings):  # first, so the estimate's count of them is this list's
        crops_features(part, mirrored)
    features["reference"] = crops_features(settings.reference)
    species = None
    if model.conditional:  # the same mix of species as the real crops compared with
        species = [species_index(model, int(c)) for c in crops.labels[reference]]
        species = [index for index in species if index is not None]
    generated = generate_uint8(model, settings, progress, species)
    features["generated"] = extract_features(extractor, generated, settings.batch_size, device, progress,
                                             "generated images")
    scores = {**kid_and_fid(features["reference"], features["generated"], seed=settings.seed),
              **precision_recall(*equal_sizes(features["reference"], features["generated"], settings.seed))}
    measured = measurement(model, settings, feature_space)
    result = {"feature_space": feature_space, "feature_label": FEATURE_LABELS.get(feature_space, feature_space),
              **scores, "num_real": len(reference), "num_generated": measured["num_generated"],
              "reference_split": describe_split(model.data, settings.reference, len(reference)), **asdict(settings),
              "species": species_text(bool(species)), "guide": measured["guide"],
              "feature_extractor": identity, "model": model.name, "image_size": model.network_config.image_size}
    if species:
        class_ids = np.array([model.species[index][0] for index in species])
        requested = np.array([class_ids[i % len(class_ids)] for i in range(settings.num_samples)])
        train_features = torch.cat([crops_features("train"), crops_features("train", mirrored=True)])
        result["species_accuracy"] = species_accuracy(
            train_features, np.tile(crops.labels[train_indices], 2), crops_features("heldout"),
            crops.labels[heldout_indices], features["generated"], requested,
            {class_id: name for class_id, name in model.species}, settings.seed)
    pairs = []
    if settings.memorization:
        train_features = torch.cat([crops_features("train"), crops_features("train", mirrored=True)])
        result["memorization"], pairs = memorization_check(crops, train_indices, heldout_indices, train_features,
                                                           crops_features("heldout"), generated, features["generated"])
    result.update({"torch": torch.__version__, "torchmetrics": torchmetrics.__version__,
                   "wall_time_s": round(time.perf_counter() - started, 1)})
    return Evaluation(result, pairs)


def describe_split(record: DataRecord, reference: str, count: int) -> str:
    part = "held-out" if reference == "heldout" else "training"
    if record.split in ("random", "stratified"):
        return (f"{count} {part} crops of {record.dataset} ({record.split} split, seed {record.seed},"
                f" {record.test_fraction:.0%} held out{' of each class' if record.split == 'stratified' else ''})")
    return f"{count} {part} crops of {record.dataset} (official train/test split)"


def already_stored(model: BirdModel, alike: EvaluationRecord) -> EvaluationError:
    return EvaluationError(f"{model.path / METRICS_FILE}: already holds this measurement ({alike.short()});"
                           " pass --replace to measure it again and replace it")


def write_metrics(model: BirdModel, evaluation: Evaluation, replace: bool = False) -> EvaluationRecord | None:
    """Adds one evaluation to the model folder's metrics.json, beside the others (other settings
    and feature spaces stay); one that measured the same as a stored one replaces it only with
    `replace`, else an EvaluationError says so. The closest pairs PNG follows the shown evaluation.
    Returns the evaluation it replaced, if any."""
    path = model.path / METRICS_FILE
    record = EvaluationRecord.from_dict(evaluation.metrics)
    shown, replaced = add_or_replace(path, record, replace)
    if shown is None:
        raise already_stored(model, replaced)
    if evaluation.closest_pairs and shown[record.feature_space] is record:
        save_pairs(evaluation.closest_pairs, model.path / MEMORIZATION_PAIRS_FILE)
    return replaced


def summary(metrics: dict) -> str:
    """One line: the numbers with their feature space."""
    text = (f"FD {metrics['fid']:.2f} · KID {metrics['kid_mean']:.4f} ± {metrics['kid_std']:.4f} · precision"
            f" {metrics['precision']:.2f} · recall {metrics['recall']:.2f} in {metrics['feature_space']} features"
            f" ({metrics['num_generated']} generated vs {metrics['num_real']} real, {metrics['sampler']}"
            f" {metrics['steps']} steps)")
    accuracy = metrics.get("species_accuracy")
    if accuracy:
        text += (f" · species accuracy top-1 {accuracy['generated_top1']:.1%} / top-5 {accuracy['generated_top5']:.1%}"
                 f" (held-out real crops: {accuracy['heldout_top1']:.1%} / {accuracy['heldout_top5']:.1%})")
    memo = metrics.get("memorization")
    if memo:
        text += (f" · memorization: median distance ratio {memo['pixel']['median_ratio']:.2f} (pixels),"
                 f" {memo['feature']['median_ratio']:.2f} (features), near-copies {memo['near_copy_fraction']:.1%}"
                 + (f" (held-out crops {memo['heldout_near_copy_fraction']:.1%})" if "heldout_near_copy_fraction" in memo
                    else ""))
    return text


def run_evaluation(model: BirdModel, data_root: str | os.PathLike, settings: EvalSettings, features: str = "auto",
                   inception_weights: str | None = None, progress: Progress | None = None,
                   notify: Callable[[str], None] | None = None, keep_stored: bool = False,
                   estimate: bool = True) -> Evaluation:
    """`birdgen eval` and the Metrics page: picks the feature space (failing before any work),
    loads the crops the model trained on, checks its split, then `evaluate`s. `keep_stored`:
    refuse, before any work, a measurement the model folder holds already. `estimate`: notify the
    estimated time first (the Metrics page shows it before the button instead)."""
    settings.validate()
    feature_space, note = choose_feature_space(features, inception_weights)
    if keep_stored and model.path is not None:
        alike = stored_alike(model.path / METRICS_FILE, key_of(measurement(model, settings, feature_space),
                                                              model.conditional))
        if alike is not None:
            raise already_stored(model, alike)
    if notify:
        notify(note)
    extractor = load_extractor(feature_space, inception_weights)
    crops = model_crops(model.data, data_root, str(model.path or model.name))[0]  # a wrong dataset fails here
    if notify and estimate:
        pace = measure_pace(model, settings, extractor)
        notify(estimate_evaluation(model, crops, settings, extractor.identity, pace).text())
    return evaluate(model, crops, settings, extractor, extractor.identity, feature_space, progress)


def save_evaluation(model: BirdModel, evaluation: Evaluation, replace: bool = False) -> tuple[Path, dict | None]:
    """metrics.json, the closest pairs and the card's Quality section of a local model folder; the
    evaluation it replaced, if any (see `write_metrics`)."""
    replaced = write_metrics(model, evaluation, replace)
    update_card_quality(model.path)
    return model.path / METRICS_FILE, replaced
