"""Interpolation, SDEdit and RePaint on a small random network, and hostile uploads."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from birdgen.model_folder import build_model, save_model
from birdgen.cli import main
from birdgen.diffusion import DiffusionConfig
from birdgen.editing import (EditError, EditRequest, RePaintSampler, inpaint_steps, interpolation_noise,
                             interpolation_steps, load_picture, make_mask, sdedit_steps, slerp)
from birdgen.networks import preset
from birdgen.pipeline import GenerationRequest, generate


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=100, prediction="v"))


def last(steps):
    final = None
    for final in steps:
        pass
    return final


def picture(mode="RGB", size=(40, 30), format="PNG", **save) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save)
    return buffer.getvalue()


def test_sdedit_at_strength_zero_returns_the_input_and_at_one_ignores_it(model):
    image = load_picture(picture(), 16)
    steps = list(sdedit_steps(model, image, EditRequest(steps=10, strength=0.0, num_images=3)))
    assert len(steps) == 1 and torch.equal(steps[0].x, image.expand(3, -1, -1, -1))
    other = load_picture(picture(size=(30, 30), format="JPEG"), 16)
    full = [last(sdedit_steps(model, x, EditRequest(steps=10, strength=1.0, num_images=2, seed=4))).x
            for x in (image, other)]
    assert torch.equal(full[0], full[1])  # the input plays no part at strength 1
    half = list(sdedit_steps(model, image, EditRequest(steps=10, strength=0.5, num_images=2, seed=4)))
    assert len(half) == 5 and half[0].t == 49  # the last 5 of DDIM's 10 trailing timesteps (99, 89, … 9)
    closer = [last(sdedit_steps(model, image, EditRequest(steps=10, strength=s, num_images=4))).x for s in (0.2, 0.9)]
    distances = [(x - image).abs().mean() for x in closer]
    assert distances[0] < distances[1]  # less strength stays closer to the input
    for bad in (EditRequest(strength=1.5), EditRequest(num_images=0)):
        with pytest.raises(EditError):
            list(sdedit_steps(model, image, bad))


def test_interpolation_ends_are_the_two_seeds_own_samples(model):
    noise = interpolation_noise(model, 3, 7, 5)
    assert noise.shape == (5, 3, 16, 16)
    norms = noise.flatten(1).norm(dim=1)
    assert (norms / norms[0] - 1).abs().max() < 0.1  # slerp keeps the noise on its sphere
    frames = last(interpolation_steps(model, 3, 7, frames=5, steps=8)).x
    for frame, seed in ((frames[0], 3), (frames[-1], 7)):
        own = generate(model, GenerationRequest("ddim", 8, 1, seed)).images[0]
        assert torch.allclose(frame, own, atol=1e-4)
    assert not torch.allclose(frames[2], frames[0], atol=1e-2)
    a, b = torch.randn(100), torch.randn(100)
    assert torch.equal(slerp(a, b, 0), a) and torch.equal(slerp(a, b, 1), b)
    with pytest.raises(EditError, match="frames 1 out of range"):
        interpolation_noise(model, 1, 2, 1)


@pytest.mark.parametrize("mask_kind", ["centre", "left", "top"])
def test_repaint_keeps_the_known_pixels_and_fills_the_rest(model, mask_kind):
    image = load_picture(picture(), 16)
    mask = make_mask(mask_kind, 16)
    assert 0 < mask.mean() < 1
    steps = list(inpaint_steps(model, image, mask, steps=6, resample=3, num_images=2, seed=1))
    assert len(steps) == RePaintSampler(model.schedule, 6, image, mask, 3).evaluations == 5 * 3 + 1
    result = steps[-1].x
    keep = mask.expand_as(result).bool()
    assert torch.allclose(result[keep], image.expand_as(result)[keep], atol=1e-6)
    assert not torch.allclose(result[~keep], image.expand_as(result)[~keep], atol=0.05)
    assert not torch.allclose(result[0], result[1])  # two different fillings


def test_masks_and_their_errors(model):
    box = make_mask("box", 10, (0.2, 0.3, 0.6, 1.0))
    assert box[0, 0, 3:10, 2:6].eq(0).all() and box.sum() == 100 - 7 * 4
    assert make_mask("right", 8)[0, 0, :, 4:].eq(0).all() and make_mask("right", 8)[0, 0, :, :4].eq(1).all()
    with pytest.raises(EditError, match="unknown mask 'middle'"):
        make_mask("middle", 8)
    with pytest.raises(EditError, match="need 0 ≤ left < right ≤ 1"):
        make_mask("box", 8, (0.5, 0, 0.4, 1))
    with pytest.raises(EditError, match="resample 0 out of range"):
        RePaintSampler(model.schedule, 5, torch.zeros(1, 3, 16, 16), torch.ones(1, 1, 16, 16), resample=0)


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, "PNG")  # 144 megapixels in a small file
    return buffer.getvalue()


@pytest.mark.parametrize("data, works", [
    (picture("RGB"), True),
    (picture("RGBA"), True),
    (picture("LA"), True),
    (picture("P", transparency=0), True),
    (picture("I;16"), True),
    (picture("CMYK", format="JPEG"), True),
    (picture("L", format="JPEG"), True),
    (picture(size=(1, 1)), True),
    (picture(size=(3000, 20)), True),
    (b"", "the file is empty"),
    (b"GIF89a not really", "not a PNG or JPEG picture"),
    (b"plain text, not an image", "not a PNG or JPEG picture"),
    (picture()[:200], "truncated or corrupt picture"),
    (picture(format="JPEG")[:300], "truncated or corrupt picture"),
])
def test_hostile_uploads_work_or_fail_in_one_line(data, works, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if works is True:
        image = load_picture(data, 16, "upload")
        assert image.shape == (1, 3, 16, 16) and image.min() >= -1 and image.max() <= 1
    else:
        with pytest.raises(EditError) as error:
            load_picture(data, 16, "upload")
        assert str(error.value).startswith("upload: ") and works in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # nothing written to disk


def test_huge_pictures_are_refused_before_decoding():
    with pytest.raises(EditError, match=r"12000×12000 pixels is too large \(at most 40 megapixels\)"):
        load_picture(bomb(), 16, "bomb.png")
    buffer = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(buffer, "PNG")
    with pytest.raises(EditError, match="10000×10000 pixels is too large"):
        load_picture(buffer.getvalue(), 16)
    beyond_pillow = io.BytesIO()
    Image.new("1", (20_000, 10_000)).save(beyond_pillow, "PNG")  # past Pillow's own bomb limit
    with pytest.raises(EditError, match="too large"):
        load_picture(beyond_pillow.getvalue(), 16)


def test_transparency_becomes_white_and_16_bit_keeps_its_range():
    transparent = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(transparent, "PNG")
    assert torch.allclose(load_picture(transparent.getvalue(), 8), torch.ones(1, 3, 8, 8))
    deep = io.BytesIO()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(deep, "PNG")
    assert load_picture(deep.getvalue(), 8).mean().item() == pytest.approx(128 / 127.5 - 1, abs=0.01)


def test_editing_commands(tmp_path, capsys):
    network = build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=50))
    save_model(tmp_path / "m", network.network, network.network_config, network.diffusion_config)
    (tmp_path / "in.png").write_bytes(picture())
    base = ["--model", str(tmp_path / "m"), "--device", "cpu"]
    assert main(["interpolate", *base, "--seeds", "3", "7", "--frames", "4", "--steps", "3",
                 "--out", str(tmp_path / "strip.png"), "--gif", str(tmp_path / "strip.gif")]) == 0
    assert Image.open(tmp_path / "strip.png").size == (4 * 18 + 2, 20) and Image.open(tmp_path / "strip.gif").n_frames > 4
    assert main(["edit", *base, "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--num", "3", "--steps", "4",
                 "--out", str(tmp_path / "edit.png")]) == 0
    assert main(["inpaint", *base, "--image", str(tmp_path / "in.png"), "--mask", "box", "--box", "0.1", "0.1", "0.5",
                 "0.5", "--steps", "3", "--resample", "2", "--num", "2", "--out", str(tmp_path / "fill.png")]) == 0
    assert (tmp_path / "edit.png").is_file() and (tmp_path / "fill.png").is_file()
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert main(["edit", *base, "--image", str(tmp_path / "bad.png")]) == 2
    assert "bad.png: not a PNG or JPEG picture" in capsys.readouterr().err
    assert main(["edit", *base, "--image", str(tmp_path / "missing.png")]) == 2
    assert main(["edit", *base, "--image", str(tmp_path / "in.png"), "--strength", "2"]) == 2
    assert "strength 2.0 out of range [0, 1]" in capsys.readouterr().err
