"""The artifact contract, in one module: file names, the served model name, metadata keys,
input/output names, how to load an exported model, and what an answer looks like.

Training, export, serving, mnist-predict and the benchmarks all take these names from here;
none re-types them. Shipped inside the model archive beside the handler, so it imports
only the standard library, NumPy and, lazily, torch and onnxruntime (lazily: the names alone,
which `python -m serving.server ready` needs, should not cost torch's 2-second import).
"""
from __future__ import annotations

import json
import os
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import torch

# --- Names ------------------------------------------------------------------------------
MODEL_NAME = "mnist"                             # the name TorchServe serves: /predictions/mnist
ARCHIVE_NAME = f"{MODEL_NAME}.mar"
ARTIFACTS_DIR = "artifacts"
CHECKPOINT_NAME = "mnist_cnn.pt"                 # training's state_dict checkpoint
TORCHSCRIPT_NAME = "mnist_cnn.torchscript.pt"    # BaseHandler loads TorchScript only from *.pt
ONNX_NAME = "mnist_cnn.onnx"
INT8_NAME = "mnist_cnn.int8.onnx"
PARITY_REPORT_NAME = "parity_report.json"
METRICS_NAME = "metrics.jsonl"                   # one row per epoch, beside the checkpoint
TEST_REPORT_NAME = "test_report.json"
MODEL_CARD_NAME = "mnist_cnn"                  # model_name inside the metadata
# The least test accuracy a model may have to be exported or served without --force: a smoke run
# (--quick reaches ~60%) must never silently replace a trained model (`make train` reaches 99.6%).
SERVE_ACCURACY_FLOOR = 0.99


def artifact_path(name: str, directory: str | os.PathLike = ARTIFACTS_DIR) -> str:
    return os.path.join(directory, name)


# --- Metadata: the model card inside every artifact ----------------------------------------
TORCHSCRIPT_METADATA = "meta.json"   # TorchScript _extra_files entry
ONNX_METADATA_KEY = "digitserve"     # ONNX metadata_props key
TRUST_METADATA = "trust"             # the Trust record: checkpoint key, and a key of every artifact's metadata
# What a consumer needs to turn pixels into model input and logits into answers.
REQUIRED_METADATA = ("model_version", "labels", "mean", "std", "input_shape", TRUST_METADATA)
INPUT_NAME, OUTPUT_NAME = "image", "logits"
TOP_K = 3

Runner = Callable[[np.ndarray], np.ndarray]   # float32 [N, 1, 28, 28] normalized -> logits [N, 10]


class ArtifactError(Exception):
    """A file that is not a digitserve artifact, or one without its metadata."""


def is_onnx(path: str | os.PathLike) -> bool:
    return str(path).endswith(".onnx")


@contextmanager
def quiet_torchscript_deprecation():
    # TorchScript is deprecated upstream, but TorchServe's BaseHandler still loads it natively.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
        yield


def check_metadata(metadata, path) -> dict:
    missing = [key for key in REQUIRED_METADATA if not isinstance(metadata, dict) or key not in metadata]
    if missing == [TRUST_METADATA]:
        raise ArtifactError(f"{path}: metadata lacks {TRUST_METADATA} (written before models said what is not a "
                            f"digit): retrain (make train) and re-export (make export)")
    if missing:
        raise ArtifactError(f"{path}: metadata lacks {', '.join(missing)}")
    try:
        Trust.from_metadata(metadata)
    except ArtifactError as error:
        raise ArtifactError(f"{path}: {error}") from None
    return metadata


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """A torch.save zip (training's checkpoint) rather than a TorchScript archive: both hold a
    data.pkl, but only TorchScript holds compiled code/ and constants.pkl. Reads the zip's
    directory only."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name.split("/", 1)[-1] for name in archive.namelist()]
    except (OSError, zipfile.BadZipFile):
        return False
    return "data.pkl" in names and "constants.pkl" not in names and not any(n.startswith("code/") for n in names)


def load_torchscript_module(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """(the ScriptModule in eval mode, its metadata)."""
    import torch

    extra_files = {TORCHSCRIPT_METADATA: ""}
    try:
        with quiet_torchscript_deprecation():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra_files).eval()
    except RuntimeError:
        # torch.jit.load calls a checkpoint an "internal miniz error" and a likely corrupt file.
        if is_training_checkpoint(path):
            directory = os.path.dirname(path)
            raise ArtifactError(f"{path} is a training checkpoint, not an exported model: run `make export` "
                                f"(mnist-export) and use {artifact_path(TORCHSCRIPT_NAME, directory)} or "
                                f"{artifact_path(ONNX_NAME, directory)}") from None
        raise
    if not extra_files[TORCHSCRIPT_METADATA]:
        raise ArtifactError(f"{path}: TorchScript file carries no {TORCHSCRIPT_METADATA}")
    return module, check_metadata(json.loads(extra_files[TORCHSCRIPT_METADATA]), path)


def onnx_session(path: str | os.PathLike, threads: int = 0):
    """A CPU ONNX Runtime session; threads 0 lets ONNX Runtime use every core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_metadata(session, path="ONNX model") -> dict:
    props = session.get_modelmeta().custom_metadata_map
    if ONNX_METADATA_KEY not in props:
        raise ArtifactError(f"{path}: ONNX model carries no {ONNX_METADATA_KEY} metadata")
    return check_metadata(json.loads(props[ONNX_METADATA_KEY]), path)


def torch_runner(module, device: torch.device | str = "cpu") -> Runner:
    """numpy in, numpy logits out, for an eager or TorchScript module."""
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch).to(device)).float().cpu().numpy()
    return run


def onnx_runner(session) -> Runner:
    def run(batch: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    return run


def load(path: str | os.PathLike, device: torch.device | str = "cpu", threads: int = 0) -> tuple[Runner, dict]:
    """(run(batch) -> logits, metadata) for a TorchScript (*.pt) or ONNX (*.onnx) artifact."""
    if is_onnx(path):
        session = onnx_session(path, threads)
        return onnx_runner(session), onnx_metadata(session, path)
    module, metadata = load_torchscript_module(path, device)
    return torch_runner(module, device), metadata


def read_metadata(path: str | os.PathLike) -> dict:
    """The model card of an artifact, without building a runner."""
    if is_onnx(path):
        import onnx

        props = {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}
        if ONNX_METADATA_KEY not in props:
            raise ArtifactError(f"{path}: ONNX model carries no {ONNX_METADATA_KEY} metadata")
        return check_metadata(json.loads(props[ONNX_METADATA_KEY]), path)
    return load_torchscript_module(path)[1]


# --- Running and timing a loaded artifact -------------------------------------------------
def run_batched(run: Runner, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([run(images[start:start + batch_size]) for start in range(0, len(images), batch_size)])


def time_batched(run: Runner, images: np.ndarray, batch_size: int, repeats: int = 3) -> list[float]:
    """Images/s of each of `repeats` timed passes over images, after one warm-up batch."""
    run(images[:batch_size])
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        run_batched(run, images, batch_size)
        rates.append(len(images) / (time.perf_counter() - started))
    return rates


# --- Answers ------------------------------------------------------------------------------
# Where the training run read and wrote on its own machine: no client's business, and a map of
# the training host. The served model card leaves them out (public_card).
LOCAL_PATH_KEYS = ("data_dir", "out", "tensorboard")


def public_card(metadata: dict) -> dict:
    """The model card as the server shows it: the artifact's metadata without local paths."""
    train_config = metadata.get("train_config")
    if not isinstance(train_config, dict):
        return dict(metadata)
    return {**metadata, "train_config": {key: value for key, value in train_config.items()
                                         if key not in LOCAL_PATH_KEYS}}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def logsumexp(logits: np.ndarray) -> np.ndarray:
    peak = logits.max(axis=1)
    return peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))


# --- Trust: is it a digit at all, and how sure ---------------------------------------------
TRUST_SCORES = ("max_softmax", "energy")   # higher = more like a digit


@dataclass(frozen=True)
class Trust:
    """How the logits become is_digit and the reported probabilities. Fitted at the end of
    training on held-out validation digits (training/trust.py), never on the test set, and
    carried in every artifact so that the server, mnist-predict and the bench agree."""
    score: str          # one of TRUST_SCORES; higher = more like a digit (energy: T * logsumexp(logits / T))
    threshold: float    # is_digit = score >= threshold
    temperature: float  # probabilities = softmax(logits / temperature); 1.0 = uncalibrated
    accept_rate: float  # the share of held-out validation digits accepted at the threshold
    chosen_on: str      # which data chose threshold and temperature

    def __post_init__(self):
        if self.score not in TRUST_SCORES:
            raise ArtifactError(f"trust score {self.score!r} is not one of {', '.join(TRUST_SCORES)}")
        if not (np.isfinite(self.threshold) and np.isfinite(self.temperature) and self.temperature > 0):
            raise ArtifactError(f"trust threshold {self.threshold!r} / temperature {self.temperature!r} "
                                f"must be finite, the temperature > 0")
        if not 0 <= self.accept_rate <= 1:
            raise ArtifactError(f"trust accept_rate {self.accept_rate!r} is not a share in [0, 1]")

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(logits, dtype=np.float64) / self.temperature)

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """[N] scores, higher = more like a digit. Both use the calibrated temperature, so the
        threshold is compared with what the record was fitted on."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.score == "energy":
            return self.temperature * logsumexp(logits / self.temperature)
        return self.probabilities(logits).max(axis=1)

    def is_digit(self, logits: np.ndarray) -> np.ndarray:
        return self.scores(logits) >= self.threshold

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_metadata(cls, metadata: dict) -> Trust:
        """The record under metadata["trust"] (a checkpoint or an artifact's metadata)."""
        record = metadata.get(TRUST_METADATA) if isinstance(metadata, dict) else None
        if record is None:
            raise ArtifactError(f"no {TRUST_METADATA} record: retrain (make train) and re-export (make export)")
        if not isinstance(record, dict) or set(record) != set(cls.__dataclass_fields__):
            raise ArtifactError(f"{TRUST_METADATA} record {record!r} does not hold exactly "
                                f"{', '.join(cls.__dataclass_fields__)}")
        try:
            return cls(str(record["score"]), float(record["threshold"]), float(record["temperature"]),
                       float(record["accept_rate"]), str(record["chosen_on"]))
        except (TypeError, ValueError) as error:
            raise ArtifactError(f"{TRUST_METADATA} record {record!r}: {error}") from None


def predictions(logits: np.ndarray, labels: list[str], model_version: str, trust: Trust) -> list[dict]:
    """Logits [N, 10] -> the JSON answer for each image; model_version (the artifact's own)
    says which model answered, trust whether it is a digit at all and how sure (temperature).
    The best guess stays in a not-a-digit answer, so a client can still show it."""
    logits = np.asarray(logits, dtype=np.float64)
    probabilities = trust.probabilities(logits)
    is_digit = trust.is_digit(logits)
    answers = []
    for row, digit_like in zip(probabilities, is_digit):
        order = np.argsort(row)[::-1]
        digit = int(order[0])
        answers.append({
            "digit": digit, "label": labels[digit], "is_digit": bool(digit_like), "confidence": float(row[digit]),
            "probabilities": [float(value) for value in row],
            "top_k": [{"digit": int(k), "probability": float(row[k])} for k in order[:TOP_K]],
            "model_version": model_version,
        })
    return answers
