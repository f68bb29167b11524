"""Nothing lost when writing: a full disk or a read-only folder is one line naming the file, with
no temporary file left, the previous checkpoint intact and resumable; a quick evaluation never
replaces a careful one."""

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

from birdgen.cli import main
from birdgen.data import CropSettings, SplitSettings, load_crops
from birdgen.diffusion import DiffusionConfig
from birdgen.model_folder import build_model, save_model
from birdgen.networks import preset
from birdgen.run_folder import Checkpoints
from birdgen.images import save_grid
from birdgen.utils import WriteError, atomic_write, atomic_write_bytes, atomic_write_text
from conftest import REPO

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def train_args(data, out, steps, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--preset", "small", "--channels", "8,16",
            "--image-size", "16", "--noise-steps", "100", "--batch-size", "4", "--steps", str(steps),
            "--checkpoint-every", "2", "--keep-checkpoints", "5", "--sample-every", "1000", "--no-progress",
            "--num-threads", "1", *extra]


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 11.5 MB (tmpfs): room for one checkpoint of the test network (6.8 MB), not for
    the second one's state.pt, where the test runs as root and may mount one."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=11500k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_mid_training_is_one_line_and_the_last_checkpoint_resumes_exactly(tiny_cub, tmp_path,
                                                                                       small_disk):
    run = small_disk / "run"
    process = subprocess.run([sys.executable, "-m", "birdgen", *train_args(tiny_cub, run, 40)], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 1, process.stderr
    error = process.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("birdgen: error: ") and "No space left on device" in error[0]
    assert "could not write the checkpoint of step" in error[0] and "--resume" in error[0]
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left and all(name.startswith("step-") for name in left)  # no temporary folder left behind
    complete = Checkpoints(run, 5).complete()
    assert [p.name for p in complete] == left
    last = int(left[-1][5:])
    # Move the run to a roomy disk and go on: it continues exactly where a run that never stopped is.
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    assert main(train_args(tiny_cub, moved, last + 2, "--resume")) == 0
    assert main(train_args(tiny_cub, tmp_path / "straight", last + 2)) == 0
    from safetensors.torch import load_file

    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(moved / "checkpoints" / f"step-{last + 2:07d}" / name))
        b = load_file(str(tmp_path / "straight" / "checkpoints" / f"step-{last + 2:07d}" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)


def crops_and_model(tiny_cub, folder):
    from birdgen.data import split_record

    crops = load_crops(tiny_cub, CropSettings(size=16), progress=False)
    model = build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=50))
    save_model(folder, model.network, model.network_config, model.diffusion_config, card="# m\n",
               data=split_record(crops, SplitSettings("random", 0, 0.3, "train")))
    return crops


def tiny_network():
    model = build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=50))
    return model.network, model.network_config, model.diffusion_config


# Each writer birdgen uses, with a write through it; the test makes the writer fail as it does on a full disk.
WRITERS = {
    "model weights (safetensors)": ("birdgen.model_folder.save_file", lambda out, data: save_model(out / "m",
                                                                                                  *tiny_network())),
    "crop cache (numpy.savez)": ("numpy.savez", lambda out, data: load_crops(data, CropSettings(size=16), progress=False)),
    "image grid (Pillow)": ("PIL.Image.Image.save", lambda out, data: save_grid(torch.zeros(2, 3, 8, 8),
                                                                                  out / "grid.png")),
    "card and records (text)": ("pathlib.Path.write_text", lambda out, data: atomic_write_text(out / "README.md",
                                                                                                 "# card\n")),
    "upload and checkpoint state (bytes)": ("pathlib.Path.write_bytes",
                                            lambda out, data: atomic_write_bytes(out / "upload.zip", b"PK")),
    "feature cache (numpy.save)": ("numpy.save", lambda out, data: atomic_write(
        out / "f.npy", "the feature cache", lambda temporary: np.save(temporary, np.zeros(3)))),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_each_writer_failing_as_on_a_full_disk_is_one_line_and_leaves_no_temporary(writer, tiny_cub, tmp_path,
                                                                                 monkeypatch):
    target, (patched, write) = tmp_path / "out", WRITERS[writer]
    target.mkdir()

    def full(*args, **kwargs):
        raise FULL

    monkeypatch.setattr(patched, full)
    with pytest.raises(WriteError) as error:
        write(target, tiny_cub)
    assert "No space left on device" in str(error.value) and "\n" not in str(error.value)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_a_read_only_folder_is_one_line_from_the_cli(tiny_cub, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the full-disk tests cover this path")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    assert main(["sample", "--preset", "small", "--num", "1", "--steps", "1", "--out", str(folder / "x.png")]) == 1
    assert "could not write the image (Permission denied)" in capsys.readouterr().err


def stored_record(num_generated: int, fid: float) -> dict:
    return {"feature_space": "mobilenet", "reference": "heldout", "num_generated": num_generated, "sampler": "ddim",
            "steps": 2, "eta": 0.0, "seed": 0, "guidance": 3.0, "guide": None, "guide_weight": 1.0,
            "interval": [0, 49], "fid": fid, "kid_mean": 0.5, "kid_std": 0.1, "precision": 0.7, "recall": 0.2,
            "num_real": 5, "feature_label": "MobileNet", "reference_split": "5 held-out crops"}


def test_a_quick_evaluation_is_added_beside_a_careful_one_and_never_replaces_it_unasked(tiny_cub, tmp_path, capsys):
    from birdgen.export import update_card_quality

    crops_and_model(tiny_cub, tmp_path / "m")
    (tmp_path / "m" / "metrics.json").write_text(json.dumps({"mobilenet": stored_record(1000, 407.6)}))
    update_card_quality(tmp_path / "m")
    assert "407.60" in (tmp_path / "m" / "README.md").read_text()
    quick = ["eval", "--model", str(tmp_path / "m"), "--data", str(tiny_cub), "--num-samples", "12", "--steps", "2",
             "--features", "mobilenet", "--no-memorization"]
    assert main(quick) == 0
    out = capsys.readouterr().out
    assert "the card and the pages still show FD 407.6" in out
    stored = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert stored["mobilenet"]["num_generated"] == 1000 and stored["mobilenet"]["fid"] == 407.6
    assert [r["num_generated"] for r in stored["evaluations"]] == [1000, 12]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "407.60" in card and "| 1,000 |" in card
    assert main(quick) == 2  # the same measurement again: refused before any work
    assert "already holds this measurement" in capsys.readouterr().err
    assert main(quick + ["--replace"]) == 0
    assert "replaced: FD" in capsys.readouterr().out
    stored = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert [r["num_generated"] for r in stored["evaluations"]] == [1000, 12]


def test_measuring_an_unconditional_model_again_replaces_its_record_that_named_a_species_weight(tiny_cub, tmp_path,
                                                                                                capsys):
    crops_and_model(tiny_cub, tmp_path / "m")
    older = {**stored_record(12, 500.0), "species": "none (unconditional)"}  # guidance 3.0, as records had it
    (tmp_path / "m" / "metrics.json").write_text(json.dumps({"mobilenet": older, "evaluations": [older]}))
    quick = ["eval", "--model", str(tmp_path / "m"), "--data", str(tiny_cub), "--num-samples", "12", "--steps", "2",
             "--features", "mobilenet", "--no-memorization"]
    assert main(quick) == 2  # the same measurement: a species weight takes no part without species
    assert main(quick + ["--replace"]) == 0
    out = capsys.readouterr().out
    assert "replaced: FD 500.0" in out and "still show" not in out
    stored = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert len(stored["evaluations"]) == 1 and stored["mobilenet"]["guidance"] is None


def test_a_record_written_before_guides_matches_an_unguided_measurement_of_the_same_settings(tiny_cub, tmp_path):
    crops_and_model(tiny_cub, tmp_path / "m")
    older = {**stored_record(12, 500.0), "guidance": None}
    del older["guide_weight"], older["interval"]  # as evaluations were stored before autoguidance
    (tmp_path / "m" / "metrics.json").write_text(json.dumps({"mobilenet": older, "evaluations": [older]}))
    quick = ["eval", "--model", str(tmp_path / "m"), "--data", str(tiny_cub), "--num-samples", "12", "--steps", "2",
             "--features", "mobilenet", "--no-memorization"]
    assert main(quick) == 2
    assert main(quick + ["--replace"]) == 0
    assert len(json.loads((tmp_path / "m" / "metrics.json").read_text())["evaluations"]) == 1


def test_eval_into_a_log_prints_one_line_per_stage_and_no_cursor_codes(tiny_cub, tmp_path):
    crops_and_model(tiny_cub, tmp_path / "m")
    log = tmp_path / "eval.log"
    with open(log, "w") as handle:
        subprocess.run([sys.executable, "-m", "birdgen", "eval", "--model", str(tmp_path / "m"), "--data",
                        str(tiny_cub), "--num-samples", "12", "--steps", "2", "--features", "mobilenet",
                        "--batch-size", "5"], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, check=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    text = log.read_text()
    assert "\x1b[" not in text and "\r" not in text
    assert "Generating: 12 images in" in text and text.count("Generating:") == 1
