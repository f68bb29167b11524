"""Image folders and zips as picture sources: every kind of unusual or bad file, decoded the way
real photos need, reported by `birdgen data check`, and the real folders in ../shared."""

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from birdgen.cli import main
from birdgen.data import CropSettings, DatasetError, MIN_PICTURE_SIDE, SplitSettings, load_crops
from birdgen.datacheck import check_dataset, near_duplicate_pairs
from birdgen.sources import (MAX_PICTURE_PIXELS, PictureError, decode_picture, open_source)
from conftest import REAL_CUB

EXTRA_FOLDER = REAL_CUB.parent / "CUB_extra_folder"


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def picture(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST)


# ------------------------------------------------------------------------------------ decoding


def test_transparent_pictures_are_composited_onto_the_background_not_channel_dropped():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    decoded = decode_picture(encoded(rgba, "PNG"))
    assert decoded.mode == "RGBA" and decoded.image.getpixel((5, 5)) == (255, 255, 255)  # not red
    assert decoded.image.getpixel((0, 0)) == (0, 0, 255)
    assert decode_picture(encoded(rgba, "PNG"), (0, 0, 0)).image.getpixel((5, 5)) == (0, 0, 0)
    la = Image.new("LA", (40, 40), (30, 0))
    assert decode_picture(encoded(la, "PNG")).image.getpixel((3, 3)) == (255, 255, 255)
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.info["transparency"] = 1
    decoded = decode_picture(encoded(palette, "PNG", transparency=1))
    assert decoded.mode == "P" and decoded.image.getpixel((3, 3)) == (255, 255, 255)


def test_cmyk_icc_sixteen_bit_grayscale_and_exif_orientation():
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # pure red in CMYK
    red = decode_picture(encoded(cmyk, "JPEG", quality=95)).image.getpixel((20, 20))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    sixteen = Image.fromarray(np.full((40, 40), 32768, np.uint16))  # mid-gray in 16 bits
    decoded = decode_picture(encoded(sixteen, "PNG"))
    assert decoded.mode.startswith("I") and decoded.image.getpixel((1, 1)) == (128, 128, 128)  # scaled, not clipped
    gray = decode_picture(encoded(Image.new("L", (40, 40), 77), "PNG"))
    assert gray.image.mode == "RGB" and gray.image.getpixel((1, 1)) == (77, 77, 77)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged = decode_picture(encoded(Image.new("RGB", (40, 40), (10, 120, 200)), "PNG", icc_profile=srgb))
    assert max(abs(a - b) for a, b in zip(tagged.image.getpixel((2, 2)), (10, 120, 200))) <= 2
    wide = Image.new("RGB", (60, 30), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    upright = decode_picture(encoded(wide, "JPEG", exif=exif.tobytes()))
    assert upright.size == (30, 60)


def test_bad_files_say_why():
    good = encoded(picture(0), "JPEG")
    for data, reason in ((b"", "empty file"), (b"hello, not a picture", "not a picture"),
                         (good[: len(good) // 2], "corrupt or truncated")):
        with pytest.raises(PictureError, match=reason):
            decode_picture(data)
    side = int(MAX_PICTURE_PIXELS ** 0.5) + 10
    bomb = encoded(Image.new("1", (side, side)), "PNG")  # a few kB that would decode to 50+ megapixels
    assert len(bomb) < 200_000
    with pytest.raises(PictureError, match="megapixel limit"):
        decode_picture(bomb)


# ------------------------------------------------------------------------------- folders, zips


def bad_folder(root: Path) -> Path:
    """A class-folder set with one of every kind of unusual or bad file."""
    birds, fish = root / "Birds", root / "Fish" / "deeper"
    birds.mkdir(parents=True)
    fish.mkdir(parents=True)
    for index in range(6):
        (birds / f"b{index}.jpg").write_bytes(encoded(picture(index), "JPEG"))
        (fish / f"f{index}.png").write_bytes(encoded(picture(10 + index), "PNG"))
    (birds / "UPPER.JPG").write_bytes(encoded(picture(20), "JPEG"))
    (birds / "copy.jpg").write_bytes((birds / "b0.jpg").read_bytes())  # an exact duplicate
    (birds / "alpha.png").write_bytes(encoded(Image.new("RGBA", (64, 64), (0, 0, 0, 0)), "PNG"))
    (birds / "pic.webp").write_bytes(encoded(picture(21), "WEBP"))
    (birds / "pic.gif").write_bytes(encoded(picture(22).convert("P"), "GIF"))
    (birds / "pic.bmp").write_bytes(encoded(picture(23), "BMP"))
    (birds / "pic.tif").write_bytes(encoded(picture(24), "TIFF"))
    (birds / "cmyk.jpg").write_bytes(encoded(picture(25).convert("CMYK"), "JPEG"))
    (birds / "sixteen.png").write_bytes(encoded(Image.fromarray(np.full((64, 64), 900, np.uint16)), "PNG"))
    good = encoded(picture(26), "JPEG")
    (fish / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (fish / "empty.jpg").write_bytes(b"")
    (fish / "text.jpg").write_text("I am a text file with a picture's name")
    (fish / "tiny.png").write_bytes(encoded(picture(27, (MIN_PICTURE_SIDE - 4, 40)), "PNG"))
    (root / "Fish" / "notes.txt").write_text("not a picture")
    (root / ".DS_Store").write_bytes(b"\0")
    return root


def tree_state(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_folder_with_every_kind_of_bad_file_checks_in_one_report(tmp_path, capsys):
    root = bad_folder(tmp_path / "pictures")
    before = tree_state(root)
    report = check_dataset(root, progress=False)
    assert report.layout == "class-folders" and [c["name"] for c in report.classes] == ["Birds", "Fish"]
    assert report.found == 25 and report.decoded == 21
    reasons = dict(report.unusable)
    assert set(reasons) == {"Fish/deeper/truncated.jpg", "Fish/deeper/empty.jpg", "Fish/deeper/text.jpg",
                            "Fish/deeper/tiny.png"}
    assert "corrupt or truncated" in reasons["Fish/deeper/truncated.jpg"]
    assert "empty file" in reasons["Fish/deeper/empty.jpg"]
    assert "not a picture" in reasons["Fish/deeper/text.jpg"]
    assert f"below the {MIN_PICTURE_SIDE}-pixel minimum" in reasons["Fish/deeper/tiny.png"]
    assert report.ignored == ["Fish/notes.txt"]  # the dot file is nobody's picture
    assert {"RGB", "RGBA", "CMYK", "P"} <= set(report.modes) and any(m.startswith("I") for m in report.modes)
    assert ["Birds/b0.jpg", "Birds/copy.jpg"] in report.exact_duplicates
    assert not report.trainable and "cannot be used" in report.problems[0]
    duplicates = len(report.exact_duplicates) + len(report.near_duplicates)
    assert any(line.startswith(f"{duplicates} duplicate pair{'s' if duplicates > 1 else ''}:")
               for line in report.advice_for("terminal"))
    terminal, page = report.advice_for("terminal")[-1], report.advice_for("page")[-1]
    assert terminal.endswith("or train with --skip-unreadable") and "--" not in page
    assert page.endswith("or tick 'Leave out pictures that cannot be used'")
    assert Path(report.preview).is_file() and json.loads(Path(report.report).read_text())["found"] == 25
    assert str(tmp_path) not in report.preview  # written to the cache, not beside the pictures
    assert main(["data", "check", str(root)]) == 1  # training would refuse
    text = capsys.readouterr().out
    assert "unusable: 4" in text and "Fish/deeper/empty.jpg: empty file (0 bytes)" in text
    assert main(["data", "check", str(root), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["decoded"] == 21
    assert tree_state(root) == before  # nothing written, nothing touched


def test_training_refuses_unusable_pictures_unless_told_to_skip_them(tmp_path, capsys):
    root = bad_folder(tmp_path / "pictures")
    before = tree_state(root)
    arguments = ["train", "--data", str(root), "--out", str(tmp_path / "run"), "--preset", "small", "--channels",
                 "8,16", "--steps", "2", "--batch-size", "4", "--checkpoint-every", "2", "--sample-every", "2",
                 "--sample-count", "2", "--sample-steps", "2", "--no-progress", "--conditional"]
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "4 of 25 pictures cannot be used" in error and "--skip-unreadable" in error
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert main(arguments + ["--skip-unreadable"]) == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [name for _, name in info["species"]] == ["Birds", "Fish"]
    assert tree_state(root) == before


def test_flat_folder_and_zip_read_the_same_pictures(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for index in range(5):
        (flat / f"p{index}.PNG").write_bytes(encoded(picture(index), "PNG"))
    archive = tmp_path / "flat.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(flat.iterdir()):
            handle.write(path, f"flat/{path.name}")  # a zip of the folder itself
    from_folder, from_zip = load_crops(flat, progress=False), load_crops(archive, progress=False)
    assert from_folder.layout == from_zip.layout == "flat" and np.array_equal(from_folder.images, from_zip.images)
    assert list(from_zip.keys) == [f"p{index}.PNG" for index in range(5)]
    with pytest.raises(DatasetError, match="no official train/test split"):
        from_zip.split(SplitSettings("official"))
    assert not list(tmp_path.glob("flat/*.npz"))  # nothing extracted or cached beside the data


@pytest.mark.parametrize("entry, message", [("../escape.png", "points outside"), ("/abs.png", "points outside"),
                                             ("link.png", "symbolic link"), ("bomb.png", "zip bomb")])
def test_unsafe_zips_are_refused_whole_before_decoding(tmp_path, entry, message):
    archive = tmp_path / "unsafe.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("good.png", encoded(picture(0), "PNG"))
        if entry == "link.png":
            info = zipfile.ZipInfo(entry)
            info.external_attr = (0o120777 << 16)
            handle.writestr(info, "/etc/passwd")
        elif entry == "bomb.png":
            handle.writestr(entry, b"\0" * (20 * 2**20))
        else:
            handle.writestr(zipfile.ZipInfo(entry), encoded(picture(1), "PNG"))
    with pytest.raises(DatasetError, match=message) as error:
        load_crops(archive, progress=False)
    assert "\n" not in str(error.value) and str(archive) in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unsafe.zip"]


def test_stratified_split_holds_out_each_classes_share_and_crop_modes(tmp_path):
    root = tmp_path / "classes"
    for name, count in (("A", 10), ("B", 20)):
        (root / name).mkdir(parents=True)
        for index in range(count):
            (root / name / f"{index}.png").write_bytes(encoded(picture(index, (120, 60)), "PNG"))
    crops = load_crops(root, CropSettings(size=16), progress=False)
    test = crops.split(SplitSettings("auto", 0, 0.2))[1]
    assert crops.settings.crop == "center"
    assert sorted(np.bincount(crops.labels[test]).tolist()) == [0, 2, 4]
    assert crops.upscaled.sum() == 0
    full = load_crops(root, CropSettings(size=16, crop="full"), progress=False)
    assert (full.images[0, 0, 0] == 255).all() and (full.images[0, 8, 8] != 255).any()  # white bars above
    with pytest.raises(DatasetError, match="needs bounding boxes"):
        load_crops(root, CropSettings(crop="square"), progress=False)
    upscaled = load_crops(root, CropSettings(size=128), progress=False)
    assert upscaled.upscaled.all()


def test_near_duplicates_found_by_perceptual_hash():
    hashes = np.array([0b1111, 0b1110, 0xF0F0F0F0F0F0F0F0, 0], np.uint64)
    assert near_duplicate_pairs(hashes, max_bits=1) == [(0, 1, 1)]
    assert near_duplicate_pairs(hashes, max_bits=4) == [(0, 1, 1), (0, 3, 4), (1, 3, 3)]


# ------------------------------------------------------------------------------- real folders


def test_cub_images_as_a_class_folder_set_give_the_cub_layouts_crops(real_cub):
    folder = load_crops(real_cub / "images", CropSettings(crop="center"), progress=False)
    layout = load_crops(real_cub, CropSettings(crop="center"), progress=False)
    assert folder.layout == "class-folders" and len(folder) == len(layout) == 2889
    # CUB lists its files in images.txt's id order, a folder in sorted path order: per file, the
    # crops (so any batch of the same files) are identical.
    order = {key: index for index, key in enumerate(layout.keys.tolist())}
    aligned = np.array([order[key] for key in folder.keys.tolist()])
    assert sorted(aligned.tolist()) == list(range(2889))
    assert np.array_equal(folder.images, layout.images[aligned])
    assert [folder.class_names[c] for c in folder.labels] == [layout.class_names[c] for c in layout.labels[aligned]]


def test_the_extra_folder_of_69_unseen_species(real_cub):
    if not EXTRA_FOLDER.is_dir():
        pytest.skip(f"{EXTRA_FOLDER} not found (the class-folder set in ../shared)")
    report = check_dataset(EXTRA_FOLDER, progress=False)
    assert report.layout == "class-folders" and len(report.classes) == 69
    assert report.decoded == 4087 and not report.unusable and report.ignored == ["SOURCE.md"]
    assert report.modes == {"RGB": 4087} and report.width == (227, 227, 227)
    assert report.split["split"] == "stratified" and report.trainable
    assert all(c["test"] == round(c["count"] * 0.2) for c in report.classes)
    assert open_source(EXTRA_FOLDER).class_names[1] == "American_Redstart"
