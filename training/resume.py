"""Continuing a run: --resume (the original run's recipe and kernels, from its checkpoint), the
restart torchrun makes after a failure (--max-restarts), and the guard that keeps a fresh run
from replacing a finished one."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, TrainConfig
from .tuning import Kernels


class FinishedRunError(ConfigError):
    """A fresh run would replace the checkpoint of a finished run without being told to (--force)."""


# Settings a resumed run takes from its command line, not from the original run: where the
# files are (they may have moved) and how this machine loads and logs them.
COMMAND_LINE_KEYS = ("data_dir", "out", "num_workers", "device", "threads_per_rank", "tensorboard", "peer_timeout_s",
                     "resume", "force")
# torchrun sets this in every worker it starts: its --max-restarts. A job that may be restarted
# must resume when it is: torchrun restarts the workers after a failure (and counts it in
# TORCHELASTIC_RESTART_COUNT) but also when a machine joins (and counts nothing), so the count
# alone cannot tell a worker's first start from a restart.
MAX_RESTARTS_ENV = "TORCHELASTIC_MAX_RESTARTS"


@dataclass(frozen=True)
class Resumed:
    """What --resume continues: the original run's settings as saved (COMMAND_LINE_KEYS from
    this command), the kernels it measured at its start, and its checkpoint."""
    config: TrainConfig
    kernels: Kernels
    checkpoint: dict


def resume_state(config: TrainConfig) -> Resumed:
    """The run whose checkpoint is at config.out_path, to continue with its own recipe and kernels."""
    path = config.out_path
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointError(f"cannot resume: {error}") from None
    if "last_model" not in checkpoint or "optimizer" not in checkpoint:
        raise CheckpointError(f"cannot resume: {path} has no training state")
    if "kernels" not in checkpoint:
        raise CheckpointError(f"cannot resume: {path} was written before checkpoints recorded their kernels; "
                              f"train afresh")
    saved = {key: value for key, value in checkpoint["train_config"].items() if key in TrainConfig.__annotations__}
    if "select_by" not in saved:   # written when holding out images also meant choosing the epoch by them
        if not saved.get("val_images"):
            raise CheckpointError(f"cannot resume: {path} was written before runs held out validation digits "
                                  f"(the trust record is fitted on them); train afresh")
        saved["select_by"] = "val_acc"
    for key in COMMAND_LINE_KEYS:
        saved[key] = getattr(config, key)
    saved["out"] = str(path)   # the file it continues, whatever default --quick or not would name
    return Resumed(TrainConfig(**saved), Kernels.from_dict(checkpoint["kernels"]), checkpoint)


def recipe(train_config: dict) -> dict:
    """What a run computes: its train_config without the settings of one command (COMMAND_LINE_KEYS)."""
    return {key: value for key, value in train_config.items() if key not in COMMAND_LINE_KEYS}


def resume_after_restart(config: TrainConfig) -> TrainConfig:
    """config, with resume on when torchrun may restart this worker (--max-restarts) and --out
    holds an unfinished run of the same recipe: the checkpoint this job wrote before a failure
    or a machine joining made torchrun restart it. Restarted from scratch, the job would throw
    its finished epochs away."""
    if config.resume or int(os.environ.get(MAX_RESTARTS_ENV, "0")) == 0 or finished_run(config.out_path):
        return config
    try:
        saved = load_checkpoint(config.out_path)
    except CheckpointError:   # the failure came before the first epoch's checkpoint: start afresh
        return config
    if recipe(saved["train_config"]) != recipe(asdict(config)):
        return config
    return replace(config, resume=True)


@dataclass(frozen=True)
class FinishedRun:
    """What a checkpoint at --out says about the finished run that wrote it."""
    test_acc: float
    quick: bool                      # a --quick smoke run


def finished_run(path: str | os.PathLike) -> FinishedRun | None:
    """The finished run whose checkpoint is at path; None when none is there (no file, a file
    that is no checkpoint, or an interrupted run's)."""
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError:
        return None
    metrics = checkpoint["metrics"]
    # Only the end of a run (training.train.finish) writes the kept weights' confusion matrix.
    if "confusion_matrix" not in metrics or metrics.get("test_acc") is None:
        return None
    return FinishedRun(metrics["test_acc"], bool(checkpoint["train_config"].get("quick")))


def refuse_to_replace_finished_run(config: TrainConfig) -> None:
    """A fresh run never silently replaces a finished one (a smoke run once replaced a 99.63%
    model with a 59.77% one): that takes --force, or another --out. A smoke run may replace
    another smoke run's checkpoint: nothing of value is lost, and `--quick` twice should work."""
    if config.resume or config.force:
        return
    finished = finished_run(config.out_path)
    if finished is not None and not (config.quick and finished.quick):
        raise FinishedRunError(f"{config.out_path} holds a finished run (test accuracy {finished.test_acc:.2%}): "
                               f"pass --force to replace it, or choose another --out")
