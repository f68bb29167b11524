import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from birdgen.data import CropSettings, DatasetError, SplitSettings, crop_box, load_crops, random_flip, summarize
from birdgen.sources import read_metadata


def test_reads_fixture_and_crops_to_requested_size(tiny_cub):
    crops = load_crops(tiny_cub, CropSettings(size=32), progress=False)
    assert crops.images.shape == (18, 32, 32, 3) and crops.images.dtype == np.uint8
    assert sorted(set(crops.labels.tolist())) == [1, 2, 3]
    assert crops.is_train.sum() == 12  # every third image is a test image in the fixture
    tensor = crops.tensor()
    assert tensor.shape == (18, 3, 32, 32) and tensor.min() >= -1 and tensor.max() <= 1


def test_square_crop_keeps_bird_proportions_and_stays_inside_image():
    left, top, right, bottom = crop_box((100, 80), (50, 10, 40, 20), "square", padding=0.1)
    assert right - left == pytest.approx(bottom - top) == pytest.approx(44)
    assert 0 <= left and right <= 100 and 0 <= top and bottom <= 80
    # A box running past the border (as some official boxes do) is clipped first.
    assert crop_box((100, 80), (90, 70, 30, 30), "bbox") == (90, 70, 100, 80)
    # The square never exceeds the image's shorter side.
    left, top, right, bottom = crop_box((100, 80), (0, 0, 100, 80), "square", padding=0.5)
    assert right - left == pytest.approx(80)


def test_bbox_mode_stretches_box(tiny_cub):
    square = load_crops(tiny_cub, CropSettings(size=16, crop="square"), progress=False)
    bbox = load_crops(tiny_cub, CropSettings(size=16, crop="bbox"), progress=False)
    assert square.cache_path != bbox.cache_path
    assert not np.array_equal(square.images, bbox.images)


def test_grayscale_and_cmyk_become_rgb(tiny_cub):
    meta = read_metadata(tiny_cub)
    first, second = (tiny_cub / "images" / r.path for r in meta.records[:2])
    Image.open(first).convert("L").save(first)
    Image.open(second).convert("CMYK").save(second)
    crops = load_crops(tiny_cub, CropSettings(size=16), progress=False)
    assert crops.images.shape[-1] == 3
    gray = crops.images[0].astype(int)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 1


def test_cache_is_reused_and_rebuilt_when_sources_change(tiny_cub, isolated_cache, monkeypatch):
    first = load_crops(tiny_cub, CropSettings(size=16), progress=False)
    assert first.cache_path.is_file() and isolated_cache in first.cache_path.parents
    with monkeypatch.context() as patch:
        patch.setattr("birdgen.data.load_crop", lambda *args: pytest.fail("decoded a photo despite the cache"))
        again = load_crops(tiny_cub, CropSettings(size=16), progress=False)
    assert again.cache_path == first.cache_path and np.array_equal(again.images, first.images)
    meta = read_metadata(tiny_cub)
    image = tiny_cub / "images" / meta.records[0].path
    Image.new("RGB", (80, 60), (255, 0, 0)).save(image)
    os.utime(image, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    rebuilt = load_crops(tiny_cub, CropSettings(size=16), progress=False)
    assert rebuilt.cache_path != first.cache_path
    assert not np.array_equal(rebuilt.images[0], first.images[0])


def test_cache_never_written_inside_dataset(tiny_cub):
    before = sorted(p.name for p in tiny_cub.rglob("*"))
    load_crops(tiny_cub, CropSettings(size=16), progress=False)
    assert sorted(p.name for p in tiny_cub.rglob("*")) == before


def test_random_split_is_seeded_80_20(tiny_cub):
    crops = load_crops(tiny_cub, CropSettings(size=16), progress=False)
    train, test = crops.split(SplitSettings("random", seed=3))
    assert len(test) == round(18 * 0.2) and len(train) + len(test) == 18
    assert not set(train) & set(test)
    assert np.array_equal(test, crops.split(SplitSettings("random", seed=3))[1])
    assert not np.array_equal(test, crops.split(SplitSettings("random", seed=4))[1])


def test_random_flip_mirrors_about_half():
    batch = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2).repeat(50, 1, 1, 1)
    flipped = random_flip(batch, torch.Generator().manual_seed(0))
    mirrored = (flipped == batch.flip(-1)).flatten(1).all(1)
    kept = (flipped == batch).flatten(1).all(1)
    assert bool((mirrored | kept).all()) and 60 < int(mirrored.sum()) < 140


@pytest.mark.parametrize("name", ["images.txt", "bounding_boxes.txt", "image_class_labels.txt", "classes.txt",
                                  "train_test_split.txt"])
def test_missing_metadata_file_is_named(tiny_cub, name):
    (tiny_cub / name).unlink()
    with pytest.raises(DatasetError, match=name):
        load_crops(tiny_cub, progress=False)


def edit_line(path, line_no, text):
    lines = path.read_text().splitlines()
    lines[line_no - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_malformed_line_names_file_and_line(tiny_cub):
    edit_line(tiny_cub / "bounding_boxes.txt", 3, "3 1.0 two 5 5")
    with pytest.raises(DatasetError, match=r"bounding_boxes\.txt:3: malformed"):
        read_metadata(tiny_cub)
    edit_line(tiny_cub / "bounding_boxes.txt", 3, "3 1.0 2.0")
    with pytest.raises(DatasetError, match=r"bounding_boxes\.txt:3: expected 5 fields"):
        read_metadata(tiny_cub)


def test_duplicate_id_is_named(tiny_cub):
    edit_line(tiny_cub / "image_class_labels.txt", 4, "3 1")
    with pytest.raises(DatasetError, match=r"image_class_labels\.txt:4: duplicate id 3"):
        read_metadata(tiny_cub)


def test_id_missing_from_another_file(tiny_cub):
    lines = (tiny_cub / "train_test_split.txt").read_text().splitlines()
    (tiny_cub / "train_test_split.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetError, match=r"train_test_split\.txt: no entry for image id 18"):
        read_metadata(tiny_cub)


def test_unknown_class_and_bad_split_flag(tiny_cub):
    edit_line(tiny_cub / "image_class_labels.txt", 1, "1 99")
    with pytest.raises(DatasetError, match="class 99"):
        read_metadata(tiny_cub)
    edit_line(tiny_cub / "image_class_labels.txt", 1, "1 1")
    edit_line(tiny_cub / "train_test_split.txt", 2, "2 7")
    with pytest.raises(DatasetError, match=r"train_test_split\.txt:2: malformed"):
        read_metadata(tiny_cub)


@pytest.mark.parametrize("box", ["5 10.0 10.0 0.0 20.0", "5 10.0 10.0 20.0 -3.0"])
def test_zero_area_or_negative_box(tiny_cub, box):
    edit_line(tiny_cub / "bounding_boxes.txt", 5, box)
    with pytest.raises(DatasetError, match="image id 5 has a zero-area or negative box"):
        read_metadata(tiny_cub)


def test_box_outside_image_names_the_image(tiny_cub):
    edit_line(tiny_cub / "bounding_boxes.txt", 2, "2 500.0 500.0 10.0 10.0")
    with pytest.raises(DatasetError, match=r"Bird_1_0001\.jpg: box .* outside"):
        load_crops(tiny_cub, progress=False)


def test_missing_image_fails_naming_it(tiny_cub):
    meta = read_metadata(tiny_cub)
    (tiny_cub / "images" / meta.records[4].path).unlink()
    with pytest.raises(DatasetError, match=r"Bird_1_0004\.jpg: image listed in images\.txt \(id 5\) is missing"):
        load_crops(tiny_cub, progress=False)


def test_corrupt_image_listed_as_unusable_or_fails_when_strict(tiny_cub):
    meta = read_metadata(tiny_cub)
    truncated = tiny_cub / "images" / meta.records[1].path
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = tiny_cub / "images" / meta.records[2].path
    garbage.write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_crops(tiny_cub, strict=True, progress=False)
    crops = load_crops(tiny_cub, progress=False)
    assert len(crops) == 16 and [key for key, _ in crops.unusable] == [meta.records[1].path, meta.records[2].path]
    assert "corrupt or truncated" in crops.unusable[0][1] and "not a picture" in crops.unusable[1][1]
    assert 2 not in crops.image_ids and 3 not in crops.image_ids
    assert "left out 2 unreadable or too small pictures" in summarize(crops)
    assert load_crops(tiny_cub, progress=False).unusable == crops.unusable  # the cache keeps them


def test_empty_split_and_empty_listing(tiny_cub):
    (tiny_cub / "train_test_split.txt").write_text("".join(f"{i} 1\n" for i in range(1, 19)))
    crops = load_crops(tiny_cub, CropSettings(size=16), progress=False)
    with pytest.raises(DatasetError, match="no test images"):
        crops.split(SplitSettings("official"), need_heldout=True)
    (tiny_cub / "images.txt").write_text("")
    with pytest.raises(DatasetError, match=r"images\.txt: lists no images"):
        read_metadata(tiny_cub)


def test_not_a_folder(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        read_metadata(tmp_path / "nowhere")


def test_real_partial_cub(real_cub, monkeypatch):
    crops = load_crops(real_cub, progress=False)
    assert len(crops) == 2889 and len(np.unique(crops.labels)) == 50
    assert crops.is_train.sum() == 1500
    text = summarize(crops)
    assert text.startswith("2889 images in 50 species (official split: 1500 train, 1389 test)")
    # The second load must come from the cache alone, without opening a single photo.
    monkeypatch.setattr("birdgen.data.decode_picture", lambda *args: pytest.fail("decoded a JPEG despite the cache"))
    assert np.array_equal(load_crops(real_cub, progress=False).images, crops.images)
    # Birds are brighter in the middle than a random crop would be is too fragile; check
    # instead that crops are real photos: plenty of distinct colours, full dynamic range.
    assert crops.images.std() > 30 and len(np.unique(crops.images[0].reshape(-1, 3), axis=0)) > 500


def test_one_duplicate_pair_is_one_pair():
    from birdgen.datacheck import advice_for

    assert any(line.startswith("1 duplicate pair:") for line in advice_for(50, [], 0, 1, 0))
    assert any(line.startswith("2 duplicate pairs:") for line in advice_for(50, [], 0, 2, 0))
