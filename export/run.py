"""The export stage: checkpoint -> TorchScript + ONNX, parity-checked, then renamed into place.

    python -m export --data-dir ../shared/mnist

prints the parity table and writes artifacts/mnist_cnn.torchscript.pt,
artifacts/mnist_cnn.onnx and artifacts/parity_report.json. A checkpoint below the serving
accuracy floor (serving.artifact.SERVE_ACCURACY_FLOOR) is refused unless forced.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.artifact import (ARTIFACTS_DIR, CHECKPOINT_NAME, INT8_NAME, ONNX_NAME, PARITY_REPORT_NAME,
                              SERVE_ACCURACY_FLOOR, TORCHSCRIPT_NAME, artifact_path, load_torchscript_module,
                              onnx_runner, onnx_session, torch_runner)
from serving.preprocess import normalize_in_place
from training.data import load_mnist

from .artifacts import (ONNX_OPSET, build_metadata, export_onnx, export_torchscript, load_model, save_torchscript,
                        set_onnx_metadata)
from .parity import DEFAULT_BATCH_SIZES, DEFAULT_TOLERANCE, ParityError, check_parity, format_report


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str = artifact_path(CHECKPOINT_NAME)
    out_dir: str = ARTIFACTS_DIR
    data_dir: str | None = None
    model_version: str | None = None  # None: named after the weights (export.artifacts.weights_version)
    opset: int = ONNX_OPSET
    tolerance: float = DEFAULT_TOLERANCE
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    quantize: bool = False           # also write a static int8 ONNX model (export/quantize.py)
    force: bool = False              # export a checkpoint below SERVE_ACCURACY_FLOOR all the same


class ExportError(Exception):
    """The checkpoint may not be exported, or the output directory cannot be written."""


class AccuracyFloorError(ExportError):
    """The checkpoint's test accuracy is below the serving floor, and export was not forced."""


def check_accuracy_floor(checkpoint: dict, path: str) -> None:
    """A smoke run's model (--quick reaches ~60%) is never exported, and so never served, by
    accident: `make serve` once re-exported one and served it without a warning."""
    accuracy = checkpoint["metrics"].get("test_acc")
    if accuracy is None:
        raise AccuracyFloorError(f"{path} records no test accuracy (an unfinished run?): finish it "
                                 f"(mnist-train --resume) or pass --force")
    if accuracy < SERVE_ACCURACY_FLOOR:
        raise AccuracyFloorError(f"{path} reaches {accuracy:.2%} test accuracy, below the "
                                 f"{SERVE_ACCURACY_FLOOR:.0%} floor for serving: train longer (make train) "
                                 f"or pass --force")


def normalized_images(images_uint8, metadata: dict) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] with the artifact's own mean and std."""
    pixels = np.asarray(images_uint8, dtype=np.float32)[:, None] / 255.0   # a torch CPU tensor or an array
    return normalize_in_place(pixels, metadata["mean"], metadata["std"])


def temp_path(out_dir: Path, final_name: str, stack: ExitStack) -> Path:
    """A temp file beside the final one (same filesystem, so the rename is atomic), removed
    on the way out unless it was renamed into place."""
    handle, name = tempfile.mkstemp(prefix=f".{final_name}.", suffix=Path(final_name).suffix, dir=out_dir)
    os.close(handle)
    os.chmod(name, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
    path = Path(name)
    stack.callback(path.unlink, missing_ok=True)
    return path


def run_export(config: ExportConfig) -> dict:
    model, checkpoint = load_model(config.checkpoint)
    if not config.force:
        check_accuracy_floor(checkpoint, config.checkpoint)
    metadata = build_metadata(checkpoint, config.model_version)
    out_dir = Path(config.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=out_dir)
        probe.close()
    except OSError as error:
        raise ExportError(f"cannot write to {out_dir}: {error.strerror or error}") from None
    images, labels = load_mnist(config.data_dir, train=False)
    inputs = normalized_images(images, metadata)

    with ExitStack() as stack:
        torchscript_tmp = export_torchscript(model, metadata, temp_path(out_dir, TORCHSCRIPT_NAME, stack))
        onnx_tmp = export_onnx(model, metadata, temp_path(out_dir, ONNX_NAME, stack), opset=config.opset)
        scripted, _ = load_torchscript_module(torchscript_tmp)
        backends = {"eager": torch_runner(model), "torchscript": torch_runner(scripted),
                    "onnxruntime": onnx_runner(onnx_session(onnx_tmp))}
        report = check_parity(backends, inputs, labels.numpy(), tolerance=config.tolerance,
                              batch_sizes=config.batch_sizes)
        report["artifacts"] = {"torchscript": str(out_dir / TORCHSCRIPT_NAME), "onnx": str(out_dir / ONNX_NAME)}
        (out_dir / PARITY_REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
        if not report["passed"]:
            raise ParityError(format_report(report))
        # The accuracy measured on the exported graph travels with both artifacts.
        metadata["test_acc"] = report["accuracy"]["onnxruntime"]
        metadata["parity_max_abs_diff"] = max(value for entry in report["batches"]
                                              for value in entry["max_abs_diff"].values())
        save_torchscript(scripted, metadata, torchscript_tmp)
        set_onnx_metadata(onnx_tmp, metadata)
        os.replace(torchscript_tmp, out_dir / TORCHSCRIPT_NAME)
        os.replace(onnx_tmp, out_dir / ONNX_NAME)
        if config.quantize:
            report["int8"] = export_int8(config, out_dir, metadata, inputs, labels.numpy(), stack)
            report["artifacts"]["int8"] = str(out_dir / INT8_NAME)
            (out_dir / PARITY_REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    return report


def export_int8(config: ExportConfig, out_dir: Path, metadata: dict, test_inputs: np.ndarray,
                test_labels: np.ndarray, stack: ExitStack) -> dict:
    """Quantize the fp32 ONNX model on real training images; measure it against fp32."""
    from .quantize import CALIBRATION_IMAGES, compare, quantize_int8, record_in_metadata

    train_images, _ = load_mnist(config.data_dir, train=True)
    calibration = normalized_images(train_images[:CALIBRATION_IMAGES], metadata)
    int8_tmp = quantize_int8(out_dir / ONNX_NAME, temp_path(out_dir, INT8_NAME, stack), calibration)
    comparison = compare(out_dir / ONNX_NAME, int8_tmp, test_inputs, test_labels)
    record_in_metadata(int8_tmp, metadata, comparison)
    os.replace(int8_tmp, out_dir / INT8_NAME)
    return comparison
