"""Static int8 quantization of the ONNX model, calibrated on real training images.

    python -m export --data-dir ../shared/mnist --quantize

writes artifacts/mnist_cnn.int8.onnx (QDQ, per-channel int8 weights, uint8 activations,
MinMax calibration) with the same metadata plus its own measured accuracy and speed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from serving.handler.artifact import INPUT_NAME, onnx_runner, onnx_session, run_batched, time_batched

from .artifacts import set_onnx_metadata

CALIBRATION_IMAGES = 2048
CALIBRATION_BATCH = 128


class ImageBatches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch_size: int = CALIBRATION_BATCH):
        self.batches = iter([images[i:i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32_path: Path, out_path: Path, calibration_images: np.ndarray) -> Path:
    with tempfile.TemporaryDirectory() as temp:
        prepared = Path(temp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), ImageBatches(calibration_images),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return out_path


def compare(fp32_path: Path, int8_path: Path, test_images: np.ndarray, test_labels: np.ndarray) -> dict:
    """Accuracy on the whole test set and speed (batch 256 throughput, batch 1 latency) of both."""
    report = {}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        run = onnx_runner(onnx_session(path))
        logits = run_batched(run, test_images, 256)
        # Best of a few passes: the machine's other work only ever slows a pass down.
        report[name] = {
            "test_acc": float((logits.argmax(1) == test_labels).mean()),
            "images_per_s_batch256": max(time_batched(run, test_images[:4096], 256)),
            "batch1_ms": 1000 / max(time_batched(run, test_images[:500], 1)),
        }
    report["speedup_batch256"] = report["int8"]["images_per_s_batch256"] / report["fp32"]["images_per_s_batch256"]
    report["accuracy_drop_points"] = 100 * (report["fp32"]["test_acc"] - report["int8"]["test_acc"])
    return report


def record_in_metadata(int8_path: Path, metadata: dict, report: dict) -> None:
    set_onnx_metadata(int8_path, {**metadata, "quantization": "int8 static, QDQ, per-channel weights, "
                                                              f"MinMax on {CALIBRATION_IMAGES} training images",
                                  "test_acc": report["int8"]["test_acc"], "int8_vs_fp32": report})


def format_int8(report: dict) -> str:
    lines = ["int8 vs fp32 (ONNX Runtime)      test acc   images/s @256   batch-1 ms"]
    for name in ("fp32", "int8"):
        row = report[name]
        lines.append(f"  {name:<31}{row['test_acc']:8.2%}   {row['images_per_s_batch256']:13.0f}   "
                     f"{row['batch1_ms']:10.3f}")
    lines.append(f"  speed-up {report['speedup_batch256']:.2f}x, accuracy change "
                 f"{-report['accuracy_drop_points']:+.2f} points")
    return "\n".join(lines)
