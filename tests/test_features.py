"""The offline MobileNet feature extractor: its conversion from the TFLite file, its layout
checks and its errors. The fidelity test runs the original TFLite file through LiteRT."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from birdgen.data import load_crops
from birdgen.features import (MOBILENET_FILE, FeatureError, InceptionWeightsMissing, MobileNetFeatures,
                              choose_feature_space, mobilenet_layout)
from birdgen.evaluation import kid_and_fid

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
    crops = load_crops(real_cub, 64, progress=False)
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
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    space, note = choose_feature_space("auto")
    assert space == "mobilenet" and "not comparable" in note and "\n" not in note
    with pytest.raises(InceptionWeightsMissing):
        choose_feature_space("inception")
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"stand-in")
    assert choose_feature_space("auto", weights)[0] == "inception"
    with pytest.raises(ValueError, match="unknown feature space 'vgg'"):
        choose_feature_space("vgg")
