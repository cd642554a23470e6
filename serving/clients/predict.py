"""`mnist-predict` / `python -m serving.clients.predict`: classify image files with ONNX Runtime
(or TorchScript), using the same preprocessing and the same JSON answer as the server.

    mnist-predict --model artifacts/mnist_cnn.onnx samples/digit_7.png samples/
    mnist-predict --grpc 127.0.0.1:7070 samples/digit_7.png      # ask a running TorchServe over gRPC
    mnist-predict --grpc 127.0.0.1:7070 --key-file key_file.json samples/   # token authorization on
    mnist-predict --grpc 127.0.0.1:8086 --grpc-api v2 samples/   # Open Inference Protocol gRPC (KServe engine)

prints one JSON line per image, e.g.
    {"file": "samples/digit_7.png", "digit": 7, "label": "7", "is_digit": true, "confidence": 0.9991, ...,
     "model_version": "w-..."}
An image that does not look like a digit gets "is_digit": false (its digit is the best guess)
and a line on stderr: `samples/letter_k.png: not a digit (best guess D, C)`.
Bad files get {"file", "error", "code"} lines; the exit status is 1 if any file failed.
"""
from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import click
import numpy as np
import torch

from serving.handler.artifact import (ONNX_NAME, TORCHSCRIPT_NAME, ArtifactError, Trust, artifact_path, is_onnx, load,
                                      predictions)
from serving.clients.grpc_client import KEY_ENV, KeyFileError, KeySource
from serving.handler.preprocess import ImageError, preprocess_bytes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
DEFAULT_MODELS = {"onnx": artifact_path(ONNX_NAME), "torchscript": artifact_path(TORCHSCRIPT_NAME)}


class PredictError(Exception):
    """Nothing can be predicted (no model, a server that refuses every call): one line for the user."""


class BackendMismatch(PredictError):
    """--backend names another kind of model than the file given: a usage error."""


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
        raise BackendMismatch(f"--backend {backend} does not match the model file {model}")
    return model, actual


def unreadable(path: Path, error: OSError) -> dict:
    return {"file": str(path), "error": f"cannot read file: {error.strerror or error}", "code": "unreadable"}


def predict_files(files: list[Path], run_model, metadata: dict, batch_size: int):
    """Yield one result dict per file, in order; model calls are batched."""
    pending: list[tuple[Path, np.ndarray]] = []
    trust = Trust.from_metadata(metadata)

    def flush():
        logits = run_model(np.stack([array for _, array in pending]))
        for (path, _), answer in zip(pending, predictions(logits, metadata["labels"], metadata["model_version"], trust)):
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
            yield unreadable(path, error)
        if len(pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


# gRPC failures that no other file would escape: stop at the first instead of repeating it per file.
SERVER_FAILURES = ("UNAVAILABLE", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "UNIMPLEMENTED",
                   "INVALID_ARGUMENT")


GRPC_APIS = ("torchserve", "v2")


def predict_over_grpc(files: list[Path], target: str, keys: KeySource, api: str = "torchserve"):
    """Yield one result dict per file, each file sent as one RPC: TorchServe's Predictions
    (api "torchserve"), or the Open Inference Protocol's ModelInfer (api "v2", the KServe engine:
    its answers carry digit, is_digit, probabilities and model_version)."""
    import grpc

    from serving.clients.grpc_client import InferenceClient, PredictionError, connect
    from serving.clients.v2_grpc import V2Client

    with connect(target, keys=keys, client=V2Client if api == "v2" else InferenceClient) as client:
        for path in files:
            try:
                yield {"file": str(path), **client.predict(path.read_bytes())}
            except PredictionError as error:
                yield {"file": str(path), "error": str(error), "code": error.code}
            except OSError as error:
                yield unreadable(path, error)
            except grpc.RpcError as error:
                if error.code().name in SERVER_FAILURES:
                    raise PredictError(f"{api} gRPC at {target}: {error.code().name}: "
                                       f"{error.details()}") from None
                yield {"file": str(path), "error": error.details() or error.code().name,
                       "code": f"grpc_{error.code().name.lower()}"}


def load_model(model: str | None, backend: str, threads: int):
    model_path, _ = resolve_model(model, backend)
    if not Path(model_path).is_file():
        raise PredictError(f"model not found: {model_path} (run `make export` first)")
    if threads:
        torch.set_num_threads(threads)
    try:
        return load(model_path, "cpu", threads)
    except ArtifactError as error:   # ours already names the file and what to do
        raise PredictError(str(error)) from None
    except Exception as error:  # onnxruntime and torch.jit raise many types for a bad file
        raise PredictError(f"cannot load model {model_path}: {str(error).splitlines()[0]}") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", default=None, help=f"Artifact to run (.onnx or .pt). Default: {DEFAULT_MODELS['onnx']}, "
                                            f"or {DEFAULT_MODELS['torchscript']} with --backend torchscript.")
@click.option("--backend", type=click.Choice(["auto", "onnx", "torchscript"]), default="auto",
              help="auto: from the model file's extension.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Images per model call.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="Intra-op threads; 0: all cores.")
@click.option("--grpc", "grpc_target", metavar="HOST:PORT", default=None,
              help="Send each image to a running server's gRPC inference API (TorchServe's grpc_inference_port, "
                   "7070 in config.properties; the KServe engine's 8086 with --grpc-api v2) instead of running a "
                   "model here.")
@click.option("--grpc-api", type=click.Choice(GRPC_APIS), default="torchserve",
              help="With --grpc: TorchServe's own inference.proto, or v2, the Open Inference Protocol's "
                   "GRPCInferenceService (the KServe engine, Triton).")
@click.option("--key-file", type=click.Path(dir_okay=False), default=None,
              help=f"With --grpc: the key_file.json of a server with token authorization (re-read at every "
                   f"call, so renewed keys are picked up). Else the key in ${KEY_ENV}, if set.")
@click.option("--key", "removed_key", hidden=True, default=None)
def main(paths, model, backend, batch_size, threads, grpc_target, grpc_api, key_file, removed_key) -> None:
    """Predict the digit in each image file (folders are searched for images)."""
    if removed_key is not None:
        raise click.UsageError(f"--key was removed: a key on the command line is readable by every user of this "
                               f"machine (ps). Use --key-file key_file.json or the {KEY_ENV} environment variable")
    if grpc_target and (grpc_target.rpartition(":")[0] == "" or not grpc_target.rpartition(":")[2].isdigit()):
        raise click.UsageError(f"--grpc takes HOST:PORT, e.g. 127.0.0.1:7070, not {grpc_target!r}")
    if key_file and not grpc_target:
        raise click.UsageError("--key-file goes with --grpc (a local model needs no key)")
    try:
        failures, count = print_predictions(paths, model, backend, batch_size, threads, grpc_target,
                                            KeySource.from_options(key_file), grpc_api)
    except BackendMismatch as error:
        raise click.UsageError(str(error)) from None
    except (PredictError, KeyFileError) as error:
        raise click.ClickException(str(error)) from None
    if failures:
        click.echo(f"{failures} of {count} file(s) failed", err=True)
        sys.exit(1)


def print_predictions(paths, model, backend, batch_size, threads, grpc_target, keys: KeySource,
                      grpc_api: str = "torchserve") -> tuple[int, int]:
    """One JSON line per file on stdout, an error line per failed file on stderr; returns
    (failed files, files)."""
    if grpc_target:
        predict = partial(predict_over_grpc, target=grpc_target, keys=keys, api=grpc_api)
    else:
        run_model, metadata = load_model(model, backend, threads)
        predict = partial(predict_files, run_model=run_model, metadata=metadata, batch_size=batch_size)
    files = collect_files(paths)
    if not files:
        raise PredictError("no image files found in " + ", ".join(paths))
    failures = 0
    for result in predict(files):
        print(json.dumps(result), flush=True)
        if "error" in result:
            failures += 1
            print(f"error: {result['file']}: {result['error']}", file=sys.stderr, flush=True)
        elif result.get("is_digit") is False:   # answered, not failed: stdout stays one JSON line per file
            print(not_a_digit_line(result), file=sys.stderr, flush=True)
    return failures, len(files)


def not_a_digit_line(result: dict) -> str:
    """The best guess, with its confidence where the answer has one (a v2 answer has none)."""
    sure = f", {result['confidence']:.2f}" if "confidence" in result else ""
    return f"{result['file']}: not a digit (best guess {result['digit']}{sure})"


if __name__ == "__main__":
    main(prog_name="python -m serving.clients.predict")
