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
    shutil.copy(REPO_ROOT / "requirements.lock", work / "requirements.lock")
    for name in ("Makefile", "pyproject.toml", "requirements.lock"):   # older than the venv and the exports
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


def test_both_engines_write_the_sample_images_the_readme_sends(tmp_path):
    """`make serve` and `make serve ENGINE=kserve` each write samples/ (the README and docs/engines.md
    send samples/digit_7.png next); the KServe one did not."""
    for engine in ("torchserve", "kserve"):
        (tmp_path / engine).mkdir()
        work, venv, calls = scratch_copy(tmp_path / engine), fake_venv(tmp_path / engine), tmp_path / engine / "calls"
        (venv / ".kserve-installed").touch()
        (work / "requirements-kserve.lock").touch()
        os.utime(work / "requirements-kserve.lock", (time.time() - 3600,) * 2)
        exported_artifacts(work)
        make(work, "serve", f"ENGINE={engine}", "DATA_DIR=data", venv=venv, env={"CALLS": str(calls)})
        assert "training.samples" in calls.read_text(), (engine, calls.read_text())


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


# --- the lock file make install uses -------------------------------------------------------------

def locked(file: str = "requirements.lock") -> dict[str, tuple[str, list[str]]]:
    """A lock file (requirements.lock by default) as {name: (version, hashes)}."""
    from packaging.utils import canonicalize_name

    entries, name = {}, None
    for line in (REPO_ROOT / file).read_text().splitlines():
        stripped = line.strip()
        if stripped and not line.startswith((" ", "#")):
            package, version = stripped.rstrip(" \\").split("==")
            name = canonicalize_name(package)
            entries[name] = (version, [])
        elif stripped.startswith("--hash=sha256:"):
            entries[name][1].append(stripped.rstrip(" \\"))
    return entries


def declared() -> list:
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(text) for text in project["dependencies"] + extras["test"] + extras["bench"]]


def test_the_lock_pins_every_declared_package_with_hashes():
    """make install takes requirements.lock with --require-hashes and --no-deps: a package of
    pyproject.toml missing from the lock, or at a version its range refuses, would not be installed
    or not be what was asked for; an entry without a hash would make pip refuse the whole file."""
    from packaging.utils import canonicalize_name

    lock = locked()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement} is not in requirements.lock: run make lock"
        version, hashes = lock[name]
        assert requirement.specifier.contains(version, prereleases=True), \
            f"requirements.lock has {name}=={version}, pyproject.toml asks {requirement}: run make lock"
    assert all(hashes for _, hashes in lock.values()), [n for n, (_, h) in lock.items() if not h]
    assert "setuptools" in lock, "what builds the project is pinned too (pip is the venv's own, ensurepip's)"
    text = (REPO_ROOT / "requirements.lock").read_text()
    assert "--index-url" not in text and "--find-links" not in text, "no machine's own package sources"


def test_the_kserve_lock_is_written_by_make_lock_kserve_and_adds_only_what_the_lock_lacks():
    """make install adds requirements-kserve.lock with --no-deps after requirements.lock: a package in
    both would be installed twice at two versions; kserve must be the version pyproject.toml asks."""
    import tomllib
    from packaging.requirements import Requirement

    assert (REPO_ROOT / "requirements-kserve.lock").read_text().startswith("# Written by `make lock-kserve`")
    kserve_lock, lock = locked("requirements-kserve.lock"), locked()
    assert not set(kserve_lock) & set(lock), sorted(set(kserve_lock) & set(lock))
    assert all(hashes for _, hashes in kserve_lock.values()), [n for n, (_, h) in kserve_lock.items() if not h]
    (asked,) = map(Requirement, tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
                   ["project"]["optional-dependencies"]["kserve"])
    assert asked.specifier.contains(kserve_lock["kserve"][0]), asked
    dry = subprocess.run(["make", "-n", "lock-kserve"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=60).stdout
    assert "pip-compile" in dry and "--generate-hashes" in dry and "--constraint" in dry, dry


def test_make_install_takes_only_the_lock():
    dry = subprocess.run(["make", "-n", "install", "VENV=/nonexistent/venv"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60).stdout
    installs = [line for line in dry.splitlines() if " install " in line and "/pip " in line]
    assert installs and all("--no-deps" in line for line in installs), installs
    assert any("--require-hashes" in line and "-r requirements.lock" in line for line in installs), installs
