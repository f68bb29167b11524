"""Your own pictures end to end: a class-folder fixture fine-tuned from a model folder onto new
classes, exported, sampled by class name and evaluated against its own held-out pictures."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from birdgen import ui
from birdgen.cli import main
from birdgen.diffusion import DiffusionConfig
from birdgen.model_folder import build_model, load_model, save_model
from birdgen.networks import UNet, preset
from birdgen.sources import DatasetError
from birdgen.run_config import TrainConfig, TrainRun
from birdgen.train import initialise_from

COLOURS = {"Red_Birds": (220, 40, 30), "Blue_Birds": (30, 60, 220)}


def class_folder(root, per_class=20):
    """Two classes of 'birds': a coloured disc on a noisy background, in pictures of other sizes."""
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            width, height = int(rng.integers(48, 90)), int(rng.integers(48, 90))
            pixels = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
            yy, xx = np.mgrid[:height, :width]
            disc = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(width, height) / 3) ** 2
            pixels[disc] = colour
            Image.fromarray(pixels).save(root / name / f"{index:03d}.jpg", quality=92)
    return root


def species_folder(path, classes=3):
    model = build_model(preset("small", channels=(8, 16), image_size=16, num_classes=classes),
                        DiffusionConfig(num_steps=100))
    with torch.no_grad():
        model.network.class_embedding.weight.normal_()
    return save_model(path, model.network, model.network_config, model.diffusion_config,
                      species=[[i + 1, f"{i + 1:03d}.Bird_{i + 1}"] for i in range(classes)])


def test_fine_tuning_onto_other_classes_keeps_the_network_and_starts_from_its_no_class(tmp_path):
    source = load_model(species_folder(tmp_path / "three-species"))
    config = TrainConfig(init_from=str(source.path), image_size=16, noise_steps=100)
    run = TrainRun.of(config)
    network = UNet(dataclasses.replace(run.network, num_classes=2))
    initialise_from(network, run.base)
    theirs, mine = source.network.state_dict(), network.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs if k != "class_embedding.weight")
    rows = mine["class_embedding.weight"]
    assert rows.shape[0] == 3 and all(torch.equal(row, theirs["class_embedding.weight"][-1]) for row in rows)


def test_a_folder_fine_tuned_exported_sampled_and_evaluated_end_to_end(tmp_path, capsys):
    data = class_folder(tmp_path / "my-birds")
    base = save_model(tmp_path / "base", *(lambda m: (m.network, m.network_config, m.diffusion_config))(
        build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=100, prediction="v"))))
    run = tmp_path / "runs" / "ft"
    assert main(["data", "check", str(data)]) == 0
    assert "2 classes, 20–20 pictures each" in capsys.readouterr().out
    assert main(["train", "--data", str(data), "--out", str(run), "--init-from", str(base), "--conditional",
                 "--image-size", "16", "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2",
                 "--sample-every", "4", "--sample-count", "2", "--sample-steps", "2", "--no-progress",
                 "--num-threads", "1", "--log-every", "2"]) == 0
    assert "the 15-minute limit buys about" in capsys.readouterr().out  # this machine's pace, after the first steps
    saved = json.loads((run / "config.json").read_text())
    assert saved["prediction"] == "v" and saved["noise_steps"] == 100  # brought by --init-from
    assert saved["min_snr_gamma"] == 5.0 and saved["max_minutes"] == 15.0  # the fine-tune defaults
    tuned = load_file(str(run / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert tuned["class_embedding.weight"].shape[0] == 3
    assert main(["export", str(run), "--to", str(tmp_path / "models" / "mine"), "--heldout-batches", "1"]) == 0
    model = load_model(tmp_path / "models" / "mine")
    assert model.class_word == "class" and [n for _, n in model.species] == ["Blue_Birds", "Red_Birds"]
    assert model.data.layout == "class-folders" and model.data.split == "stratified" and model.data.num_train == 32
    card = (tmp_path / "models" / "mine" / "README.md").read_text()
    assert "the pictures of `my-birds` (2 class folders" in card and "fine-tuned from `base`" in card
    assert "## Class" in card and "| id | class |" in card
    assert f"birdgen eval --model THIS_FOLDER --data {data.resolve()}`" in card  # its own pictures, not CUB's
    out = tmp_path / "red.png"
    assert main(["sample", "--model", str(tmp_path / "models" / "mine"), "--species", "Red_Birds", "--num", "2",
                 "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 16
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "models" / "mine"), "--data", str(data), "--num-samples", "10",
                 "--steps", "2", "--features", "mobilenet", "--batch-size", "10"]) == 0
    metrics = json.loads((tmp_path / "models" / "mine" / "metrics.json").read_text())["mobilenet"]
    assert metrics["num_real"] == 8 and "stratified split" in metrics["reference_split"]  # its own held-out pictures
    assert metrics["species_accuracy"]["classes"] == 2
    assert "my-birds" in metrics["reference_split"]
    assert ui.model_data(model) == data
    data.rename(tmp_path / "moved")
    with pytest.raises(DatasetError, match="mine was trained on .*my-birds, which is not there any more"):
        ui.model_data(model)  # never CUB's pictures in its place


def test_a_folder_trains_and_distils_unconditionally(tmp_path):
    data = class_folder(tmp_path / "pictures", per_class=8)
    common = ["--image-size", "16", "--noise-steps", "100", "--batch-size", "4", "--checkpoint-every", "2",
              "--sample-every", "100", "--no-progress", "--num-threads", "1"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "small", "--channels",
                 "8,16", "--steps", "2", *common]) == 0
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "m"), "--heldout-batches", "1"]) == 0
    assert load_model(tmp_path / "m").data.split == "stratified"
    assert main(["distill", "--teacher", str(tmp_path / "m"), "--data", str(data), "--out", str(tmp_path / "d"),
                 "--teacher-steps", "4", "--steps-target", "2", "--round-steps", "2", "--batch-size", "4",
                 "--no-progress"]) == 0
    assert (tmp_path / "d" / "checkpoints" / "step-0000002" / "state.pt").is_file()


def test_a_fine_tune_reads_its_base_folders_config_once_per_start(tmp_path, monkeypatch):
    data = class_folder(tmp_path / "my-birds", per_class=6)
    base = save_model(tmp_path / "base", *(lambda m: (m.network, m.network_config, m.diffusion_config))(
        build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=100, prediction="v"))))
    reads = []
    read_text = Path.read_text

    def counted(path, *args, **kwargs):
        if Path(path).resolve() == (base / "config.json").resolve():
            reads.append(path)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    command = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--init-from", str(base), "--conditional",
               "--steps", "1", "--batch-size", "2", "--sample-every", "5", "--no-progress", "--num-threads", "1"]
    assert main(command) == 0
    assert len(reads) == 1
    assert main([*command, "--steps", "2", "--resume"]) == 0
    assert len(reads) == 2
