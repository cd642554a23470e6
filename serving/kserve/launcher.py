"""Start the KServe engine in the background and wait until it is ready; stop it by its pid file.

`make serve ENGINE=kserve`, `make stop` and tests/test_engines.py all go through here. The
process is `python -m serving.kserve run ...`; its log is RUN_DIR/kserve.log, its pid RUN_DIR/kserve.pid.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from serving.server.pids import our_process

PID_NAME, LOG_NAME = "kserve.pid", "kserve.log"
COMMAND_MARK = "serving.kserve run"   # what our process's command line holds
DEFAULT_WORKERS = 2   # requests answered at once (engine.AnswerPool); docs/engines.md has the measurement


class EngineError(Exception):
    """The engine would not start, or is already running."""


@dataclass(frozen=True)
class Engine:
    """Where a started engine answers."""
    address: str        # http://127.0.0.1:8085
    pid: int
    grpc_target: str    # 127.0.0.1:8086, the Open Inference Protocol's gRPC service


def running(run_dir: str | os.PathLike) -> psutil.Process | None:
    return our_process(Path(run_dir) / PID_NAME, "-m", COMMAND_MARK)


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def ready(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/v2/health/ready", timeout=2) as response:
            return response.status == 200 and json.loads(response.read()).get("ready") is True
    except (OSError, ValueError, urllib.error.URLError):
        return False


def start(artifact: str | os.PathLike, run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8085,
          threads: int = 1, config: str | os.PathLike = "config.properties", timeout_s: float = 120.0,
          grpc_port: int = 8086, workers: int = DEFAULT_WORKERS) -> Engine:
    """Start the engine on host:port (gRPC on host:grpc_port) serving artifact; return once
    /v2/health/ready says so and the gRPC port takes connections."""
    run_dir = Path(run_dir)
    if (process := running(run_dir)) is not None:
        raise EngineError(f"KServe already runs from {run_dir} (pid {process.pid}): `make stop` first")
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "serving.kserve", "run", "--artifact", str(artifact), "--address", host,
               "--port", str(port), "--grpc-port", str(grpc_port), "--threads", str(threads), "--workers", str(workers),
               "--config", str(config)]
    with open(run_dir / LOG_NAME, "ab") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    (run_dir / PID_NAME).write_text(f"{child.pid}\n")
    address = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while not (ready(address) and listening(host, grpc_port)):
        if child.poll() is not None or time.monotonic() > deadline:
            stop(run_dir)
            tail = (run_dir / LOG_NAME).read_text(errors="replace").splitlines()[-15:]
            raise EngineError(f"KServe did not become ready on {address}; the end of its log:\n" + "\n".join(tail))
        time.sleep(0.5)
    return Engine(address, child.pid, f"{host}:{grpc_port}")


def stop(run_dir: str | os.PathLike, timeout_s: float = 30.0) -> bool:
    """SIGTERM the engine the pid file names, if it is ours and alive; True if one was stopped."""
    process = running(run_dir)
    if process is None:
        (Path(run_dir) / PID_NAME).unlink(missing_ok=True)
        return False
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except psutil.TimeoutExpired:
        process.kill()
        process.wait(timeout_s)
    (Path(run_dir) / PID_NAME).unlink(missing_ok=True)
    return True
