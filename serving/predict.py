"""`mnist-predict` / `python -m serving.predict`: classify image files with ONNX Runtime
(or TorchScript), using the same preprocessing and the same JSON answer as the server.

    mnist-predict --model artifacts/mnist_cnn.onnx digit.png more_digits/

prints one JSON line per image, e.g.
    {"file": "digit.png", "digit": 7, "label": "7", "confidence": 0.9991, ...}
Bad files get {"file", "error", "code"} lines; the exit status is 1 if any file failed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np
import torch

from .artifact import ONNX_NAME, TORCHSCRIPT_NAME, artifact_path, is_onnx, load, predictions
from .preprocess import ImageError, preprocess_bytes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
DEFAULT_MODELS = {"onnx": artifact_path(ONNX_NAME), "torchscript": artifact_path(TORCHSCRIPT_NAME)}


def collect_files(paths: tuple[str, ...]) -> list[Path]:
    """Files as given; folders expand (recursively, sorted) to the image files inside."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(path)
    return files


def resolve_model(model: str | None, backend: str) -> tuple[str, str]:
    if model is None:
        return DEFAULT_MODELS["onnx" if backend == "auto" else backend], ("onnx" if backend == "auto" else backend)
    actual = "onnx" if is_onnx(model) else "torchscript"
    if backend not in ("auto", actual):
        raise click.UsageError(f"--backend {backend} does not match the model file {model}")
    return model, actual


def predict_files(files: list[Path], run_model, metadata: dict, batch_size: int):
    """Yield one result dict per file, in order; model calls are batched."""
    pending: list[tuple[Path, np.ndarray]] = []

    def flush():
        logits = run_model(np.stack([array for _, array in pending]))
        for (path, _), answer in zip(pending, predictions(logits, metadata["labels"])):
            yield {"file": str(path), **answer}
        pending.clear()

    for path in files:
        try:
            pending.append((path, preprocess_bytes(path.read_bytes(), metadata["mean"], metadata["std"])))
        except ImageError as error:
            yield from flush() if pending else ()
            yield {"file": str(path), "error": str(error), "code": error.code}
        except OSError as error:
            yield from flush() if pending else ()
            yield {"file": str(path), "error": f"cannot read file: {error.strerror or error}", "code": "unreadable"}
        if len(pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", default=None, help=f"Artifact to run (.onnx or .pt). Default: {DEFAULT_MODELS['onnx']}, "
                                            f"or {DEFAULT_MODELS['torchscript']} with --backend torchscript.")
@click.option("--backend", type=click.Choice(["auto", "onnx", "torchscript"]), default="auto",
              help="auto: from the model file's extension.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Images per model call.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="Intra-op threads; 0: all cores.")
def main(paths, model, backend, batch_size, threads) -> None:
    """Predict the digit in each image file (folders are searched for images)."""
    model_path, _ = resolve_model(model, backend)
    if not Path(model_path).is_file():
        raise click.ClickException(f"model not found: {model_path} (run `make export` first)")
    if threads:
        torch.set_num_threads(threads)
    try:
        run_model, metadata = load(model_path, "cpu", threads)
    except Exception as error:  # onnxruntime and torch.jit raise many types for a bad file
        raise click.ClickException(f"cannot load model {model_path}: {str(error).splitlines()[0]}") from None
    files = collect_files(paths)
    if not files:
        raise click.ClickException("no image files found in " + ", ".join(paths))
    failures = 0
    for result in predict_files(files, run_model, metadata, batch_size):
        click.echo(json.dumps(result))
        if "error" in result:
            failures += 1
            click.echo(f"error: {result['file']}: {result['error']}", err=True)
    if failures:
        click.echo(f"{failures} of {len(files)} file(s) failed", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main(prog_name="python -m serving.predict")
