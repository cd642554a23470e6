"""Checkpoint -> TorchScript and ONNX, each carrying the metadata a consumer needs.

Every artifact is written to a temporary name first; export.run renames them into
place only after the parity check passed, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import onnx
import torch

from serving.handler.artifact import (INPUT_NAME, MODEL_CARD_NAME, ONNX_METADATA_KEY, OUTPUT_NAME, TORCHSCRIPT_METADATA,
                                      TRUST_METADATA, ArtifactError, Trust, public_card, quiet_torchscript_deprecation)
from training.checkpoint import CheckpointError, load_checkpoint, weights_digest
from training.model import build_model

ONNX_OPSET = 17


def load_model(checkpoint_path: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network from the checkpoint's own config and load its best weights."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint["model_config"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(f"weights in {checkpoint_path} do not fit the model config: "
                              f"{str(error).splitlines()[0]}") from None
    return model.eval(), checkpoint


def weights_version(weights_sha256: str) -> str:
    """The default model_version: it names the weights, so two different models never share
    a version (every model used to ship as "1.0"), and one model's exports always do."""
    return f"w-{weights_sha256[:12]}"


def checkpoint_trust(checkpoint: dict) -> Trust:
    """The finished run's trust record; a checkpoint without one cannot say what is not a digit."""
    try:
        return Trust.from_metadata(checkpoint)
    except ArtifactError as error:
        raise CheckpointError(f"checkpoint: {error} (a finished run writes it: finish the run with "
                              f"mnist-train --resume, or train afresh)") from None


def build_metadata(checkpoint: dict, model_version: str | None = None) -> dict:
    """The model card shipped inside every artifact: plain JSON types only. model_version
    None: the weights' own version (weights_version)."""
    trust = checkpoint_trust(checkpoint)
    preprocess = checkpoint["preprocess"]
    metrics = checkpoint["metrics"]
    digest = weights_digest(checkpoint["model"])
    # public_card: the card travels with the model to other machines, the paths of this one stay here.
    return public_card({
        "model_name": MODEL_CARD_NAME,
        "model_version": model_version or weights_version(digest),
        "weights_sha256": digest,
        "checkpoint_format_version": checkpoint["format_version"],
        "labels": preprocess["labels"],
        "mean": preprocess["mean"],
        "std": preprocess["std"],
        "input_shape": preprocess["input_shape"],
        TRUST_METADATA: trust.as_dict(),
        "checkpoint_test_acc": metrics.get("test_acc"),
        "selected_by": metrics.get("selected_by", "final"),
        "selected_epoch": metrics.get("selected_epoch", metrics["epoch"]),
        "model_config": checkpoint["model_config"],
        "train_config": checkpoint["train_config"],
        "kernels": checkpoint.get("kernels"),   # absent from checkpoints written before it had its own key
    })


def example_input(metadata: dict, batch_size: int = 2) -> torch.Tensor:
    return torch.zeros(batch_size, *metadata["input_shape"])


def export_torchscript(model: torch.nn.Module, metadata: dict, path: str | os.PathLike) -> Path:
    with quiet_torchscript_deprecation():
        scripted = torch.jit.script(model.eval())
    return save_torchscript(scripted, metadata, path)


def save_torchscript(scripted: torch.jit.ScriptModule, metadata: dict, path: str | os.PathLike) -> Path:
    with quiet_torchscript_deprecation():
        torch.jit.save(scripted, str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})
    return Path(path)


def export_onnx(model: torch.nn.Module, metadata: dict, path: str | os.PathLike,
                opset: int = ONNX_OPSET) -> Path:
    # dynamo=False: the TorchScript-based exporter handles this plain CNN fully and needs no
    # onnxscript; passed explicitly because the default changed to the dynamo exporter.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), (example_input(metadata),), str(path), dynamo=False,
                          opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    set_onnx_metadata(path, metadata)
    return Path(path)


def set_onnx_metadata(path: str | os.PathLike, metadata: dict) -> None:
    """Write the model card into metadata_props and run the full checker (shape inference too)."""
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: json.dumps(metadata)})
    proto.producer_name = "digitserve"
    proto.model_version = int(metadata["weights_sha256"][:7], 16)  # ONNX wants an int64 version
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
