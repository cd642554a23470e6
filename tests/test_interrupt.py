"""Ctrl-C under torchrun (README's mnist-torchrun command): one line saying how to resume and
status 130; no launcher traceback, no aborted interpreter, no line per rank."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def start_in_own_group(command: list[str]) -> subprocess.Popen:
    """As a shell starts a foreground job: its own process group, which Ctrl-C signals whole."""
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_until(job: subprocess.Popen, marker: str) -> list[str]:
    lines = []
    for line in job.stdout:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError("the job ended before printing " + repr(marker) + ":\n" + "".join(lines))


def test_ctrl_c_under_torchrun_ends_in_one_line_and_status_130(tmp_path, data_dir, kernel_args):
    launcher = Path(sys.executable).with_name("mnist-torchrun")
    job = start_in_own_group([str(launcher), "--standalone", "--nproc-per-node=2", "-m", "training",
                              "--data-dir", data_dir, "--train-subset", "2048", "--val-images", "256",
                              "--synthetic-digits", "0", "--outlier-weight", "0", "--epochs", "40",
                              *kernel_args, "--out", str(tmp_path / "model.pt")])
    try:
        before = read_until(job, "epoch  1/40")            # mid-training, the process group is up
        os.killpg(job.pid, signal.SIGINT)                    # what Ctrl-C in a terminal does
        after, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    output = "".join(before) + after
    assert job.returncode == 130, output
    assert "Traceback" not in output and "Fatal Python error" not in output, output
    hints = [line for line in after.splitlines() if "--resume" in line]
    assert hints == ["interrupted; rerun the same command with --resume to continue"], output
