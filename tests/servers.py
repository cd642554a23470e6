"""Real TorchServe instances for tests: each on free loopback ports, in its own directory."""
from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Collection

import pytest

from repo import REPO_ROOT
from serving.server import server
from serving.server.properties import instance_config, read_properties
from serving.server.archive import build_archive
from serving.handler.artifact import MODEL_NAME, TORCHSCRIPT_NAME


def launch_server(tmp_path: Path, exported_dir: Path, base_config: str = "config.properties",
                  serialized_name: str = TORCHSCRIPT_NAME, **extra: str):
    """Archive the exported model (serialized_name: the TorchScript one unless told, as `make
    archive`) and start a TorchServe of our own on free ports, in its own working directory;
    extra settings go into its config (cors_allowed_origin=...).
    Returns (inference URL, management URL, run dir, working dir)."""
    if shutil.which("java") is None:
        pytest.fail("TorchServe needs Java 17 (`.ci/run` installs openjdk-17-jre-headless)")
    model_store = tmp_path / "model_store"
    # The test recipe's model scores ~98%, below the serving floor: forced, as tests may.
    build_archive(exported_dir / serialized_name, model_store, force=True)
    config, inference, management = instance_config(REPO_ROOT / base_config, tmp_path, model_store, **extra)
    run_dir = tmp_path / "run"
    server.start(str(config), run_dir, timeout_s=180, cwd=tmp_path)
    return inference, management, run_dir, tmp_path


def predictions_url(inference: str) -> str:
    return f"{inference}/predictions/{MODEL_NAME}"


def explanations_url(inference: str) -> str:
    return f"{inference}/explanations/{MODEL_NAME}"


def v2_infer_url(inference: str) -> str:
    return f"{inference}/v2/models/{MODEL_NAME}/infer"


def grpc_target(run_dir: Path) -> str:
    """HOST:PORT of the gRPC inference API of a server from launch_server, read from the
    config that instance_config wrote beside its run dir (free ports, chosen per server)."""
    properties = read_properties(Path(run_dir).parent / "config.properties")
    return f"{properties.get('grpc_inference_address', '127.0.0.1')}:{properties['grpc_inference_port']}"


def scraped_total(run_dir: Path, metric: str) -> float:
    """The sum over all labels of one counter on the metrics endpoint of a server from launch_server."""
    from prometheus_client.parser import text_string_to_metric_families

    address = read_properties(Path(run_dir).parent / "config.properties")["metrics_address"]
    with urllib.request.urlopen(f"{address}/metrics", timeout=10) as response:
        families = text_string_to_metric_families(response.read().decode())
        return sum(sample.value for family in families if family.name == metric for sample in family.samples)


def settled_total(run_dir: Path, metric: str, at_least: float = 0.0, timeout_s: float = 60.0) -> float:
    """scraped_total once it has reached at_least and two reads a second apart agree: the worker
    reports metrics asynchronously, so an answer's count can arrive after the answer."""
    deadline = time.monotonic() + timeout_s
    previous = scraped_total(run_dir, metric)
    while True:
        time.sleep(1.0)
        value = scraped_total(run_dir, metric)
        if (value == previous and value >= at_least) or time.monotonic() > deadline:
            return value
        previous = value


def worker_pids(management: str, timeout_s: float = 120.0, replacing: Collection[int] = ()) -> list[int]:
    """PIDs of the model's workers once every one of them is READY (a worker still
    starting reports pid -1) and none is one of the pids in replacing (killed workers that the
    management API may still list as READY for a moment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(f"{management}/models/{MODEL_NAME}", timeout=10) as response:
            workers = json.loads(response.read())[0]["workers"]
        if all(w.get("status") == "READY" and int(w.get("pid", -1)) > 0 and int(w["pid"]) not in replacing
               for w in workers) or time.monotonic() > deadline:
            return sorted(int(w["pid"]) for w in workers)
        time.sleep(0.5)
