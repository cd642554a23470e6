"""The checkpoint format: a dict of plain types and tensors, loadable with weights_only=True.

Keys: format_version, model (the kept weights: the final ones, or the epoch with the best
validation accuracy; metrics["selected_by"] says which), model_config, train_config,
preprocess, metrics, and for --resume: last_model, ema_model, optimizer, scaler, scheduler.
Export, benchmarks and outside scripts rely on these names.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .data import preprocess_metadata

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "model_config", "train_config", "preprocess", "metrics")


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or not in a format this code knows."""


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temp file in the target directory, then rename over the target,
    so a crash mid-write never leaves a truncated file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as temp_file:
            torch.save(obj, temp_file)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load and validate a checkpoint; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a digitserve checkpoint (not a dict)")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a digitserve checkpoint: missing {', '.join(missing)}")
    if checkpoint["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {checkpoint['format_version']!r}; "
                              f"this code reads version {FORMAT_VERSION}")
    return checkpoint


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers, so saved keys carry no prefixes."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def cpu_state_dict(model: torch.nn.Module) -> dict:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in unwrap(model).state_dict().items()}


def build_checkpoint(state, config, model_config, metrics: dict, history: list) -> dict:
    """The whole checkpoint for one moment of a run (state: train.RunState): the kept weights and
    what describes them, plus the training state that --resume continues from."""
    from dataclasses import asdict, replace

    return {
        "format_version": FORMAT_VERSION,
        "model": state.kept_state,
        "model_config": model_config.to_dict(),
        "train_config": {**asdict(replace(config, resume=False)), "kernel_probe": state.kernel_probe},
        "preprocess": preprocess_metadata(),
        "metrics": metrics,
        "history": history,
        "last_model": cpu_state_dict(state.model),
        "ema_model": cpu_state_dict(state.ema.module) if state.ema is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "scheduler": {"name": "warmup_cosine", "step": state.step, "total_steps": state.total_steps,
                      "warmup_steps": state.warmup_steps, "base_lr": config.lr},
    }


def resume_state(config):
    """The checkpoint to continue from, and the run's original config (paths and loader
    settings from the command line win: the files may have moved)."""
    from .config import TrainConfig

    try:
        checkpoint = load_checkpoint(config.out)
    except CheckpointError as error:
        raise CheckpointError(f"cannot resume: {error}") from None
    if "last_model" not in checkpoint or "optimizer" not in checkpoint:
        raise CheckpointError(f"cannot resume: {config.out} has no training state")
    saved = {key: value for key, value in checkpoint["train_config"].items() if key in TrainConfig.__annotations__}
    for key in ("data_dir", "out", "num_workers", "device", "threads_per_rank", "tensorboard", "resume"):
        saved[key] = getattr(config, key)
    return TrainConfig(**saved), checkpoint
