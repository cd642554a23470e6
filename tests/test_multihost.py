"""Two machines for real: torchrun's multi-node command run in two network namespaces joined
by a veth pair, each "machine" with its own network stack and address (tests/netns.py), on CPU
with gloo and real MNIST. Needs root (CI is); skipped with the reason otherwise.

The commands are docs/multihost.md's, with the test's addresses. Both namespaces share this
machine's files and hostname, so each "machine" gets its own --out directory (as two disks
would) and the addresses tell them apart.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from netns import Host, two_hosts
from repo import REPO_ROOT, subprocess_env
from serving.handler.artifact import CHECKPOINT_NAME
from training import dist
from training.checkpoint import load_checkpoint, rank_digest_path, weights_digest
from training.durable import save_atomic
from training.resume import MAX_RESTARTS_ENV, resume_after_restart, resume_state
from training.config import ConfigError, TrainConfig
from training.train import check_ranks_start_alike

RDZV_PORT = 29400                 # torchrun's default c10d rendezvous port, inside the namespaces only
# 4096 images x 3 epochs: an epoch of a few seconds, long enough to lose a machine in the middle of.
# No generated digits or non-digits: what is tested is the ranks, and generating them (through the
# server's preprocessing) took over a minute in every process, every restart included.
RECIPE = ("--train-subset", "4096", "--epochs", "3", "--warmup-epochs", "0.3",
          "--synthetic-digits", "0", "--outlier-weight", "0", "--val-images", "512")
# Both "machines" share this machine's cores: one thread per rank, the session's fastest kernels
# (conftest.kernel_args). A lost peer fails a rank after 20 s.
PEER_TIMEOUT_S = 20
MACHINE = ("--device", "cpu", "--threads-per-rank", "1", "--peer-timeout-s", str(PEER_TIMEOUT_S))
RUN_TIMEOUT_S = 300               # the test's own bound on any run: past it, everything is killed
LOST_HOST_EXIT_S = 90             # the survivor must end within this of losing its peer (the timeout + its exit)
# The resumed run trains epochs 2-3 on one rank instead of two: other shards, batch order and
# dropout masks, same recipe, so its accuracy may differ from the uninterrupted run's by what
# another seed makes. `python -m training *RECIPE --no-amp --memory-format channels_last --seed N`
# for seeds 0-3, one process each, ended at 94.87, 95.21, 94.96 and 94.50% (Intel Xeon @ 2.60GHz,
# 2 cores, 2026-12-04): a spread of 0.7 points, a standard deviation of 0.3.
ACCURACY_TOLERANCE = 0.01
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@dataclass
class Node:
    """One machine's torchrun, running."""
    host: Host
    process: subprocess.Popen
    log: Path
    out: Path                     # the --out it was given

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.host.address}: torchrun still running after {timeout} s (hung):\n{self.text()[-3000:]}")

    def text(self) -> str:
        return self.log.read_text()


@dataclass(frozen=True)
class Elasticity:
    """torchrun's options for how a job outlives a lost machine."""
    nnodes: str = "2"                         # "1:2": go on with one machine
    max_restarts: int = 0
    rdzv_conf: tuple[str, ...] = ()           # e.g. last_call_timeout=5


def multinode_command(host: Host, head: Host, elasticity: Elasticity) -> list[str]:
    """docs/multihost.md's command: the head machine keeps the rendezvous store (is_host=true),
    and every machine names its own address (--local-addr): the namespaces share one hostname."""
    rdzv_conf = (("is_host=true",) if host == head else ()) + elasticity.rdzv_conf
    restarts = ["--max-restarts", str(elasticity.max_restarts)] if elasticity.max_restarts else []
    return [TORCHRUN, "--nnodes", elasticity.nnodes, "--nproc-per-node", "1", *restarts,
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{head.address}:{RDZV_PORT}",
            *(["--rdzv-conf", ",".join(rdzv_conf)] if rdzv_conf else []), "--local-addr", host.address]


def start(host: Host, head: Host, tmp_path: Path, data_dir: str, kernels: tuple[str, ...],
          elasticity: Elasticity = Elasticity()) -> Node:
    out = tmp_path / host.address / CHECKPOINT_NAME
    out.parent.mkdir(parents=True)
    log = tmp_path / f"{host.address}.log"
    command = host.command(*multinode_command(host, head, elasticity), "-m", "training",
                           *RECIPE, *MACHINE, *kernels, "--data-dir", data_dir, "--out", str(out))
    with log.open("w") as sink:   # a file, not a pipe: nobody has to drain it while we wait
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                   env=subprocess_env(GLOO_SOCKET_IFNAME=host.interface))
    return Node(host, process, log, out)


def start_both(hosts: tuple[Host, Host], tmp_path, data_dir, kernels: tuple[str, ...],
               elasticity: Elasticity = Elasticity()) -> tuple[Node, Node]:
    """Host a is the head: it keeps the rendezvous store, and its lower address makes it rank 0."""
    a, b = hosts
    return (start(a, a, tmp_path, data_dir, kernels, elasticity),
            start(b, a, tmp_path, data_dir, kernels, elasticity))


def wait_for_first_epoch(head: Node) -> None:
    """Until rank 0 (the head: ranks go by address) saved epoch 1's checkpoint."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not head.out.exists():
        if head.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no epoch-1 checkpoint (torchrun exit {head.process.poll()}):\n{head.text()[-3000:]}")
        time.sleep(0.1)
    time.sleep(0.5)   # into epoch 2: its steps take seconds


# --- resuming by itself when torchrun may restart the workers (fast: no torchrun) ---------------------

@pytest.fixture
def interrupted(tmp_path, quick_checkpoint) -> TrainConfig:
    """The command of a --quick run whose checkpoint at --out is an interrupted run's (without
    what only the end of a run writes)."""
    checkpoint = load_checkpoint(quick_checkpoint)
    checkpoint["metrics"] = {key: value for key, value in checkpoint["metrics"].items()
                             if key not in ("confusion_matrix", "test_acc")}   # what only the end writes
    out = tmp_path / CHECKPOINT_NAME
    save_atomic(checkpoint, out)
    saved = checkpoint["train_config"]
    return TrainConfig(**{**saved, "out": str(out), "threads_per_rank": 1})   # another machine setting: still the run


def test_a_restarted_worker_resumes_its_own_run(interrupted, monkeypatch):
    monkeypatch.setenv(MAX_RESTARTS_ENV, "2")
    assert resume_after_restart(interrupted).resume


def test_without_restarts_or_of_another_recipe_a_run_starts_afresh(interrupted, quick_checkpoint, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv(MAX_RESTARTS_ENV, "0")
    assert not resume_after_restart(interrupted).resume        # without --max-restarts, --resume is the user's
    monkeypatch.setenv(MAX_RESTARTS_ENV, "2")
    nothing_saved = replace(interrupted, out=str(tmp_path / "none.pt"))   # the failure came before epoch 1 ended
    assert not resume_after_restart(nothing_saved).resume
    assert not resume_after_restart(replace(interrupted, lr=interrupted.lr * 2)).resume   # not this job's checkpoint
    assert not resume_after_restart(replace(interrupted, out=str(quick_checkpoint))).resume   # a finished run


def test_ranks_that_would_start_from_different_epochs_stop(interrupted, monkeypatch):
    """A machine without rank 0's checkpoint would start afresh while rank 0 resumes: refused."""
    monkeypatch.setattr(dist, "all_gather_objects", lambda value, context: [value, 0])   # rank 1 found none
    context = dist.DistContext(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="rank 0 after epoch 2, rank 1 after epoch 0"):
        check_ranks_start_alike(resume_state(replace(interrupted, resume=True)), context)
    check_ranks_start_alike(None, context)   # both start afresh


# --- two machines ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir, kernel_args) -> tuple[Node, Node]:
    """One whole two-machine run, also the baseline the resumed run is held to."""
    tmp_path = tmp_path_factory.mktemp("multihost")
    with two_hosts() as hosts:
        nodes = start_both(hosts, tmp_path, data_dir, kernel_args)
        codes = [node.wait() for node in nodes]
    assert codes == [0, 0], "\n\n".join(node.text()[-3000:] for node in nodes)
    return nodes


@pytest.mark.slow
def test_two_machines_train_one_model(uninterrupted):
    head, other = uninterrupted
    checkpoint = load_checkpoint(head.out)
    assert [row["world_size"] for row in checkpoint["history"]] == [2, 2, 2]
    hosts = checkpoint["metrics"]["hosts"]
    assert [(host["address"], host["ranks"]) for host in hosts] == [(head.host.address, [0]),
                                                                   (other.host.address, [1])]
    # Rank 1 wrote the digest of the weights it ended with on its own machine: rank 0's, bit for bit.
    assert not other.out.exists()   # only rank 0 saves checkpoints
    rank1 = json.loads(rank_digest_path(other.out, 1).read_text())
    assert rank1["address"] == other.host.address
    assert rank1["weights_sha256"] == weights_digest(checkpoint["model"])
    assert checkpoint["metrics"]["test_acc"] > 0.9


@pytest.mark.slow
@pytest.mark.reliability
def test_lost_machine_ends_the_job_naming_it(tmp_path, data_dir, kernel_args, reliability_log):
    """Without restarts: the other machine's link goes down mid-epoch and it dies (a power cut:
    nothing more arrives from it); the survivor fails within the peer timeout and names it."""
    with two_hosts() as hosts:
        head, other = start_both(hosts, tmp_path, data_dir, kernel_args)
        wait_for_first_epoch(head)
        other.host.cut_link()
        other.host.kill_all()
        lost_at = time.monotonic()
        code = head.wait()
        took = time.monotonic() - lost_at
    log = head.text()
    reliability_log.append({"check": f"cut one of 2 machines' link mid-epoch (survivor exited in {took:.0f} s, "
                                     f"--peer-timeout-s {PEER_TIMEOUT_S})", "cases": 1,
                            "passed": int(code != 0 and took < LOST_HOST_EXIT_S)})
    assert code != 0, log[-3000:]
    assert took < LOST_HOST_EXIT_S, f"the survivor took {took:.0f} s to give up"
    assert "epoch  1/3" in log and "epoch  2/3" not in log   # lost in the middle of epoch 2
    assert f"lost contact with the other rank(s) of the job (waited at most {PEER_TIMEOUT_S} s): " \
           f"rank 1 on" in log and f"({other.host.address})" in log, log[-3000:]
    assert "[rank0]: Traceback" not in log   # the rank's own message is one line (torchrun adds its summary)


@pytest.mark.slow
@pytest.mark.reliability
def test_lost_machine_with_restarts_resumes_and_finishes(tmp_path, data_dir, uninterrupted, kernel_args,
                                                         reliability_log):
    """Elastic (--nnodes 1:2, --max-restarts): the other machine's torchrun and worker are killed
    mid-epoch; torchrun restarts the survivor's worker alone, which resumes from the epoch-1
    checkpoint by itself and ends as good as the uninterrupted run."""
    # last_call_timeout: how long a rendezvous that has its minimum (1) waits for more machines
    # (30 s by default); both start together, so the first rendezvous fills up before it.
    elastic = Elasticity(nnodes="1:2", max_restarts=2, rdzv_conf=("last_call_timeout=10",))
    with two_hosts() as hosts:
        head, other = start_both(hosts, tmp_path, data_dir, kernel_args, elastic)
        wait_for_first_epoch(head)
        other.host.kill_all()
        lost_at = time.monotonic()
        code = head.wait()
        took = time.monotonic() - lost_at
    log = head.text()
    assert code == 0, log[-3000:]
    assert f"resuming {head.out} after epoch 1/3" in log
    checkpoint = load_checkpoint(head.out)
    assert [row["world_size"] for row in checkpoint["history"]] == [2, 1, 1]
    assert [host["address"] for host in checkpoint["metrics"]["hosts"]] == [head.host.address]
    baseline = load_checkpoint(uninterrupted[0].out)["metrics"]["test_acc"]
    resumed = checkpoint["metrics"]["test_acc"]
    reliability_log.append({"check": f"lose one of 2 machines, elastic (the survivor resumed and finished in {took:.0f} s: "
                                     f"{resumed:.2%} test accuracy, uninterrupted {baseline:.2%})", "cases": 1,
                            "passed": int(abs(resumed - baseline) <= ACCURACY_TOLERANCE), "lost": 0})
    assert abs(resumed - baseline) <= ACCURACY_TOLERANCE, f"resumed {resumed:.2%}, uninterrupted {baseline:.2%}"

