"""Load an exported artifact and turn logits into answers: shared by the TorchServe handler
and mnist-predict. Shipped in the model archive beside the handler, so it imports only
the standard library, NumPy, torch and onnxruntime. The metadata names match export/artifacts.py.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import torch

TORCHSCRIPT_METADATA = "meta.json"   # TorchScript _extra_files entry
ONNX_METADATA_KEY = "digitserve"     # ONNX metadata_props key
TOP_K = 3


def load_torchscript(path: str, device: torch.device):
    extra_files = {TORCHSCRIPT_METADATA: ""}
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; TorchServe still runs it natively
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
        module = torch.jit.load(path, map_location=device, _extra_files=extra_files).eval()
    metadata = json.loads(extra_files[TORCHSCRIPT_METADATA])

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch).to(device)).float().cpu().numpy()
    return run, metadata


def load_onnx(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    metadata = json.loads(session.get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])
    input_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: batch})[0]
    return run, metadata


def load_model(path: str, device: torch.device, threads: int):
    """(run(batch) -> logits, metadata) for a TorchScript (*.pt) or ONNX (*.onnx) artifact."""
    if path.endswith(".onnx"):
        return load_onnx(path, threads)
    return load_torchscript(path, device)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def predictions(logits: np.ndarray, labels: list[str]) -> list[dict]:
    """Logits [N, 10] -> the JSON answer for each image."""
    probabilities = softmax(logits.astype(np.float64))
    answers = []
    for row in probabilities:
        order = np.argsort(row)[::-1]
        digit = int(order[0])
        answers.append({
            "digit": digit, "label": labels[digit], "confidence": float(row[digit]),
            "probabilities": [float(value) for value in row],
            "top_k": [{"digit": int(k), "probability": float(row[k])} for k in order[:TOP_K]],
        })
    return answers
