import hashlib
import http.server
import io
import tarfile
import threading
from functools import partial

import pytest
from PIL import Image

from birdgen.data import CropSettings, SplitSettings
from birdgen import download as dl
from birdgen.model_folder import build_model, save_model
from birdgen.cli import main
from birdgen.diffusion import DiffusionConfig
from birdgen.networks import PRESETS, preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_sample_runs_on_every_random_preset(name, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--preset", name, "--num", "2", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size == (2 * 66 + 2, 66 + 2)
    text = capsys.readouterr().out
    assert "parameters" in text and "2 images, 2 dpmpp steps" in text  # the default sampler


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_sample_from_model_folder_with_individual_images(sampler, tmp_path):
    model = build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=50))
    save_model(tmp_path / "m", model.network, model.network_config, model.diffusion_config)
    args = ["sample", "--model", str(tmp_path / "m"), "--sampler", sampler, "--steps", "3", "--num", "3",
            "--seed", "5", "--out", str(tmp_path / "g.png"), "--individual", str(tmp_path / "each")]
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert Image.open(tmp_path / "each" / "0000.png").size == (16, 16)


@pytest.mark.parametrize("args, message", [
    (["sample", "--preset", "small", "--steps", "5000"], "steps 5000 out of range [1, 1000]"),
    (["sample", "--preset", "small", "--num", "0"], "number of images 0 out of range"),
    (["sample", "--preset", "small", "--sampler", "ddim", "--eta", "2"], "eta 2.0 out of range"),
    (["sample", "--preset", "small", "--eta", "0.5"], "eta 0.5 applies to DDIM only, not dpmpp"),
    (["sample", "--model", "no/such/folder"], "no such model folder"),
    (["eval", "--model", "m", "--data", "d", "--inception-weights", "missing.pth"], "Inception weights file not found"),
])
def test_bad_arguments_give_one_line_errors(args, message, capsys, tmp_path):
    assert main(args + (["--out", str(tmp_path / "x.png")] if args[0] == "sample" else [])) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_presets_lists_parameter_counts(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS) and "parameters" in out


def test_prepare_reports_counts(tiny_cub, capsys):
    assert main(["data", "prepare", "--root", str(tiny_cub), "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "18 images in 3 species (official split: 12 train, 6 test)" in out and "cache:" in out


def test_prepare_real_data(real_cub, capsys):
    assert main(["data", "prepare", "--root", str(real_cub)]) == 0
    assert "2889 images in 50 species" in capsys.readouterr().out


@pytest.fixture
def archive_server(tiny_cub, tmp_path):
    """A local HTTP server (Range requests supported) serving a CUB-format .tgz."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tiny_cub, arcname="CUB_200_2011")
    payload = buffer.getvalue()
    served = tmp_path / "www"
    served.mkdir()
    (served / "CUB_200_2011.tgz").write_bytes(payload)

    class RangeHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_head(self):
            start = self.headers.get("Range")
            if not start:
                return super().send_head()
            offset = int(start.split("=")[1].rstrip("-"))
            body = payload[offset:]
            self.send_response(206)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return io.BytesIO(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/CUB_200_2011.tgz", payload
    server.shutdown()


def test_download_verifies_and_extracts(archive_server, tmp_path):
    url, payload = archive_server
    root = dl.download(tmp_path / "dest", url=url, expected_md5=hashlib.md5(payload).hexdigest())
    assert (root / "images.txt").is_file() and root.name == "CUB_200_2011"


def test_download_resumes_a_partial_file(archive_server, tmp_path):
    url, payload = archive_server
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "CUB_200_2011.tgz.part").write_bytes(payload[:1000])
    dl.download(dest, url=url, expected_md5=hashlib.md5(payload).hexdigest())
    assert (dest / "CUB_200_2011.tgz").read_bytes() == payload


def test_download_deletes_a_corrupt_result(archive_server, tmp_path):
    url, _ = archive_server
    with pytest.raises(dl.DownloadError, match="does not match the published"):
        dl.download(tmp_path / "dest", url=url, expected_md5="0" * 32)
    assert not list((tmp_path / "dest").glob("*.part"))


def test_offline_download_fails_at_once_with_instructions(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dl, "ARCHIVE_URL", "http://127.0.0.1:9/CUB_200_2011.tgz")  # nothing listens on port 9
    assert main(["data", "download", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "by hand" in err and str(tmp_path / "CUB_200_2011.tgz") in err


def test_eval_with_mobilenet_features_runs_offline_and_writes_every_figure(tiny_cub, tmp_path, capsys, monkeypatch):
    import json

    from birdgen.data import load_crops, split_record

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    crops = load_crops(tiny_cub, CropSettings(size=16), progress=False)
    model = build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=50))
    save_model(tmp_path / "m", model.network, model.network_config, model.diffusion_config, card="# m\n",
               data=split_record(crops, SplitSettings("random", 0, 0.3, "train")))
    args = ["eval", "--model", str(tmp_path / "m"), "--data", str(tiny_cub), "--num-samples", "12", "--steps", "2",
            "--features", "mobilenet", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "in mobilenet features" in out and "near-copies" in out
    stored = json.loads((tmp_path / "m" / "metrics.json").read_text())["mobilenet"]
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "memorization", "reference_split", "seed",
                "sampler", "steps", "num_generated", "num_real", "feature_extractor"):
        assert key in stored
    assert stored["feature_extractor"].startswith("mobilenet-v1") and stored["num_generated"] == 12
    assert "MobileNet distances are on their own scale" in (tmp_path / "m" / "README.md").read_text()
    assert main(args[:5] + ["--num-samples", "3"]) == 2
    assert "num_samples 3 is too few" in capsys.readouterr().err
