"""Files written so that a crash, a power loss or SIGTERM never leaves a half-written one under
its final name: a temp file beside it, fsynced, renamed over it, the directory fsynced; several
files renamed into place together (export's TorchScript/ONNX pair); SIGTERM as an exception, or
held while a writer that must not be cut runs. Training and export write through this module.
"""
from __future__ import annotations

import os
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO

import torch


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


# --- several files renamed into place together ---------------------------------------------------
def temp_beside(final: Path, stack: ExitStack) -> Path:
    """A temp file beside final (same filesystem, so the rename is atomic; same suffix, for the
    writers that look at it), removed when stack closes unless it was renamed into place."""
    handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=final.suffix, dir=final.parent)
    os.close(handle)
    os.chmod(name, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
    path = Path(name)
    stack.callback(path.unlink, missing_ok=True)
    return path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def link_backup(final: Path) -> Path | None:
    """A second name for the file now at final (a hard link: no copy), to put it back with."""
    if not final.exists():
        return None
    backup = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.bak")
    os.link(final, backup)
    return backup


def install_together(staged: dict[Path, Path]) -> None:
    """Rename each staged temp file over its final name ({final: temp}). If any rename fails
    (or SIGTERM lands between two), the files already replaced are put back: the directory
    never holds files of two different writes."""
    backups: dict[Path, Path | None] = {}
    try:
        for final, temp in staged.items():
            fsync_file(temp)
            backups[final] = link_backup(final)
            os.replace(temp, final)
    except BaseException:
        for final, backup in backups.items():
            if backup is not None:
                os.replace(backup, final)
            else:
                final.unlink(missing_ok=True)
        raise
    finally:
        for backup in backups.values():
            if backup is not None:
                backup.unlink(missing_ok=True)
    fsync_directory(next(iter(staged)).parent)
