"""Converts the 8-bit MobileNetV1 TFLite feature extractor into birdgen's safetensors file.

    pip install ai-edge-litert
    python scripts/convert_mobilenet.py ../shared/models/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite

Reads every quantized tensor through the LiteRT interpreter (no flatbuffer parsing by hand),
checks that the graph is the MobileNetV1 that `birdgen.features.mobilenet_layout` builds,
and writes the uint8 weights, int32 biases and quantization parameters unchanged to
birdgen/assets/mobilenet_v1_1.0_224_quant.safetensors (about 3.3 MB). Nothing is retrained
or approximated; `tests/test_features.py` checks the PyTorch module against the TFLite file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from birdgen.features import MOBILENET_FILE, mobilenet_layout  # noqa: E402

SOURCE = ("google-coral/test_data (commit 104342d2), mobilenet_v1_1.0_224_quant_embedding_extractor.tflite,"
          " Apache License 2.0")


def quantization(detail: dict) -> tuple[np.ndarray, np.ndarray]:
    params = detail["quantization_parameters"]
    return params["scales"].astype(np.float32), params["zero_points"].astype(np.int32)


def convert(tflite_path: Path, out: Path) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite_path))
    interpreter.allocate_tensors()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE"]
    convolutions = [op for op in ops if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    pools = [op for op in ops if op["op_name"] == "AVERAGE_POOL_2D"]
    layout = mobilenet_layout()
    if len(convolutions) != len(layout) or len(pools) != 1:
        raise SystemExit(f"{tflite_path}: {len(convolutions)} convolutions and {len(pools)} pools; expected"
                         f" {len(layout)} and 1 (MobileNetV1)")
    (input_detail,) = interpreter.get_input_details()
    tensors: dict[str, torch.Tensor] = {}
    scale, zero = quantization(input_detail)
    tensors["input_scale"], tensors["input_zero_point"] = torch.from_numpy(scale), torch.from_numpy(zero)
    for index, (op, (kind, c_in, c_out, stride)) in enumerate(zip(convolutions, layout)):
        source, weight_index, bias_index = op["inputs"]
        (output_index,) = op["outputs"]
        weight = interpreter.get_tensor(weight_index)
        if kind == "depthwise":
            weight = weight.transpose(3, 0, 1, 2)  # TFLite 1HWC -> torch C1HW
        else:
            weight = weight.transpose(0, 3, 1, 2)  # TFLite OHWI -> torch OIHW
        in_size, out_size = details[source]["shape"][1], details[output_index]["shape"][1]
        found = ("depthwise" if op["op_name"] == "DEPTHWISE_CONV_2D" else "conv" if weight.shape[-1] == 3
                 else "pointwise", weight.shape[0], in_size // out_size)
        if found != (kind, c_out, stride):
            raise SystemExit(f"{tflite_path}: convolution {index} is {found}, expected {(kind, c_out, stride)}")
        w_scale, w_zero = quantization(details[weight_index])
        b_scale, _ = quantization(details[bias_index])
        o_scale, o_zero = quantization(details[output_index])
        if o_zero.any():
            raise SystemExit(f"{tflite_path}: convolution {index} output zero point {o_zero}, expected 0 (ReLU6)")
        prefix = f"layers.{index}."
        tensors[prefix + "weight_q"] = torch.from_numpy(np.ascontiguousarray(weight))
        tensors[prefix + "weight_scale"] = torch.from_numpy(w_scale)
        tensors[prefix + "weight_zero_point"] = torch.from_numpy(w_zero)
        tensors[prefix + "bias_q"] = torch.from_numpy(interpreter.get_tensor(bias_index).astype(np.int32))
        tensors[prefix + "bias_scale"] = torch.from_numpy(b_scale)
        tensors[prefix + "output_scale"] = torch.from_numpy(o_scale)
    tensors["pool_output_scale"] = torch.from_numpy(quantization(details[pools[0]["outputs"][0]])[0])
    digest = hashlib.sha256(tflite_path.read_bytes()).hexdigest()
    metadata = {"source": SOURCE, "tflite_sha256": digest, "converter": "scripts/convert_mobilenet.py"}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return metadata


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tflite", type=Path)
    parser.add_argument("--out", type=Path, default=MOBILENET_FILE)
    args = parser.parse_args()
    metadata = convert(args.tflite, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes) from {json.dumps(metadata)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
