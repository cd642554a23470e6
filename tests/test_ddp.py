"""Real torchrun with two CPU processes (gloo), pinned to the CPU on any machine."""
import json
import subprocess

import pytest

from repo import TESTS_DIR, subprocess_env, torchrun_command
from serving.handler.artifact import CHECKPOINT_NAME
from training.checkpoint import load_checkpoint, rank_digest_path, weights_digest

pytestmark = pytest.mark.slow


def torchrun(*args, cwd, timeout=300):
    return subprocess.run(torchrun_command(*args), cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_two_ranks_end_identical_and_only_rank0_saves(tmp_path, data_dir):
    run = torchrun(str(TESTS_DIR / "ddp_worker.py"), str(tmp_path), data_dir, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights"] == ranks[1]["weights"]          # params and BN buffers agree
    assert ranks[0]["test_acc"] == ranks[1]["test_acc"]        # metrics were all-reduced
    # Rank 0 saves after each of the 2 epochs and once more with the kept weights' test report.
    assert len(ranks[0]["saves"]) == 3 and ranks[1]["saves"] == []
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert checkpoint["metrics"]["world_size"] == 2
    # The kept weights too (EMA-averaged, BatchNorm statistics included): rank 1's digest is the checkpoint's.
    rank1 = json.loads(rank_digest_path(tmp_path / CHECKPOINT_NAME, 1).read_text())
    assert rank1["weights_sha256"] == weights_digest(checkpoint["model"])
    assert "x2 rank(s), 1 thread(s) each" in run.stdout       # threads split so cores are not oversubscribed
    assert run.stdout.count("epoch  2/2") == 1                 # only rank 0 logs


def test_torchrun_cli_quick(tmp_path, data_dir):
    out = tmp_path / "cli.pt"
    run = torchrun("-m", "training", "--quick", "--device", "cpu", "--data-dir", data_dir, "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert load_checkpoint(out)["metrics"]["epoch"] == 2
