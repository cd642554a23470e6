"""The checkpoint format: a dict of plain types and tensors, loadable with weights_only=True.

Keys: format_version, model (the kept weights: by default the final EMA-averaged ones, or
the epoch with the best validation accuracy; metrics["selected_by"] says which), model_config,
train_config (what the user asked, e.g. amp_dtype "auto"), kernels (what the run measured and
used: training.tuning.Kernels), preprocess, metrics (with `hosts`: the machines that ran the
epoch, training.dist.hosts), trust (a finished run's serving.artifact.Trust record, fitted on
held-out validation digits), and for --resume: last_model, ema_model,
optimizer, scaler, scheduler. Export, benchmarks and outside scripts rely on these names.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from serving.handler.artifact import TRUST_METADATA

from .config import TrainConfig
from .data import preprocess_metadata

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "model_config", "train_config", "preprocess", "metrics")


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or not in a format this code knows."""


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


def weights_digest(state_dict: dict) -> str:
    """sha256 over the names and bytes of a state_dict, in name order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cpu_state_dict(model: torch.nn.Module) -> dict:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in unwrap(model).state_dict().items()}


def build_checkpoint(state, config: TrainConfig, metrics: dict, history: list) -> dict:
    """The whole checkpoint for one moment of a run (state: run_state.RunState): the kept weights
    and what describes them, plus the training state that --resume continues from."""
    return {
        "format_version": FORMAT_VERSION,
        "model": state.kept_state,
        "model_config": state.model_config.to_dict(),
        "train_config": asdict(replace(config, resume=False, force=False)),   # the recipe, not this command
        "kernels": state.kernels.to_dict(),
        "preprocess": preprocess_metadata(),
        "metrics": metrics,
        "history": history,
        # Only a finished run has one (training.train.finish); export refuses a checkpoint without it.
        **({TRUST_METADATA: state.trust.as_dict()} if state.trust is not None else {}),
        "last_model": cpu_state_dict(state.model),
        "ema_model": cpu_state_dict(state.ema.module) if state.ema is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "scheduler": {"name": "warmup_cosine", "step": state.step, "total_steps": state.total_steps,
                      "warmup_steps": state.warmup_steps, "base_lr": config.lr},
    }


def rank_digest_path(out_path: Path, rank: int) -> Path:
    """Where a rank other than 0 writes the digest of the weights it ends with (rank 0's are the
    checkpoint's): on its own machine, beside the --out it was given, so that the copies can be
    compared across machines."""
    return out_path.parent / f"{out_path.name}.rank{rank}.json"


