"""The export stage: checkpoint -> TorchScript + ONNX, parity-checked, then renamed into place
together (a failed rename puts the previous ones back), then checked to carry the same weights.

    python -m export --data-dir ../shared/mnist

prints the parity table and writes artifacts/mnist_cnn.torchscript.pt,
artifacts/mnist_cnn.onnx and artifacts/parity_report.json. A checkpoint below the serving
accuracy floor (serving.artifact.SERVE_ACCURACY_FLOOR) is refused unless forced.
"""
from __future__ import annotations

import json
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.handler.artifact import (ARTIFACTS_DIR, CHECKPOINT_NAME, INT8_NAME, ONNX_NAME, PARITY_REPORT_NAME,
                                      SERVE_ACCURACY_FLOOR, TORCHSCRIPT_NAME, artifact_path, load_torchscript_module,
                                      onnx_runner, onnx_session, read_metadata, torch_runner)
from serving.handler.preprocess import normalize_in_place
from training.durable import install_together, temp_beside, write_text_atomic
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
    parity_images: int | None = None  # the first N test images for parity and accuracy; None: all 10,000
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


def check_same_weights(paths: list[Path], weights_sha256: str) -> None:
    """Every artifact carries the weights of this export: none is left from another one."""
    for path in paths:
        carried = read_metadata(path)["weights_sha256"]
        if carried != weights_sha256:
            raise ExportError(f"{path} carries weights {carried[:12]}, not this export's {weights_sha256[:12]}: "
                              f"another export wrote to the same directory at the same time; run export again")


def write_report(out_dir: Path, report: dict) -> None:
    write_text_atomic(out_dir / PARITY_REPORT_NAME, json.dumps(report, indent=1) + "\n")


def writable_out_dir(config: ExportConfig) -> Path:
    out_dir = Path(config.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=out_dir)
        probe.close()
    except OSError as error:
        raise ExportError(f"cannot write to {out_dir}: {error.strerror or error}") from None
    return out_dir


def run_export(config: ExportConfig) -> dict:
    """Write every artifact to a temp name, check parity, then rename them all into place
    together and check that they carry the same weights."""
    model, checkpoint = load_model(config.checkpoint)
    if not config.force:
        check_accuracy_floor(checkpoint, config.checkpoint)
    metadata = build_metadata(checkpoint, config.model_version)
    out_dir = writable_out_dir(config)
    images, labels = load_mnist(config.data_dir, train=False)
    images, labels = images[:config.parity_images], labels[:config.parity_images]
    inputs = normalized_images(images, metadata)
    metadata["test_images"] = len(images)   # what test_acc below is measured on

    with ExitStack() as stack:
        torchscript_tmp = export_torchscript(model, metadata, temp_beside(out_dir / TORCHSCRIPT_NAME, stack))
        onnx_tmp = export_onnx(model, metadata, temp_beside(out_dir / ONNX_NAME, stack), opset=config.opset)
        scripted, _ = load_torchscript_module(torchscript_tmp)
        backends = {"eager": torch_runner(model), "torchscript": torch_runner(scripted),
                    "onnxruntime": onnx_runner(onnx_session(onnx_tmp))}
        report = check_parity(backends, inputs, labels.numpy(), tolerance=config.tolerance,
                              batch_sizes=config.batch_sizes)
        report["artifacts"] = {"torchscript": str(out_dir / TORCHSCRIPT_NAME), "onnx": str(out_dir / ONNX_NAME)}
        if not report["passed"]:
            write_report(out_dir, report)
            raise ParityError(format_report(report))
        # The accuracy measured on the exported graph travels with both artifacts.
        metadata["test_acc"] = report["accuracy"]["onnxruntime"]
        metadata["parity_max_abs_diff"] = max(value for entry in report["batches"]
                                              for value in entry["max_abs_diff"].values())
        save_torchscript(scripted, metadata, torchscript_tmp)
        set_onnx_metadata(onnx_tmp, metadata)
        staged = {out_dir / TORCHSCRIPT_NAME: torchscript_tmp, out_dir / ONNX_NAME: onnx_tmp}
        if config.quantize:
            int8_tmp = temp_beside(out_dir / INT8_NAME, stack)
            report["int8"] = export_int8(config, onnx_tmp, int8_tmp, metadata, inputs, labels.numpy())
            report["artifacts"]["int8"] = str(out_dir / INT8_NAME)
            staged[out_dir / INT8_NAME] = int8_tmp
        check_same_weights(list(staged.values()), metadata["weights_sha256"])
        install_together(staged)
    check_same_weights(list(staged), metadata["weights_sha256"])   # no concurrent export renamed over ours
    write_report(out_dir, report)
    return report


def export_int8(config: ExportConfig, onnx_path: Path, int8_path: Path, metadata: dict, test_inputs: np.ndarray,
                test_labels: np.ndarray) -> dict:
    """Quantize the fp32 ONNX model on real training images; measure it against fp32."""
    from .quantize import CALIBRATION_IMAGES, compare, quantize_int8, record_in_metadata

    train_images, _ = load_mnist(config.data_dir, train=True)
    calibration = normalized_images(train_images[:CALIBRATION_IMAGES], metadata)
    quantize_int8(onnx_path, int8_path, calibration)
    comparison = compare(onnx_path, int8_path, test_inputs, test_labels)
    record_in_metadata(int8_path, metadata, comparison)
    return comparison
