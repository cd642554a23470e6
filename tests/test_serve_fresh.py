"""`make serve` serves what was just built: a server whose archive was rebuilt under it (a
retrain, `make archive SERVE_MODEL=...`) is restarted, not reported as running; the model card
names the file and runtime served (the int8, fp32 ONNX and TorchScript files share a version)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from http_client import request
from repo import subprocess_env
from servers import launch_server
from serving.handler.artifact import MODEL_NAME, ONNX_NAME
from serving.server import server
from serving.server.archive import build_archive

pytestmark = [pytest.mark.slow, pytest.mark.server]


def start_again(tmp_path) -> subprocess.CompletedProcess:
    """`make serve`'s start, as the Makefile runs it, against the test's server."""
    return subprocess.run([sys.executable, "-m", "serving.server", "start", "--config", str(tmp_path / "config.properties"),
                           "--run-dir", str(tmp_path / "run")], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def card(management: str) -> dict:
    status, body = request(f"{management}/models/{MODEL_NAME}?customized=true", method="GET")
    assert status == 200, body
    metadata = json.loads(body)[0]["customizedMetadata"]
    return json.loads(metadata) if isinstance(metadata, str) else metadata


def test_a_rebuilt_archive_is_served_after_the_next_start(tmp_path, exported):
    inference, management, run_dir, _ = launch_server(tmp_path, exported)
    try:
        assert (card(management)["runtime"], card(management)["served_file"]) == ("torchscript", "mnist_cnn.torchscript.pt")
        same = start_again(tmp_path)
        assert same.returncode == 0 and "already running" in same.stdout, same
        java = server.java_process(run_dir / server.PID_FILE)

        build_archive(exported / ONNX_NAME, tmp_path / "model_store", force=True)   # make archive SERVE_MODEL=...onnx
        fresh = start_again(tmp_path)
        assert fresh.returncode == 0 and "restarting it to serve the new one" in fresh.stdout, fresh
        assert not java.is_running()
        assert (card(management)["runtime"], card(management)["served_file"]) == ("onnxruntime", ONNX_NAME)
        again = start_again(tmp_path)
        assert again.returncode == 0 and "already running" in again.stdout, again
    finally:
        server.stop(run_dir)
