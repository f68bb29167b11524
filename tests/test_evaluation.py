"""KID/FID through torchmetrics, checked against an independent NumPy/SciPy implementation
on the same features, with a small injected feature extractor (no downloads)."""

import json

import numpy as np
import pytest
import torch
from scipy import linalg

from birdgen.checkpoint import build_model, load_model, save_model
from birdgen.data import load_crops
from birdgen.diffusion import DiffusionConfig
from birdgen.evaluation import (EvalSettings, InceptionWeightsMissing, evaluate, find_inception_weights, hub_weights_path,
                                kid_and_fid, write_metrics)
from birdgen.networks import preset


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


def test_evaluate_end_to_end_writes_metrics_and_caches_real_features(tiny_cub, tmp_path, isolated_cache):
    model = build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=100))
    save_model(tmp_path / "m", model.network, model.network_config, model.diffusion_config)
    model = load_model(tmp_path / "m")
    crops = load_crops(tiny_cub, size=16, progress=False)
    seen = []
    settings = EvalSettings(split="all", num_samples=12, steps=3, batch_size=5)
    with pytest.warns(UserWarning):
        metrics = evaluate(model, crops, settings, ColourStatistics(), "colour-stats",
                           progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert metrics["num_real"] == 18 and metrics["num_generated"] == 12
    assert metrics["fid"] > 0 and metrics["kid_subset_size"] == 12
    assert ("generated images", 12, 12) in seen and ("real images", 18, 18) in seen
    assert len(list((isolated_cache / "features").glob("real-*.npy"))) == 1
    seen.clear()
    with pytest.warns(UserWarning):
        again = evaluate(model, crops, settings, ColourStatistics(), "colour-stats",
                         progress=lambda stage, done, total: seen.append(stage))
    assert "real images" not in seen and again["fid"] == pytest.approx(metrics["fid"])
    path = write_metrics(model, metrics)
    assert json.loads(path.read_text())["feature_extractor"] == "colour-stats"


def test_missing_inception_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv("BIRDGEN_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(InceptionWeightsMissing) as error:
        find_inception_weights()
    message = str(error.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message and str(hub_weights_path()) in message
    assert "--inception-weights" in message
    with pytest.raises(InceptionWeightsMissing, match="nowhere.pth: Inception weights file not found"):
        find_inception_weights(tmp_path / "nowhere.pth")


def test_real_inception_features(real_cub):
    try:
        weights = find_inception_weights()
    except InceptionWeightsMissing as error:
        pytest.skip(f"InceptionV3 weights absent: {error}")
    from birdgen.evaluation import InceptionFeatures, extract_features

    crops = load_crops(real_cub, progress=False)
    features = extract_features(InceptionFeatures(weights), crops.images[:8])
    assert features.shape == (8, 2048) and torch.isfinite(features).all()
