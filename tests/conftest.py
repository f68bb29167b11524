"""Shared fixtures: a small CUB-format dataset built on the fly, the real partial copy when
present, an isolated cache folder and float32 sampling for every test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from birdgen.precision import PRECISION_ENV

REPO = Path(__file__).resolve().parent.parent
REAL_CUB = REPO.parent / "shared" / "data" / "CUB_200_2011"

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("BIRDGEN_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(autouse=True)
def float32_sampling(monkeypatch):
    """Sampling precision follows the machine (bf16 autocast where the CPU has avx512_bf16), and
    the tests compare outputs with float32 arithmetic, so they pin float32 on every machine;
    test_precision.py sets the precision itself to test the decision and the bf16 path."""
    monkeypatch.setenv(PRECISION_ENV, "fp32")


@pytest.fixture
def real_cub() -> Path:
    if not (REAL_CUB / "images.txt").is_file():
        pytest.skip(f"real CUB data not found at {REAL_CUB} (the partial copy in ../shared)")
    return REAL_CUB


def make_cub(root: Path, classes: int = 3, per_class: int = 6, size=(80, 60), seed: int = 0) -> Path:
    """Writes a CUB-200-2011 layout with coloured 'birds' (a bright ellipse inside each box)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    lines = {name: [] for name in ("images", "bounding_boxes", "image_class_labels", "train_test_split")}
    classes_lines = []
    image_id = 0
    for class_id in range(1, classes + 1):
        folder = f"{class_id:03d}.Bird_{class_id}"
        classes_lines.append(f"{class_id} {folder}")
        (root / "images" / folder).mkdir()
        for index in range(per_class):
            image_id += 1
            width, height = size
            pixels = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
            x, y = int(rng.integers(0, width // 3)), int(rng.integers(0, height // 3))
            w, h = int(rng.integers(width // 3, width - x)), int(rng.integers(height // 3, height - y))
            pixels[y:y + h, x:x + w] = rng.integers(120, 255, 3, dtype=np.uint8)
            relative = f"{folder}/Bird_{class_id}_{index:04d}.jpg"
            Image.fromarray(pixels).save(root / "images" / relative, quality=95)
            lines["images"].append(f"{image_id} {relative}")
            lines["bounding_boxes"].append(f"{image_id} {x}.0 {y}.0 {w}.0 {h}.0")
            lines["image_class_labels"].append(f"{image_id} {class_id}")
            lines["train_test_split"].append(f"{image_id} {int(index % 3 != 0)}")
    for name, content in lines.items():
        (root / f"{name}.txt").write_text("\n".join(content) + "\n")
    (root / "classes.txt").write_text("\n".join(classes_lines) + "\n")
    return root


@pytest.fixture
def tiny_cub(tmp_path) -> Path:
    return make_cub(tmp_path / "CUB_200_2011")
