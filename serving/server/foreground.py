"""TorchServe as the main process of a systemd unit or a container (`python -m serving.server run`):
its Java stopped on SIGTERM/SIGINT, its keys renewed, a non-zero exit when it ends unasked."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import click
import psutil

from serving.server.keys import KeyRenewer, key_renewer, remove_own_key_file
from serving.server.server import (PID_FILE, SERVER_UMASK, check_can_start, java_process, prepare_workflow_store,
                                   require_java, server_env, torchserve_command)


def own_java(pid_file: Path, launcher_started: float) -> psutil.Process | None:
    """The Java named in pid_file if our launcher started it: one begun before the launcher
    belongs to another server, and must never be stopped by this one."""
    java = java_process(pid_file)
    try:
        return java if java is not None and java.create_time() >= launcher_started else None
    except psutil.Error:
        return None


def end_java(java: psutil.Process, stop_timeout_s: float) -> bool:
    """SIGTERM the Java process, SIGKILL it if it has not ended within stop_timeout_s.
    True when it ended by itself after SIGTERM (or was already gone)."""
    try:
        java.terminate()
        java.wait(stop_timeout_s)
        return True
    except psutil.TimeoutExpired:
        java.kill()
        return False
    except psutil.NoSuchProcess:
        return True


def supervise(launcher: subprocess.Popen, pid_file: Path, stop_requests: list, stop_timeout_s: float,
              renewer: KeyRenewer | None = None) -> int:
    """Wait for `torchserve --foreground` to end, stopping its Java process when a signal was
    recorded in stop_requests and renewing its keys meanwhile. 0 after a requested clean stop;
    non-zero otherwise."""
    launcher_started = psutil.Process(launcher.pid).create_time()
    java, clean_stop = None, True
    while launcher.poll() is None:
        java = java or own_java(pid_file, launcher_started)
        if renewer is not None and java is not None and not stop_requests:
            renewer.tick()
        if stop_requests and java is not None:
            clean_stop = end_java(java, stop_timeout_s)   # the launcher returns once Java has ended
        elif stop_requests and time.monotonic() - stop_requests[0] > stop_timeout_s:
            launcher.kill()   # Java never appeared: nothing else to stop
        try:
            launcher.wait(0.2)
        except subprocess.TimeoutExpired:
            pass
    java = java or own_java(pid_file, launcher_started)
    if java is not None:
        end_java(java, stop_timeout_s)   # the launcher was killed from outside: Java must not outlive it
    if java_process(pid_file) is None:   # ours has ended; a pid file naming another server's Java stays
        pid_file.unlink(missing_ok=True)
        remove_own_key_file(pid_file.parent)
    if stop_requests:
        return 0 if clean_stop else 1
    if launcher.returncode != 0:   # torchserve refused to start (its reason is on stdout)
        return launcher.returncode
    click.echo("TorchServe ended without being asked to stop: see its output and logs", err=True)
    return 1


def run_foreground(config: str, run_dir: str | os.PathLike, stop_timeout_s: float = 30.0) -> int:
    """`torchserve --start --foreground` until it ends or SIGTERM/SIGINT asks it to; the exit status.

    TorchServe 0.12's --foreground only waits for its Java process: it passes no signal on
    (a SIGTERM to it would orphan Java) and exits 0 however Java ended. So it runs in a
    session of its own (a terminal's Ctrl-C reaches only us), we stop Java ourselves, and a
    server that ends unasked exits non-zero so that systemd or the container runtime restarts it.
    Its output stays on our stdout, for journald or `docker logs`; log files go to run_dir/logs.
    AlreadyRunning or ServerError, before anything starts, when it cannot start."""
    require_java()
    properties = check_can_start(config, run_dir)
    prepare_workflow_store(properties, None)
    run_dir = Path(run_dir).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    command = torchserve_command("--start", "--foreground", "--ncs", "--ts-config", str(config))
    stop_requests: list[float] = []
    handlers = {signum: signal.signal(signum, lambda *_: stop_requests.append(time.monotonic()))
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        launcher = subprocess.Popen(command, env=server_env(run_dir), stdin=subprocess.DEVNULL,
                                    start_new_session=True, umask=SERVER_UMASK)
        return supervise(launcher, run_dir / PID_FILE, stop_requests, stop_timeout_s,
                         key_renewer(properties, run_dir))
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
