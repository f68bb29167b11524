"""KID/FID through torchmetrics, checked against an independent NumPy/SciPy implementation
on the same features, with a small injected feature extractor (no downloads)."""

import json

import numpy as np
import pytest
import torch
from scipy import linalg

from birdgen.model_folder import build_model, load_model, save_model
from birdgen.data import CropSettings, DatasetError, SplitSettings, load_crops, split_record
from birdgen.diffusion import DiffusionConfig
from birdgen.evaluation import (EvalSettings, Evaluation, EvaluationError, Pace, estimate_evaluation, evaluate,
                                extract_features, kid_and_fid, measure_pace, precision_recall, write_metrics)
from birdgen.export import update_card_quality
from birdgen.memorization import MemorizationSets, heldout_near_copies, memorization_report, pixel_vectors
from birdgen.metrics_file import REPORT_FID
from birdgen.networks import preset

from conftest import make_cub


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def unbiased_poly_mmd(a: np.ndarray, b: np.ndarray) -> float:
    """MMD^2 with k(x, y) = (x.y / d + 1)^3, diagonal terms left out (Binkowski et al. 2018)."""
    d, m, n = a.shape[1], len(a), len(b)
    k_aa, k_bb, k_ab = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
    return float((k_aa.sum() - np.trace(k_aa)) / (m * (m - 1)) + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
                 - 2 * k_ab.mean())


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 16))
    fake = rng.normal(size=(200, 16)) * 1.2 + 0.3
    return real, fake


def test_fid_and_kid_agree_with_independent_implementation(features):
    real, fake = features
    scores = kid_and_fid(torch.from_numpy(real), torch.from_numpy(fake), subset_size=200, subsets=1)
    assert scores["fid"] == pytest.approx(frechet_distance(real, fake), rel=1e-4)
    # One subset of 200 from each: with all 200 fakes and a random 200 of the reals; use the
    # same sizes to compare exactly.
    scores = kid_and_fid(torch.from_numpy(real[:200]), torch.from_numpy(fake), subset_size=200, subsets=1)
    assert scores["kid_mean"] == pytest.approx(unbiased_poly_mmd(real[:200], fake), rel=1e-4)


def test_identical_sets_score_near_zero_and_shift_scores_worse(features):
    real, fake = features
    same = kid_and_fid(torch.from_numpy(real), torch.from_numpy(real.copy()), subset_size=100)
    near = kid_and_fid(torch.from_numpy(real), torch.from_numpy(real + 0.1), subset_size=100)
    far = kid_and_fid(torch.from_numpy(real), torch.from_numpy(real + 1.0), subset_size=100)
    assert abs(same["fid"]) < 1e-6 and abs(same["kid_mean"]) < 0.01 * far["kid_mean"]
    assert 0 < near["fid"] < far["fid"] and near["kid_mean"] < far["kid_mean"]


def test_small_sets_lower_the_kid_subset_with_a_warning(features):
    real, fake = features
    with pytest.warns(UserWarning, match="KID subset size lowered from 1000 to 200"):
        scores = kid_and_fid(torch.from_numpy(real), torch.from_numpy(fake))
    assert scores["kid_subset_size"] == 200
    with pytest.warns(UserWarning, match="FID from 10 images with 16 feature dimensions"):
        kid_and_fid(torch.from_numpy(real[:10]), torch.from_numpy(fake[:10]), subset_size=5)


class ColourStatistics(torch.nn.Module):
    """A tiny stand-in for InceptionV3: per-channel means and deviations on a 4x4 grid."""

    num_features = 96

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4)
        return torch.cat([x.flatten(1), (x - x.mean((2, 3), keepdim=True)).abs().flatten(1)], 1)


def precision_recall_reference(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 with plain loops: a point is covered by a set when it lies within
    some member's distance to that member's k-th nearest neighbour in its own set."""
    def radii(points):
        return np.array([np.sort(np.linalg.norm(points - p, axis=1))[k] for p in points])

    def covered(points, members, member_radii):
        return np.mean([any(np.linalg.norm(p - m) <= r for m, r in zip(members, member_radii)) for p in points])

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_and_recall_agree_with_a_plain_reference(features):
    real, fake = features
    real, fake = real[:120], fake[:90]
    ours = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3)
    precision, recall = precision_recall_reference(real, fake, 3)
    assert ours["precision"] == pytest.approx(precision) and ours["recall"] == pytest.approx(recall)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1
    same = precision_recall(torch.from_numpy(real), torch.from_numpy(real.copy()))
    assert same["precision"] == 1 and same["recall"] == 1
    narrow = precision_recall(torch.from_numpy(real), torch.from_numpy(real[:, :] * 0.05))  # mode collapse
    assert narrow["precision"] > 0.9 and narrow["recall"] < 0.3
    with pytest.raises(EvaluationError, match="needs more than 3 images"):
        precision_recall(torch.from_numpy(real[:3]), torch.from_numpy(fake))


def smooth_images(count: int, seed: int, size: int = 16) -> np.ndarray:
    """Photo-like uint8 images: random 4x4 colour fields upsampled, so neighbours are meaningful."""
    low = torch.from_numpy(np.random.default_rng(seed).random((count, 3, 4, 4))).float()
    images = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_memorization_flags_exact_and_mirrored_copies_but_not_unseen_photos():
    train, heldout, unseen = smooth_images(300, 0), smooth_images(60, 1), smooth_images(60, 2)
    generated = np.concatenate([train[:1], train[1:2, :, ::-1], unseen])  # a copy, a mirrored copy, 60 new
    extractor = ColourStatistics()

    def feats(images):
        return extract_features(extractor, np.ascontiguousarray(images))

    mirrored = np.ascontiguousarray(train[:, :, ::-1])
    sets = MemorizationSets(
        train_pixels=torch.cat([pixel_vectors(train), pixel_vectors(mirrored)]),
        train_features=torch.cat([feats(train), feats(mirrored)]),
        heldout_pixels=pixel_vectors(heldout), heldout_features=feats(heldout),
        generated_pixels=pixel_vectors(np.ascontiguousarray(generated)), generated_features=feats(generated))
    report = memorization_report(sets)
    closest = report["_closest"]
    assert closest[:2] in ([(0, 0), (1, 301)], [(1, 301), (0, 0)])  # found, the second among the mirrored crops
    for space in ("pixel", "feature"):
        assert report[space]["near_copies"] >= 2
        # unseen photos are about as far from the training set as held-out ones:
        assert 0.8 < report[space]["median_ratio"] < 1.25
    assert report["near_copies"] <= 2 + 6  # the 2 copies, and at most 10% of the 60 unseen photos
    for part in (report["pixel"], report["feature"], report):
        assert 0 <= part["heldout_near_copy_fraction"] <= 0.1  # held-out photos are not copies either
    copies_only = MemorizationSets(sets.train_pixels, sets.train_features, sets.heldout_pixels, sets.heldout_features,
                                   sets.generated_pixels[:2], sets.generated_features[:2])
    assert memorization_report(copies_only)["near_copy_fraction"] == 1.0


def test_heldout_rate_is_what_a_sampler_that_does_not_copy_gives():
    """Samples drawn like the held-out crops fall under the threshold those crops set about twice
    as often as `percentile` says (96 crops: about 2%, not 1%); the held-out crops judged
    leave-one-out give that same rate, so a model is compared with what it can reach."""
    rng = np.random.default_rng(0)
    generated_rates, heldout_rates = [], []
    for _ in range(400):
        heldout, generated = rng.normal(size=96), rng.normal(size=500)
        generated_rates.append((generated < np.percentile(heldout, 1.0)).mean())
        heldout_rates.append(heldout_near_copies(heldout, 1.0).mean())
    assert np.mean(generated_rates) > 0.017  # the in-sample 1% would call a faithful sampler a copier
    assert np.mean(heldout_rates) == pytest.approx(np.mean(generated_rates), abs=0.003)


def test_stand_ins_for_heldout_crops_are_judged_against_the_other_crops_threshold():
    heldout = np.arange(1.0, 101.0)  # each crop's threshold: the 1st percentile of the other 99
    closer = heldout_near_copies(heldout, 1.0, judged=np.full(100, 2.5))
    assert closer.tolist() == [True, True] + [False] * 98  # thresholds 2.98 and 2.96 without crop 0 or 1, else 1.98
    assert not heldout_near_copies(heldout, 1.0, judged=heldout + 100).any()


def tiny_model(folder, crops, tiny_cub, train_on="train"):
    model = build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=100))
    record = split_record(crops, SplitSettings("random", 0, 0.3, train_on))
    save_model(folder, model.network, model.network_config, model.diffusion_config, card="# m\n\n## Samples\nx\n",
               data=record)
    return load_model(folder)


def test_evaluate_end_to_end_writes_metrics_card_and_caches_real_features(tiny_cub, tmp_path, isolated_cache):
    crops = load_crops(tiny_cub, CropSettings(size=16), progress=False)
    model = tiny_model(tmp_path / "m", crops, tiny_cub)
    seen = []
    settings = EvalSettings(num_samples=12, steps=3, batch_size=5)
    with pytest.warns(UserWarning):
        evaluation = evaluate(model, crops, settings, ColourStatistics(), "colour-stats", "test-space",
                              progress=lambda stage, done, total: seen.append((stage, done, total)))
    metrics = evaluation.metrics
    heldout = crops.split(SplitSettings("random", 0, 0.3))[1]
    assert metrics["num_real"] == len(heldout) == 5 and metrics["num_generated"] == 12
    assert metrics["fid"] > 0 and metrics["kid_subset_size"] == 5 and 0 <= metrics["precision"] <= 1
    assert "5 held-out crops of CUB_200_2011 (random split, seed 0, 30% held out)" == metrics["reference_split"]
    memo = metrics["memorization"]
    assert memo["num_train"] == 13 and memo["num_heldout"] == 5 and len(memo["closest_pairs"]) == 8
    assert ("generating", 12, 12) in seen and ("real crops (5)", 5, 5) in seen
    assert len(list((isolated_cache / "features").glob("real-*.npy"))) == 3  # reference, training, mirrored
    seen.clear()
    with pytest.warns(UserWarning):
        again = evaluate(model, crops, settings, ColourStatistics(), "colour-stats", "test-space",
                         progress=lambda stage, done, total: seen.append(stage))
    assert not any(stage.startswith(("real crops", "mirrored")) for stage in seen)
    assert again.metrics["fid"] == pytest.approx(metrics["fid"])
    assert write_metrics(model, evaluation) is None
    write_metrics(model, Evaluation({**again.metrics, "feature_space": "other-space"}, []))
    stored = json.loads((model.path / "metrics.json").read_text())
    assert set(stored) == {"test-space", "other-space", "evaluations"} and len(stored["evaluations"]) == 2
    assert stored["test-space"]["feature_extractor"] == "colour-stats"
    assert (model.path / "memorization.png").is_file()
    update_card_quality(model.path)
    card = (model.path / "README.md").read_text()
    assert card.startswith("# m\n\n## Samples\nx\n\n## Quality\n") and "### Memorization check" in card
    assert card.count("## Quality") == 1
    update_card_quality(model.path)
    assert (model.path / "README.md").read_text() == card


def test_estimate_counts_the_network_work_and_the_uncached_real_crops(tiny_cub, tmp_path, isolated_cache):
    from birdgen.pipeline import GenerationRequest, planned_flops

    crops = load_crops(tiny_cub, CropSettings(size=16), progress=False)
    model = tiny_model(tmp_path / "m", crops, tiny_cub)
    settings = EvalSettings(num_samples=12, steps=3, batch_size=5)
    pace = Pace(flops_per_s=1e6, features_per_s=4.0)
    before = estimate_evaluation(model, crops, settings, "colour-stats", pace)
    per_image = planned_flops(model, GenerationRequest("ddim", 3, 1))
    assert before.generation_s == pytest.approx(12 * per_image / 1e6)
    assert before.real_to_extract == 13 + 13 + 5  # training crops, their mirror images, held-out crops
    assert before.features_s == pytest.approx((12 + 31) / 4.0)
    assert "Estimated time on this machine" in before.text() and "of 31 real crops" in before.text()
    without_check = estimate_evaluation(model, crops, EvalSettings(num_samples=12, steps=3, memorization=False),
                                        "colour-stats", pace)
    assert without_check.real_to_extract == 5  # only the reference crops
    with pytest.warns(UserWarning):
        evaluate(model, crops, settings, ColourStatistics(), "colour-stats", "test-space")
    after = estimate_evaluation(model, crops, settings, "colour-stats", pace)
    assert after.real_to_extract == 0 and "cached" in after.text()  # the same sets evaluate extracted
    measured = measure_pace(model, settings, ColourStatistics())
    assert measured.flops_per_s > 0 and measured.features_per_s > 0


def test_card_shows_the_report_beside_inception_and_how_few_real_images_fid_rests_on(tiny_cub, tmp_path):
    crops = load_crops(tiny_cub, CropSettings(size=16), progress=False)
    model = tiny_model(tmp_path / "m", crops, tiny_cub)
    with pytest.warns(UserWarning):
        evaluation = evaluate(model, crops, EvalSettings(num_samples=12, steps=3, batch_size=5, memorization=False),
                              ColourStatistics(), "colour-stats", "inception")
    write_metrics(model, evaluation)
    update_card_quality(model.path)
    card = (model.path / "README.md").read_text()
    assert f"| the original report (InceptionV3) | not stated | not stated | – | – | {REPORT_FID:.2f} |" in card
    assert "compares 12 generated birds with 5 real crops" in card and "(here 5)" in card


def test_evaluation_refuses_what_it_cannot_measure_honestly(tiny_cub, tmp_path):
    crops = load_crops(tiny_cub, CropSettings(size=16), progress=False)
    settings = EvalSettings(num_samples=12, steps=2)
    unrecorded = build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=100))
    save_model(tmp_path / "plain", unrecorded.network, unrecorded.network_config, unrecorded.diffusion_config)
    with pytest.raises(DatasetError, match="does not record the crops it trained on"):
        evaluate(load_model(tmp_path / "plain"), crops, settings, ColourStatistics(), "c", "s")
    with pytest.raises(DatasetError, match="trained on every image"):
        evaluate(tiny_model(tmp_path / "all", crops, tiny_cub, "all"), crops, settings, ColourStatistics(), "c", "s")
    model = tiny_model(tmp_path / "m", crops, tiny_cub)
    other = load_crops(make_cub(tmp_path / "other" / "CUB_200_2011", classes=2), CropSettings(size=16), progress=False)
    with pytest.raises(DatasetError, match="dataset of 18 images; this one has 12"):
        evaluate(model, other, settings, ColourStatistics(), "c", "s")
    shuffled = make_cub(tmp_path / "shuffled" / "CUB_200_2011", seed=5)
    (shuffled / "images.txt").write_text("\n".join(reversed((shuffled / "images.txt").read_text().split("\n")[:-1])))
    reordered = load_crops(shuffled, CropSettings(size=16), progress=False)
    reordered.image_ids = reordered.image_ids + 100
    with pytest.raises(DatasetError, match="does not give the training images the model recorded"):
        evaluate(model, reordered, settings, ColourStatistics(), "c", "s")
    with pytest.raises(EvaluationError, match="num_samples 4 is too few"):
        evaluate(model, crops, EvalSettings(num_samples=4), ColourStatistics(), "c", "s")
    with pytest.raises(EvaluationError, match="unknown reference split 'test'"):
        evaluate(model, crops, EvalSettings(reference="test"), ColourStatistics(), "c", "s")


def test_the_species_classifier_knows_real_crops_and_not_wrong_labels(real_cub):
    from birdgen.evaluation import species_accuracy
    from birdgen.features import MobileNetFeatures

    crops = load_crops(real_cub, CropSettings(size=64), progress=False)
    chosen = np.isin(crops.labels, np.unique(crops.labels)[:12])  # 12 species keep the test short
    indices = np.flatnonzero(chosen)
    rng = np.random.default_rng(0)
    rng.shuffle(indices)
    train, heldout = indices[: len(indices) * 4 // 5], indices[len(indices) * 4 // 5:]
    extractor = MobileNetFeatures().eval()
    features = extract_features(extractor, crops.images[indices], 64)
    by_index = dict(zip(indices.tolist(), features))
    train_features = torch.stack([by_index[i] for i in train.tolist()])
    heldout_features = torch.stack([by_index[i] for i in heldout.tolist()])
    labels = crops.labels
    classes = np.unique(labels[indices])
    wrong = np.array([classes[(np.searchsorted(classes, c) + 5) % len(classes)] for c in labels[heldout]])
    names = {int(c): str(c) for c in classes}
    right = species_accuracy(train_features, labels[train], heldout_features, labels[heldout], heldout_features,
                             labels[heldout], names)
    shifted = species_accuracy(train_features, labels[train], heldout_features, labels[heldout], heldout_features,
                               wrong, names)
    chance = 1 / len(classes)
    assert right["classes"] == 12 and right["heldout_top1"] == right["generated_top1"]
    assert right["heldout_top1"] > 3 * chance and right["heldout_top5"] > right["heldout_top1"]
    assert shifted["generated_top1"] < 2 * chance and shifted["relative_top1"] < 0.4
