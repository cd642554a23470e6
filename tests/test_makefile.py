"""The Makefile's own logic, run by real make in a scratch copy: `make clean` never orphans a
server, and a SERVE_MODEL whose archive fails does not stick."""
from __future__ import annotations

import pytest

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from repo import REPO_ROOT
from serving.server.properties import free_ports

FAKE_PYTHON = """#!/bin/sh
# Stands in for the venv's python: records each call; archives anything but a model named bad*.
echo "$*" >> "$CALLS"
case "$*" in
  *serving.server.archive*)
    case "$*" in *artifacts/bad*) echo "bad.onnx scored 10.00% on the test set, below the floor" >&2; exit 1;; esac
    mkdir -p model_store && touch model_store/mnist.mar;;
esac
"""


def scratch_copy(tmp_path: Path) -> Path:
    work = tmp_path / "checkout"
    work.mkdir()
    shutil.copy(REPO_ROOT / "Makefile", work / "Makefile")
    shutil.copy(REPO_ROOT / "config.properties", work / "config.properties")
    shutil.copy(REPO_ROOT / "pyproject.toml", work / "pyproject.toml")
    for name in ("Makefile", "pyproject.toml"):   # copied just now: older than the venv and the exports
        os.utime(work / name, (time.time() - 3600,) * 2)
    return work


def make(work: Path, *args: str, venv: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", f"VENV={venv}", *args], cwd=work, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (venv / ".installed").touch()
    return venv


def exported_artifacts(work: Path) -> None:
    """A checkpoint and its exports, the exports newer: make sees nothing to retrain or re-export."""
    (work / "artifacts").mkdir()
    (work / "artifacts" / "mnist_cnn.pt").touch()
    time.sleep(0.01)
    for name in ("mnist_cnn.torchscript.pt", "mnist_cnn.onnx", "mnist_cnn.int8.onnx", "bad.onnx"):
        (work / "artifacts" / name).touch()


def archived(calls: Path) -> list[str]:
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [line.split("--serialized-file ")[1].split()[0] for line in lines if "serving.server.archive" in line]


def test_a_serve_model_whose_archive_fails_is_taken_back(tmp_path):
    work, venv, calls = scratch_copy(tmp_path), fake_venv(tmp_path), tmp_path / "calls"
    exported_artifacts(work)
    env = {"CALLS": str(calls)}
    first = make(work, "archive", "SERVE_MODEL=artifacts/mnist_cnn.int8.onnx", venv=venv, env=env)
    assert first.returncode == 0, first.stderr
    failed = make(work, "archive", "SERVE_MODEL=artifacts/bad.onnx", venv=venv, env=env)
    assert failed.returncode != 0 and "below the floor" in failed.stderr
    assert "not archived: the next make serve serves artifacts/mnist_cnn.int8.onnx" in failed.stdout, failed.stdout
    assert (work / "model_store" / ".serve_model").read_text().strip() == "artifacts/mnist_cnn.int8.onnx"
    again = make(work, "archive", venv=venv, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert archived(calls) == ["artifacts/mnist_cnn.int8.onnx", "artifacts/bad.onnx"], "nothing to rebuild"


def test_a_first_serve_model_that_fails_leaves_the_default(tmp_path):
    work, venv, calls = scratch_copy(tmp_path), fake_venv(tmp_path), tmp_path / "calls"
    exported_artifacts(work)
    env = {"CALLS": str(calls)}
    assert make(work, "archive", "SERVE_MODEL=artifacts/bad.onnx", venv=venv, env=env).returncode != 0
    assert not (work / "model_store" / ".serve_model").exists()
    again = make(work, "archive", venv=venv, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert archived(calls)[-1] == "artifacts/mnist_cnn.torchscript.pt"


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow  # starts servers
def test_make_clean_stops_the_servers_before_removing_their_pid_files(tmp_path):
    """The page server stands in for any server whose pid file lives in .run/ (make serve's
    TorchServe and make fleet's supervisord are stopped by the same step)."""
    work = scratch_copy(tmp_path)
    port = free_ports(1)[0]
    (work / "config.properties").write_text(f"cors_allowed_origin=http://127.0.0.1:{port}\n")
    venv = Path(sys.executable).parents[1]
    started = subprocess.run([sys.executable, "-m", "serving.web.demo", "start", "--config", "config.properties",
                              "--run-dir", ".run/demo"], cwd=work, capture_output=True, text=True, timeout=60)
    pid = int((work / ".run" / "demo" / "demo.pid").read_text()) if started.returncode == 0 else None
    try:
        assert started.returncode == 0 and port_open(port), started.stderr
        cleaned = make(work, "clean", venv=venv)
        assert cleaned.returncode == 0, cleaned.stderr
        assert not (work / ".run").exists()
        assert not port_open(port), "make clean removed .run/ and left the page server running, orphaned"
    finally:
        if pid is not None and port_open(port):
            os.kill(pid, 15)
