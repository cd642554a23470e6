"""Real TorchServe instances for tests: each on free loopback ports, in its own directory."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from repo import REPO_ROOT
from serving import server
from serving.archive import build_archive
from serving.artifact import MODEL_NAME, TORCHSCRIPT_NAME


def launch_server(tmp_path: Path, exported_dir: Path, base_config: str = "config.properties"):
    """Archive the exported model and start a TorchServe of our own on free ports, in its
    own working directory. Returns (inference URL, management URL, run dir, working dir)."""
    if shutil.which("java") is None:
        pytest.fail("TorchServe needs Java 17 (`.ci/run` installs openjdk-17-jre-headless)")
    model_store = tmp_path / "model_store"
    build_archive(exported_dir / TORCHSCRIPT_NAME, model_store)
    config, inference, management = server.instance_config(REPO_ROOT / base_config, tmp_path, model_store)
    run_dir = tmp_path / "run"
    server.start(str(config), run_dir, timeout_s=180, cwd=tmp_path)
    return inference, management, run_dir, tmp_path


def predictions_url(inference: str) -> str:
    return f"{inference}/predictions/{MODEL_NAME}"
