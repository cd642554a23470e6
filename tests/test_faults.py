"""Training faults with real processes: SIGKILL mid-epoch then --resume; SIGTERM mid-save;
one dead torchrun rank."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from repo import subprocess_env, torchrun_command
from serving.handler.artifact import METRICS_NAME
from training.checkpoint import load_checkpoint
from training.durable import SIGTERM_IN_SAVE_ENV

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

# What these runs test is the process and the files, not the data: no generated digits or
# non-digits (their generation took ~20 s in every process) and a small validation split.
LIGHT_DATA = ("--synthetic-digits", "0", "--outlier-weight", "0", "--val-images", "512")


def start(args, cwd, torchrun=False, **env):
    command = torchrun_command("-m", "training", *args) if torchrun else [sys.executable, "-m", "training", *args]
    return subprocess.Popen(command, cwd=cwd, env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_line(process, text, timeout_s=240):
    deadline, seen = time.monotonic() + timeout_s, []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return seen
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"never saw {text!r}: {''.join(seen)[-2000:]}")


def test_sigkill_mid_epoch_then_resume(tmp_path, data_dir, reliability_log, kernel_args):
    out = tmp_path / "m.pt"
    args = ["--train-subset", "8192", "--epochs", "3", "--device", "cpu", *kernel_args, *LIGHT_DATA,
            "--data-dir", data_dir, "--out", str(out)]
    process = start(args, tmp_path)
    wait_for_line(process, "epoch  1/3")
    time.sleep(1.0)                              # well inside epoch 2 (an epoch takes several seconds)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert load_checkpoint(out)["metrics"]["epoch"] == 1          # the last complete save survived
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files
    resumed = subprocess.run([sys.executable, "-m", "training", *args, "--resume"], cwd=tmp_path,
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    checkpoint = load_checkpoint(out)
    rows = [json.loads(line) for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    ok = checkpoint["metrics"]["epoch"] == 3 and [r["epoch"] for r in rows] == [1, 2, 3]
    reliability_log.append({"check": "SIGKILL training mid-epoch, --resume", "cases": 1, "passed": int(ok),
                            "requests": "", "5xx": "", "worker restarts": "", "lost": 0 if ok else 1})
    assert ok


def wait_for_new_file(directory, pattern, process, old, timeout_s=240):
    """The first file matching pattern that is not `old`, while the process runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        found = [path for path in directory.glob(pattern) if path != old]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} in {directory} (process exit status {process.poll()})")


@pytest.mark.parametrize("where", ["write", "rename"])
def test_sigterm_mid_save_leaves_no_temp_file_and_the_previous_checkpoint(tmp_path, data_dir, quick_checkpoint,
                                                                          where):
    """The signal lands inside the writer (torch.save's zip writer, which must not turn it into
    its own RuntimeError) or between the bytes and the rename: each time the run ends with the
    SIGTERM status, without a temp file, the previous checkpoint intact. The hook sends it from
    the save itself, so where it lands does not depend on timing."""
    out = tmp_path / "m.pt"
    shutil.copyfile(quick_checkpoint, out)                    # the previous run's checkpoint
    stale = tmp_path / ".m.pt.killed9.tmp"                    # what a SIGKILLed save left behind
    stale.write_bytes(b"half a checkpoint")
    process = start(["--quick", "--device", "cpu", "--data-dir", data_dir, "--out", str(out), "--force"], tmp_path,
                    **{SIGTERM_IN_SAVE_ENV: where})
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "Traceback" not in output, output[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]   # stale swept, no temp file, no half metrics
    assert out.read_bytes() == quick_checkpoint.read_bytes()          # the previous checkpoint, intact
    load_checkpoint(out)


def test_killed_rank_fails_the_job_instead_of_hanging(tmp_path, data_dir, reliability_log, kernel_args):
    import psutil

    process = start(["--train-subset", "16384", "--epochs", "4", "--device", "cpu", *kernel_args, *LIGHT_DATA,
                     "--data-dir", data_dir,
                     "--out", str(tmp_path / "m.pt")], tmp_path, torchrun=True)
    try:
        wait_for_line(process, "training on")
        time.sleep(1.0)
        ranks = {int(child.environ().get("RANK", -1)): child
                 for child in psutil.Process(process.pid).children(recursive=True)
                 if "RANK" in child.environ()}
        ranks[1].kill()
        killed_at = time.monotonic()
        output, _ = process.communicate(timeout=120)
        seconds = time.monotonic() - killed_at
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    print(f"torchrun exited {process.returncode} {seconds:.1f} s after rank 1 was killed")
    reliability_log.append({"check": f"kill 1 of 2 torchrun ranks (job ended in {seconds:.0f} s)", "cases": 1,
                            "passed": int(process.returncode != 0), "requests": "", "5xx": "",
                            "worker restarts": "", "lost": ""})
    assert process.returncode != 0
    assert "Signal 9" in output or "SIGKILL" in output, output[-2000:]
    assert seconds < 60
