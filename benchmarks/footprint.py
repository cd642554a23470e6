"""The memory one TorchServe replica takes: what the Kubernetes manifests request and limit.

    python -m benchmarks.footprint --serialized-file artifacts/mnist_cnn.torchscript.pt
    replica under load: pod 1,234 MiB peak (frontend 456, 2 workers 345 + 344, ...); wrote benchmarks/footprint.json

builds an archive, runs the replica as the container does (`python -m serving.server run`, the
project's config.properties on free loopback ports), loads it with a few clients posting the
readiness probe's image for --seconds, and samples the RSS of every process of the replica
(run, torchserve's launcher, the Java frontend, the Python workers) with psutil. It also
measures one `python -m serving.server ready` call: the exec probe runs inside the pod, so its
memory counts against the pod's limit while it runs. deploy/manifests.py reads the JSON.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import click
import psutil
import torch

from benchmarks.host import cpu_name
from serving.server import server
from serving.server.archive import ArchiveError, build_archive
from serving.handler.artifact import TORCHSCRIPT_NAME, artifact_path
from serving.server.properties import instance_config
from serving.server.readiness import NotReady, check_ready, probe_once, retry
from serving.server.server import ServerError
from serving.fleet.topology import Replica, ReplicaPorts

REPO_ROOT = Path(__file__).resolve().parent.parent
FOOTPRINT_JSON = Path(__file__).resolve().with_name("footprint.json")
MIB = 1024 * 1024
SAMPLE_INTERVAL_S = 0.2
PROBE_SAMPLE_INTERVAL_S = 0.005
START_TIMEOUT_S = 240.0


@dataclass
class PeakRss:
    """Peak resident memory (MiB) of each part of a replica, over every sample taken."""
    run: float = 0.0          # `python -m serving.server run`: the container's main process
    launcher: float = 0.0     # `torchserve --foreground`, which waits for its Java
    frontend: float = 0.0     # TorchServe's Java: HTTP, queues, batching
    workers: dict[int, float] = field(default_factory=dict)   # pid -> peak: one Python process per worker
    pod: float = 0.0          # the whole tree at once: what a memory limit is compared with

    def add(self, tree: list[psutil.Process]) -> None:
        total = 0.0
        for process in tree:
            try:
                rss, command = process.memory_info().rss / MIB, " ".join(process.cmdline())
            except psutil.Error:
                continue   # a worker being replaced
            total += rss
            if server.TORCHSERVE_JAVA_CLASS in command:
                self.frontend = max(self.frontend, rss)
            elif "model_service_worker" in command:
                self.workers[process.pid] = max(self.workers.get(process.pid, 0.0), rss)
            elif "serving.server" in command:
                self.run = max(self.run, rss)
            else:
                self.launcher = max(self.launcher, rss)
        self.pod = max(self.pod, total)


def process_tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


@dataclass
class Load:
    clients: int
    seconds: float
    answered: int = 0
    failed: int = 0

    def run(self, inference: str) -> None:
        """clients threads posting the probe image until seconds have passed."""
        deadline = time.monotonic() + self.seconds
        lock = threading.Lock()

        def client() -> None:
            while time.monotonic() < deadline:
                try:
                    probe_once(inference)
                    ok = True
                except NotReady:
                    ok = False
                with lock:
                    self.answered += ok
                    self.failed += not ok

        threads = [threading.Thread(target=client) for _ in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def ready_probe_rss(replica: Replica) -> float:
    """Peak RSS (MiB) of one `python -m serving.server ready` call, sampled every few ms while it
    runs. Not the kernel's ru_maxrss: a child forked from this process (torch imported) is charged
    this process's memory until it execs, and Linux keeps that peak across the exec."""
    probe = psutil.Popen(replica.probe_command(), cwd=replica.run_dir,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0
    while probe.poll() is None:
        try:
            peak = max(peak, probe.memory_info().rss / MIB)
        except psutil.Error:
            break
        time.sleep(PROBE_SAMPLE_INTERVAL_S)
    if probe.wait() != 0:
        raise ServerError("`serving.server ready` failed on a serving replica")
    return peak


def machine() -> dict:
    model = cpu_name()
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)),
            "memory_gib": round(psutil.virtual_memory().total / 1024 ** 3, 1),
            "python": platform.python_version(), "torch": torch.__version__, "java": java[0] if java else None}


def check_running(process: subprocess.Popen, workdir: Path) -> None:
    if process.poll() is not None:
        raise ServerError(f"the replica exited at start (status {process.returncode}): see {workdir}/run.out")


def measure(serialized_file: str, seconds: float, clients: int, workdir: Path) -> dict:
    """Start a replica in workdir, load it, and return what the JSON records."""
    model_store = workdir / "model_store"
    build_archive(serialized_file, model_store, force=True)   # memory, not accuracy, is measured here
    config, inference, _ = instance_config(REPO_ROOT / "config.properties", workdir, model_store)
    # Run and probed as the fleet and the pods do (serving/fleet/topology.py), in workdir, where
    # instance_config wrote the config; the record's own ports are unused by its commands.
    replica = Replica("footprint", ReplicaPorts.derived(0), workdir)
    with open(workdir / "run.out", "wb") as log:
        process = subprocess.Popen(replica.run_command(), cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    peak, load = PeakRss(), Load(clients, seconds)
    try:
        retry(lambda: check_ready(config, workdir), START_TIMEOUT_S, give_up=lambda: check_running(process, workdir))
        root = psutil.Process(process.pid)
        peak.add(process_tree(root))   # at rest: the model loaded, nothing asked yet
        at_rest = peak.pod
        loader = threading.Thread(target=load.run, args=(inference,))
        loader.start()
        while loader.is_alive():
            peak.add(process_tree(root))
            time.sleep(SAMPLE_INTERVAL_S)
        probe_mib = ready_probe_rss(replica)
    finally:
        process.terminate()   # `run` stops its Java on SIGTERM
        process.wait(60)
    round1 = lambda value: round(value, 1)
    return {"config": str(Path("config.properties")), "serialized_file": serialized_file,
            "workers": len(peak.workers),
            "load": {**asdict(load), "requests_per_s": round(load.answered / seconds, 1)},
            "peak_rss_mib": {"pod": round1(peak.pod), "pod_at_rest": round1(at_rest), "run": round1(peak.run),
                             "launcher": round1(peak.launcher), "frontend": round1(peak.frontend),
                             "workers": sorted(round1(value) for value in peak.workers.values())},
            "ready_probe_rss_mib": round1(probe_mib)}


@click.command()
@click.option("--serialized-file", default=artifact_path(TORCHSCRIPT_NAME), show_default=True)
@click.option("--seconds", default=20.0, show_default=True, help="Seconds of load.")
@click.option("--clients", default=8, show_default=True, help="Concurrent clients.")
@click.option("--out", default=str(FOOTPRINT_JSON), show_default=True)
def main(serialized_file: str, seconds: float, clients: int, out: str) -> None:
    """Measure one replica's memory under load and write the JSON the manifests read."""
    started = datetime.now(timezone.utc)
    try:
        with tempfile.TemporaryDirectory(prefix="footprint-") as workdir:
            result = measure(serialized_file, seconds, clients, Path(workdir))
    except (ArchiveError, ServerError, NotReady) as error:
        raise click.ClickException(str(error)) from None
    record = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "command": "python -m benchmarks.footprint " + " ".join(sys.argv[1:]), **result}
    Path(out).write_text(json.dumps(record, indent=1) + "\n")
    rss = record["peak_rss_mib"]
    click.echo(f"replica under load: pod {rss['pod']:,.0f} MiB peak (frontend {rss['frontend']:,.0f}, "
               f"{len(rss['workers'])} workers {' + '.join(f'{w:,.0f}' for w in rss['workers'])}, "
               f"run {rss['run']:,.0f}, launcher {rss['launcher']:,.0f}); ready probe "
               f"{record['ready_probe_rss_mib']:,.0f} MiB; {record['load']['answered']} requests answered; wrote {out}")


if __name__ == "__main__":
    main()
