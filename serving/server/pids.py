"""Is the process a pid file names still ours? The one check every stop and status makes (the
server's Java, the fleet's supervisord and nginx, the page server): a pid file outlives crashes
and reboots, and its number may since have gone to any other process, which must never be
signalled. So the process must be alive and its command line must hold what ours was started with.
"""
from __future__ import annotations

import os
from pathlib import Path

import psutil   # a TorchServe dependency


def is_alive(pid: int) -> bool:
    """pid runs (a zombie whose threads have all exited does not count; an exited child of ours is
    reaped here)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:   # our own child (tests) that has exited
            return False
    except ChildProcessError:   # not our child: its parent or init reaps it
        pass
    try:
        process = psutil.Process(pid)
        # A zombie is gone, unless its other threads still run: the leader of a threaded server
        # shows as a zombie while the rest exit, its sockets still open.
        return process.status() != psutil.STATUS_ZOMBIE or process.num_threads() > 1
    except psutil.Error:
        return False


def read_pid(pid_file: Path) -> int | None:
    """The pid a pid file names (its first word: TorchServe writes more after it), or None."""
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def our_process(pid_file: Path, *command_parts: str) -> psutil.Process | None:
    """The live process pid_file names when its command line (its arguments joined by spaces, or
    the title nginx gives its master) holds every one of command_parts; otherwise None."""
    pid = read_pid(pid_file)
    if pid is None or not is_alive(pid):
        return None
    try:
        process = psutil.Process(pid)
        command = " ".join(process.cmdline())
    except psutil.Error:
        return None
    return process if all(part in command for part in command_parts) else None
