"""Shared fixtures: the real MNIST copy, a quick checkpoint, a properly trained model, exports."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from imaging import MnistDigits
from repo import REPO_ROOT
from serving.handler.artifact import CHECKPOINT_NAME
from training.data import DATA_DIR_ENV


def mnist_dir() -> str:
    """The read-only MNIST copy: $MNIST_DATA_DIR, else ../shared/mnist beside the checkout."""
    candidate = os.environ.get(DATA_DIR_ENV) or str(REPO_ROOT.parent / "shared" / "mnist")
    if not (Path(candidate) / "MNIST" / "raw").is_dir():
        pytest.fail(f"tests need a local MNIST copy: none at {candidate}; set {DATA_DIR_ENV}")
    return candidate


@pytest.fixture(scope="session")
def data_dir() -> str:
    return mnist_dir()


@pytest.fixture(scope="session")
def mnist_digits(data_dir) -> MnistDigits:
    """The real MNIST test set, the one source of real digits for every test."""
    from training.data import load_mnist
    images, labels = (tensor.numpy() for tensor in load_mnist(data_dir, train=False))
    for array in (images, labels):
        array.setflags(write=False)    # shared by the whole session: no test may change it
    return MnistDigits(images, labels)


@pytest.fixture(scope="session")
def quick_checkpoint(tmp_path_factory, data_dir) -> Path:
    """A real but tiny training run (1024 images, 2 epochs): a valid checkpoint in seconds."""
    from training.train import TrainConfig, train
    out = tmp_path_factory.mktemp("quick") / CHECKPOINT_NAME
    train(TrainConfig(quick=True, data_dir=data_dir, out=str(out)))
    return out


# The one trained model every serving test shares, trained once per run: two epochs on the
# first 16,384 training images (32,768 image-steps, a quarter of `make train`'s first two epochs).
# It reached 98.4% on the test set (a 2-core Xeon, 2026-11-28); with outlier exposure on (the
# default since issue 18: a quarter more images per step) 97.9% (AMD EPYC, 2026-11-29). The
# accuracy bars of the tests are set from that (TEST_RECIPE_MIN_ACCURACY), not from `make train`'s.
TEST_RECIPE = {"train_subset": 16384, "epochs": 2, "warmup_epochs": 0.3}
TEST_RECIPE_MIN_ACCURACY = 0.97
# Tests using these fixtures need that training run: they are marked `trained` and `slow`, so
# the fast tier (-m "not slow") trains nothing beyond the 1,024-image quick checkpoint.
# Tests check parity on the first images of the test set; `make export` checks all 10,000.
PARITY_IMAGES = 2000
TRAINED_FIXTURES = {"trained_checkpoint", "exported", "running_server"}


SLOW_TEST_TIMEOUT_S = 1200   # pyproject's 180 s is for the rest


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINED_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.trained)
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def trained_min_accuracy() -> float:
    """What tests may require of the trained model's accuracy on real test digits."""
    return TEST_RECIPE_MIN_ACCURACY


@pytest.fixture(scope="session")
def fastest_kernels(mnist_digits):
    """This machine's fastest training kernels, measured once a session with make train's own probe
    (training/tuning.py) on a batch of real digits. Runs too short to repay a probe would otherwise
    take the unmeasured default (channels_last+bf16: 1.6x slower than fp32 on CI's 2-core Xeon), and
    longer ones would each probe again (27 s there)."""
    from training.config import TrainConfig
    from training.data import normalize
    from training.model import ModelConfig
    from training.tuning import choose_kernels
    images, labels = mnist_digits
    batch = TrainConfig().batch_size
    pixels = normalize(torch.from_numpy(images[:batch + batch // 4].copy()))   # with outlier rows, as training
    return choose_kernels(TrainConfig(device="cpu"), pixels, torch.from_numpy(labels[:batch].copy()).long(),
                          ModelConfig(), run_steps=10**6)


def kernel_settings(kernels) -> dict:
    """TrainConfig fields that name kernels: the run takes them as asked, without a probe."""
    return {"memory_format": kernels.memory_format, "amp": kernels.amp, "amp_dtype": kernels.amp_dtype or "auto"}


@pytest.fixture(scope="session")
def kernel_args(fastest_kernels) -> tuple[str, ...]:
    """The same as command-line options, for the tests that run training as a process."""
    settings = kernel_settings(fastest_kernels)
    amp = ("--amp", "--amp-dtype", settings["amp_dtype"]) if settings["amp"] else ("--no-amp",)
    return ("--memory-format", settings["memory_format"], *amp)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, data_dir, fastest_kernels) -> Path:
    from training.train import TrainConfig, train
    out = tmp_path_factory.mktemp("trained") / CHECKPOINT_NAME
    result = train(TrainConfig(**TEST_RECIPE, **kernel_settings(fastest_kernels), data_dir=data_dir, out=str(out)))
    assert result.metrics["test_acc"] >= TEST_RECIPE_MIN_ACCURACY, "the test recipe no longer trains a usable model"
    return out


@pytest.fixture(scope="session")
def exported(tmp_path_factory, trained_checkpoint, data_dir) -> Path:
    """TorchScript, ONNX and int8 ONNX of the trained model, through the real export stage
    (forced: the test recipe's ~98% is below the serving floor, on purpose, to stay fast)."""
    from export.run import ExportConfig, run_export
    out_dir = tmp_path_factory.mktemp("exported")
    run_export(ExportConfig(checkpoint=str(trained_checkpoint), out_dir=str(out_dir), data_dir=data_dir,
                            quantize=True, force=True, parity_images=PARITY_IMAGES))
    return out_dir


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def running_server(tmp_path_factory, exported):
    """One shared server for the tests that only send requests."""
    from serving.server import server
    from servers import launch_server

    inference, management, run_dir, _ = launch_server(tmp_path_factory.mktemp("torchserve"), exported)
    yield inference, management, run_dir
    server.stop(run_dir)


# --- reliability summary: tests append rows, the table prints at the end of the run ------------

RELIABILITY_ROWS: list[dict] = []


@pytest.fixture(scope="session")
def reliability_log():
    return RELIABILITY_ROWS


# `make reliability` sets this to docs/security.md: the table is written into that file's
# reliability:begin/end block, so the documented figures come from the run that measured them.
RELIABILITY_DOC_ENV = "RELIABILITY_DOC"
RELIABILITY_BEGIN = "<!-- reliability:begin (written by make reliability) -->"
RELIABILITY_END = "<!-- reliability:end -->"


def reliability_table() -> list[str]:
    columns = ["check", "cases", "passed", "requests", "5xx", "worker restarts", "lost"]
    widths = [max(len(str(row.get(c, ""))) for row in RELIABILITY_ROWS + [dict(zip(columns, columns))])
              for c in columns]
    return ["  ".join(str(row.get(c, "")).ljust(w) for c, w in zip(columns, widths)).rstrip()
            for row in [dict(zip(columns, columns))] + RELIABILITY_ROWS]


def write_reliability_doc(path: Path, table: list[str], exit_status: int) -> None:
    import platform
    import subprocess
    import time

    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")),
        platform.processor() or "unknown CPU")
    seconds = os.environ.get("RELIABILITY_SECONDS", "default")
    block = [RELIABILITY_BEGIN,
             f"Recorded {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make reliability` on {cpu}, "
             f"{os.cpu_count()} cores ({seconds} s of load per concurrency level; pytest exit status "
             f"{exit_status}):", "", "```", *table, "```", RELIABILITY_END]
    text = path.read_text()
    head, rest = text.split(RELIABILITY_BEGIN, 1)
    path.write_text(head + "\n".join(block) + rest.split(RELIABILITY_END, 1)[1])


def pytest_terminal_summary(terminalreporter, exitstatus):
    if not RELIABILITY_ROWS:
        return
    table = reliability_table()
    terminalreporter.section("reliability")
    for line in table:
        terminalreporter.write_line(line)
    if os.environ.get(RELIABILITY_DOC_ENV):
        write_reliability_doc(Path(os.environ[RELIABILITY_DOC_ENV]), table, int(exitstatus))
