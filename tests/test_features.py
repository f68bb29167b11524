"""The feature extractors. The offline MobileNet: its conversion from the TFLite file, its layout
checks and its errors; the fidelity test runs the original TFLite file through LiteRT. The
standard FID InceptionV3: the installed file against torchmetrics' own InceptionV3 with the
same weights, its statistics on real crops, and its errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from birdgen.data import CropSettings, load_crops
from birdgen.features import (INCEPTION_FILE, INCEPTION_PACKAGE, MOBILENET_FILE, FeatureError, InceptionFeatures,
                              InceptionWeightsMissing, MobileNetFeatures, choose_feature_space, find_inception_weights,
                              mobilenet_layout)
from birdgen.evaluation import extract_features, kid_and_fid
from birdgen import features

TFLITE = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / \
    "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
OUTPUT_SCALE = 0.023528477177023888  # the TFLite model's output quantization step


def tflite_features(images_224: torch.Tensor) -> np.ndarray:
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")
    interpreter = interpreter_module.Interpreter(model_path=str(TFLITE))
    interpreter.allocate_tensors()
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    rows = []
    for image in images_224.permute(0, 2, 3, 1).numpy():
        interpreter.set_tensor(source["index"], image[None])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(target["index"]).reshape(-1).astype(np.float64) * OUTPUT_SCALE)
    return np.stack(rows)


def test_conversion_matches_the_tflite_model_on_real_crops(real_cub):
    if not TFLITE.is_file():
        pytest.skip(f"the original TFLite file is not at {TFLITE}")
    crops = load_crops(real_cub, CropSettings(size=64), progress=False)
    images = torch.from_numpy(crops.images[::12][:192]).permute(0, 3, 1, 2).contiguous()
    resized = F.interpolate(images.float(), size=(224, 224), mode="bilinear", align_corners=False)
    resized = resized.round().clamp(0, 255).to(torch.uint8)
    reference = tflite_features(resized)
    ours = MobileNetFeatures()(images).double().numpy()  # resizes the 64x64 crops itself, the same way
    assert ours.shape == reference.shape == (len(images), 1024)
    assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > 0.999
    # Rounding differences of one step in some layers add up to small feature differences:
    assert np.abs(ours - reference).mean() < 0.03 * np.abs(reference).mean()
    # …which leave the metrics built on them nearly unchanged: FD between two halves of the crops.
    half = len(images) // 2
    fd_ours = kid_and_fid(torch.from_numpy(ours[:half]), torch.from_numpy(ours[half:]), subsets=10)["fid"]
    fd_tflite = kid_and_fid(torch.from_numpy(reference[:half]), torch.from_numpy(reference[half:]), subsets=10)["fid"]
    assert fd_ours == pytest.approx(fd_tflite, rel=0.03)


def test_features_are_deterministic_and_fit_any_image_size():
    extractor = MobileNetFeatures()
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    first, second = extractor(images), extractor(images)
    assert first.shape == (5, 1024) and torch.equal(first, second)
    assert (first >= 0).all() and torch.allclose(first / OUTPUT_SCALE, (first / OUTPUT_SCALE).round(), atol=1e-3)
    assert extractor(torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)).shape == (2, 1024)
    with pytest.raises(TypeError, match="uint8"):
        extractor(images.float())


def test_shipped_weights_are_the_quantized_tflite_tensors():
    tensors = load_file(str(MOBILENET_FILE))
    assert MOBILENET_FILE.stat().st_size < 5_000_000
    layout = mobilenet_layout()
    assert len(layout) == 27 and layout[-1] == ("pointwise", 1024, 1024, 1)
    assert all(tensors[f"layers.{i}.weight_q"].dtype == torch.uint8 for i in range(len(layout)))
    assert all(tensors[f"layers.{i}.bias_q"].dtype == torch.int32 for i in range(len(layout)))


def test_missing_or_wrong_weight_files_fail_in_one_line(tmp_path):
    with pytest.raises(FeatureError, match="nothing.safetensors: MobileNet feature weights not found"):
        MobileNetFeatures(tmp_path / "nothing.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FeatureError, match="garbage.safetensors: unreadable MobileNet weights"):
        MobileNetFeatures(tmp_path / "garbage.safetensors")
    save_file({"something": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FeatureError, match="other.safetensors: not a birdgen MobileNet weights file"):
        MobileNetFeatures(tmp_path / "other.safetensors")


def test_auto_features_fall_back_to_mobilenet_and_say_so(tmp_path, monkeypatch):
    monkeypatch.delenv("BIRDGEN_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(features, "INCEPTION_MODULE", "birdgen_no_such_package")
    space, note = choose_feature_space("auto")
    assert space == "mobilenet" and "not comparable" in note and "\n" not in note
    with pytest.raises(InceptionWeightsMissing):
        choose_feature_space("inception")
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"stand-in")
    assert choose_feature_space("auto", weights)[0] == "inception"
    with pytest.raises(ValueError, match="unknown feature space 'vgg'"):
        choose_feature_space("vgg")


def installed_inception() -> Path:
    try:
        return find_inception_weights()
    except InceptionWeightsMissing as error:  # only where requirements.txt was not installed
        pytest.skip(str(error))


def torchmetrics_inception(script_file: Path, tmp_path: Path):
    """torchmetrics' FID InceptionV3 (torch-fidelity's module) with the TorchScript's weights: its
    94 convolutions in order, each TF batch norm's beta, mean and variance (scale 1, eps 0.001 as
    TF had it), the unused classifier at zero. An oracle built independently of birdgen's code."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchmetrics.image.fid import NoTrainInceptionV3

    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"), mock.patch("torch.load", return_value={}):
        layout = FeatureExtractorInceptionV3("layout", ["2048"], feature_extractor_weights_path="unused").state_dict()
    source = torch.jit.load(str(script_file), map_location="cpu").state_dict()
    ours = [name.removesuffix(".conv.weight") for name in layout if name.endswith(".conv.weight")]
    theirs = [name.removesuffix(".weight") for name in source if name.endswith(".weight")]
    assert len(ours) == len(theirs) == 94
    weights = {"fc.weight": torch.zeros_like(layout["fc.weight"]), "fc.bias": torch.zeros_like(layout["fc.bias"])}
    for a, b in zip(ours, theirs):
        assert layout[f"{a}.conv.weight"].shape == source[f"{b}.weight"].shape, (a, b)
        weights.update({f"{a}.conv.weight": source[f"{b}.weight"], f"{a}.bn.weight": torch.ones_like(source[f"{b}.beta"]),
                        f"{a}.bn.bias": source[f"{b}.beta"], f"{a}.bn.running_mean": source[f"{b}.mean"],
                        f"{a}.bn.running_var": source[f"{b}.var"], f"{a}.bn.num_batches_tracked": torch.tensor(0)})
    torch.save(weights, tmp_path / "converted.pth")
    # antialias=False: the original TensorFlow FID's resize, which torchmetrics 1.9 offers but no
    # longer takes by default (its default is torch's antialiased bilinear).
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(tmp_path / "converted.pth"), antialias=False)


@pytest.mark.slow
def test_inception_is_torchmetrics_standard_network_on_real_crops(real_cub, tmp_path):
    script_file = installed_inception()
    crops = load_crops(real_cub, CropSettings(size=64), progress=False)
    images = torch.from_numpy(crops.images[::90][:24]).permute(0, 3, 1, 2).contiguous()
    ours = InceptionFeatures(script_file).eval()
    with torch.no_grad():
        expected = torchmetrics_inception(script_file, tmp_path)(images).reshape(len(images), -1)
        got = ours(images)
    assert got.shape == (24, 2048)
    assert (got - expected).abs().max() <= 1e-4
    assert ours.identity.endswith(features.INCEPTION_SHA256)


@pytest.mark.slow
def test_inception_statistics_of_real_crops_stay_in_the_measured_band(real_cub):
    """Measured once (2026-12-07, 64 crops, every 45th): mean feature 0.2613, std 0.2987, mean
    norm 17.83. Feeding [0, 1] instead of the graph's (x - 128) / 128 moves the mean 4% and the
    norm 3.6%, out of these 1.5% bands."""
    crops = load_crops(real_cub, CropSettings(size=64), progress=False)
    found = extract_features(InceptionFeatures(installed_inception()).eval(), crops.images[::45][:64])
    assert found.mean().item() == pytest.approx(0.2613, rel=0.015)
    assert found.std().item() == pytest.approx(0.2987, rel=0.015)
    assert found.norm(dim=1).mean().item() == pytest.approx(17.83, rel=0.015)


def test_inception_file_is_checked_before_use(tmp_path, monkeypatch):
    impostor = tmp_path / INCEPTION_FILE
    impostor.write_bytes(b"not the network")
    with pytest.raises(FeatureError) as error:
        InceptionFeatures(impostor)
    message = str(error.value)
    assert message.startswith(f"{impostor}: sha256 ") and "not the standard FID InceptionV3" in message
    assert INCEPTION_PACKAGE in message and "\n" not in message
    monkeypatch.delenv("BIRDGEN_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(features, "INCEPTION_MODULE", "birdgen_no_such_package")
    with pytest.raises(InceptionWeightsMissing) as missing:
        find_inception_weights()
    assert INCEPTION_PACKAGE in str(missing.value) and "--inception-weights" in str(missing.value)
    with pytest.raises(InceptionWeightsMissing, match="nowhere.pt: Inception weights file not found"):
        find_inception_weights(tmp_path / "nowhere.pt")
    monkeypatch.setenv("BIRDGEN_INCEPTION_WEIGHTS", str(impostor))
    assert find_inception_weights() == impostor
