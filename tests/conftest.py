"""Shared fixtures: the real MNIST copy, a quick checkpoint, a properly trained model, exports."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests_paths import REPO_ROOT


def mnist_dir() -> str:
    """The read-only MNIST copy: $MNIST_DATA_DIR, else ../shared/mnist beside the checkout."""
    candidate = os.environ.get("MNIST_DATA_DIR") or str(REPO_ROOT.parent / "shared" / "mnist")
    if not (Path(candidate) / "MNIST" / "raw").is_dir():
        pytest.fail(f"tests need a local MNIST copy: none at {candidate}; set MNIST_DATA_DIR")
    return candidate


@pytest.fixture(scope="session")
def data_dir() -> str:
    return mnist_dir()


@pytest.fixture(scope="session")
def mnist_test_set(data_dir):
    from training.data import load_mnist
    return load_mnist(data_dir, train=False)


@pytest.fixture(scope="session")
def quick_checkpoint(tmp_path_factory, data_dir) -> Path:
    """A real but tiny training run (1024 images, 2 epochs): a valid checkpoint in seconds."""
    from training.train import TrainConfig, train
    out = tmp_path_factory.mktemp("quick") / "mnist_cnn.pt"
    train(TrainConfig(quick=True, data_dir=data_dir, out=str(out)))
    return out


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, data_dir) -> Path:
    """Two real epochs on all 60,000 images (about a minute here): accurate enough (~99%)
    that serving tests can check predictions against the true labels."""
    from training.train import TrainConfig, train
    out = tmp_path_factory.mktemp("trained") / "mnist_cnn.pt"
    train(TrainConfig(epochs=2, warmup_epochs=0.3, data_dir=data_dir, out=str(out)))
    return out


@pytest.fixture(scope="session")
def exported(tmp_path_factory, trained_checkpoint, data_dir) -> Path:
    """TorchScript, ONNX and int8 ONNX of the trained model, through the real export stage."""
    from export.run import ExportConfig, run_export
    out_dir = tmp_path_factory.mktemp("exported")
    run_export(ExportConfig(checkpoint=str(trained_checkpoint), out_dir=str(out_dir), data_dir=data_dir,
                            quantize=True))
    return out_dir


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def launch_server(tmp_path, exported_dir, base_config="config.properties"):
    """Archive the exported model and start a TorchServe of our own on free ports, in its
    own working directory. Returns (inference URL, management URL, run dir, working dir)."""
    import shutil

    from export.run import TORCHSCRIPT_NAME
    from serving import server
    from serving.archive import build_archive

    if shutil.which("java") is None:
        pytest.fail("TorchServe needs Java 17 (`.ci/run` installs openjdk-17-jre-headless)")
    model_store = tmp_path / "model_store"
    build_archive(exported_dir / TORCHSCRIPT_NAME, model_store)
    config, inference, management = server.instance_config(REPO_ROOT / base_config, tmp_path, model_store)
    run_dir = tmp_path / "run"
    server.start(str(config), run_dir, timeout_s=180, cwd=tmp_path)
    return inference, management, run_dir, tmp_path


@pytest.fixture(scope="session")
def running_server(tmp_path_factory, exported):
    """One shared server for the tests that only send requests."""
    from serving import server

    inference, management, run_dir, _ = launch_server(tmp_path_factory.mktemp("torchserve"), exported)
    yield inference, management, run_dir
    server.stop(run_dir)


# --- reliability summary: tests append rows, the table prints at the end of the run ------------

RELIABILITY_ROWS: list[dict] = []


@pytest.fixture(scope="session")
def reliability_log():
    return RELIABILITY_ROWS


def pytest_terminal_summary(terminalreporter):
    if not RELIABILITY_ROWS:
        return
    columns = ["check", "cases", "passed", "requests", "5xx", "worker restarts", "lost"]
    widths = [max(len(str(row.get(c, ""))) for row in RELIABILITY_ROWS + [dict(zip(columns, columns))])
              for c in columns]
    terminalreporter.section("reliability")
    terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in RELIABILITY_ROWS:
        terminalreporter.write_line("  ".join(str(row.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
