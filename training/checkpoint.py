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
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO

import torch

from serving.handler.artifact import TRUST_METADATA

from .config import ConfigError, TrainConfig
from .data import preprocess_metadata
from .tuning import Kernels

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "model_config", "train_config", "preprocess", "metrics")


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or not in a format this code knows."""


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


# A test hook: where every atomic write sends this process a SIGTERM, so a test can interrupt a
# real training run in a save, deterministically: "write" (inside the writer, at its second
# write: inside torch.save's zip writer) or "rename" (after the bytes, before the rename).
SIGTERM_IN_SAVE_ENV = "DIGITSERVE_TEST_SIGTERM_IN_SAVE"


class Terminated(SystemExit):
    """SIGTERM, raised as an exception so that `finally` blocks (a save's temp-file cleanup,
    the process group's teardown) run; exits with 128 + SIGTERM like an unhandled SIGTERM."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


def raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_raises():
    """Within this block SIGTERM raises Terminated instead of killing the process outright.
    Signal handlers can only be set from the main thread; elsewhere the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def sigterm_deferred():
    """Within this block a SIGTERM is held, then raised as Terminated when the block ends. For
    writers that must not be interrupted midway: torch.save's zip writer, cut by an exception,
    raises its own RuntimeError ("unexpected pos") from its cleanup in place of the interrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:
        raise Terminated()


class SigtermAtFirstWrite:
    """The test hook's file: sends SIGTERM to this process in the middle of the writing."""

    def __init__(self, file: BinaryIO):
        self.file, self.writes = file, 0

    def write(self, data) -> int:
        written = self.file.write(data)
        self.writes += 1
        if self.writes == 2:   # the zip writer is under way: an exception now breaks its bookkeeping
            os.kill(os.getpid(), signal.SIGTERM)   # the handler runs here, with bytes already out
        return written

    def __getattr__(self, name):
        return getattr(self.file, name)


def temp_pattern(path: Path) -> str:
    """The names write_atomic gives its temp files beside path (mkstemp adds random letters)."""
    return f".{path.name}.*.tmp"


def sweep_stale_temps(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Remove temp files that a killed process (SIGKILL, power loss) left beside these targets;
    returns what was removed. Call it before this process writes any of them."""
    removed = []
    for path in map(Path, paths):
        for stale in path.parent.glob(temp_pattern(path)) if path.parent.is_dir() else ():
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def fsync_directory(directory: Path) -> None:
    """Make a rename in this directory durable: without it, a power loss can bring back the old
    name's contents (or none) even though the file's own bytes were fsynced."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """write(file) into a temp file in the target directory, fsync, rename over the target and
    fsync the directory: a crash or SIGTERM mid-write never leaves a truncated file under the
    final name, and the temp file is removed on any exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        hook = os.environ.get(SIGTERM_IN_SAVE_ENV)
        with os.fdopen(handle, "wb") as temp_file:
            with sigterm_deferred():
                write(SigtermAtFirstWrite(temp_file) if hook == "write" else temp_file)
            temp_file.flush()
            if hook == "rename":
                os.kill(os.getpid(), signal.SIGTERM)
            os.fsync(temp_file.fileno())
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """torch.save, atomically (write_atomic)."""
    return write_atomic(path, lambda temp_file: torch.save(obj, temp_file))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """A text file (metrics.jsonl, a JSON report), atomically (write_atomic)."""
    return write_atomic(path, lambda temp_file: temp_file.write(text.encode()))


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
