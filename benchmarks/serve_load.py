"""Serving load test: a real TorchServe on free loopback ports, loaded by wrk with keep-alive.

    python -m benchmarks.serve_load --batch-size 16 --max-batch-delay 5 --connections 16

builds an archive with the given batching/worker settings, starts the server, POSTs a real
MNIST test digit for --duration seconds per connection count, and prints (and with --json
writes) requests/s, latency percentiles and non-2xx counts. wrk must be installed
(`apt-get install wrk`); requests only go to 127.0.0.1. The front door's rows: benchmarks/front_door.py.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import yaml

from serving.server import server
from serving.server.properties import free_ports, instance_config, read_properties, workers_per_model
from serving.handler.artifact import MODEL_NAME, TORCHSCRIPT_NAME, artifact_path
from serving.server.archive import SHIPPED_DIR, ArchiveError, build_archive
from serving.fleet.fleet import FleetError
from serving.fleet.frontdoor import FrontDoorError
from serving.server.server import ServerError
from serving.kserve.launcher import EngineError
from serving.kserve import launcher as kserve_engine
from training.samples import write_samples

REPO_ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPT = """
local file = io.open("{image}", "rb")
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "image/png"
{headers}"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


class LoadToolMissing(Exception):
    """wrk, which drives the load, is not installed."""


# What building the archive, starting the server or finding wrk may raise: the commands print it in one line.
SERVING_ERRORS = (ArchiveError, ServerError, FleetError, FrontDoorError, EngineError, LoadToolMissing)


@dataclass(frozen=True)
class ServeSettings:
    workers: int
    threads_per_worker: int
    batch_size: int
    max_batch_delay_ms: int
    serialized_file: str = artifact_path(TORCHSCRIPT_NAME)

    @classmethod
    def shipped(cls) -> "ServeSettings":
        """The settings `make serve` runs: the archive's (serving/handler/model-config.yaml) and
        config.properties' worker count (the archive names none)."""
        config = yaml.safe_load((SHIPPED_DIR / "model-config.yaml").read_text())
        workers = workers_per_model(read_properties(REPO_ROOT / "config.properties"))
        return cls(workers, config["handler"]["threads"], config["batchSize"], config["maxBatchDelay"])


SHIPPED = ServeSettings.shipped()


@dataclass
class LoadResult:
    connections: int
    duration_s: float
    requests: int
    requests_per_s: float
    latency_ms: dict
    non_2xx: int
    socket_errors: int


def model_config_for(settings: ServeSettings, path: Path) -> Path:
    config = yaml.safe_load((SHIPPED_DIR / "model-config.yaml").read_text())
    config.update(minWorkers=settings.workers, maxWorkers=settings.workers, batchSize=settings.batch_size,
                  maxBatchDelay=settings.max_batch_delay_ms)
    config.setdefault("handler", {})["threads"] = settings.threads_per_worker
    path.write_text(yaml.safe_dump(config))
    return path


def parse_wrk(output: str, connections: int, duration_s: float) -> LoadResult:
    latency = {}
    for percentile, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.M):
        latency[f"p{percentile}"] = float(value) * UNITS[unit]
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return LoadResult(connections, duration_s, requests, float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
                      latency, int(non_2xx.group(1)) if non_2xx else 0,
                      sum(map(int, errors.groups())) if errors else 0)


def wrk_command(url: str, image: Path, connections: int, duration_s: float, workdir: Path,
                threads: int = 2, headers: dict[str, str] | None = None) -> list[str]:
    script = workdir / f"post_digit_{abs(hash((url, tuple((headers or {}).items()))))}.lua"
    script.write_text(WRK_SCRIPT.format(image=image, headers="".join(
        f'wrk.headers["{name}"] = "{value}"\n' for name, value in (headers or {}).items())))
    return ["wrk", "-t", str(min(threads, connections)), "-c", str(connections), "-d", f"{duration_s:g}s",
            "--timeout", "10s", "--latency", "-s", str(script), url]


def run_wrk(url: str, image: Path, connections: int, duration_s: float, workdir: Path) -> LoadResult:
    output = subprocess.run(wrk_command(url, image, connections, duration_s, workdir),
                            capture_output=True, text=True, check=True, timeout=duration_s + 60).stdout
    return parse_wrk(output, connections, duration_s)


@dataclass(frozen=True)
class Target:
    """One server wrk loads: its URL and the headers it needs (a replica's key)."""
    url: str
    headers: dict


def run_wrk_spread(targets: list[Target], image: Path, connections: int, duration_s: float,
                   workdir: Path) -> LoadResult:
    """`connections` clients spread evenly over `urls` at once (one wrk each, one thread each: the
    same two client threads as run_wrk): what the front door's replicas serve without it.
    Requests add up; a percentile is the highest of the wrk runs' (an upper bound of the whole's)."""
    share = connections // len(targets)
    runs = [subprocess.Popen(wrk_command(target.url, image, share, duration_s, workdir,
                                         threads=max(1, 2 // len(targets)), headers=target.headers),
                             stdout=subprocess.PIPE, text=True) for target in targets]
    results = []
    for run in runs:
        output, _ = run.communicate(timeout=duration_s + 60)
        if run.returncode:
            raise subprocess.CalledProcessError(run.returncode, run.args, output)
        results.append(parse_wrk(output, share, duration_s))
    return combined(results, share * len(targets), duration_s, sum(r.requests_per_s for r in results))


def combined(results: list[LoadResult], connections: int, duration_s: float, requests_per_s: float,
             percentile=max) -> LoadResult:
    """wrk runs as one result: requests and errors added, each percentile `percentile` of the runs'
    (by default the highest: an upper bound of the whole's); the caller says what the rate and
    duration are."""
    return LoadResult(connections, duration_s, sum(r.requests for r in results), requests_per_s,
                      {p: float(percentile([r.latency_ms.get(p, 0.0) for r in results]))
                       for p in results[0].latency_ms},
                      sum(r.non_2xx for r in results), sum(r.socket_errors for r in results))


def measure(settings: ServeSettings, connection_counts=(1, 16), duration_s: float = 10.0,
            data_dir: str | None = None, base_config: Path = REPO_ROOT / "config.properties",
            **config_settings: str) -> list[LoadResult]:
    """wrk against a TorchServe of its own; config_settings override config.properties keys."""
    if shutil.which("wrk") is None:
        raise LoadToolMissing("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="serve_load_") as temp:
        workdir = Path(temp)
        store = workdir / "model_store"
        build_archive(settings.serialized_file, store, model_config_for(settings, workdir / "model-config.yaml"))
        image = write_samples(data_dir, workdir / "samples")[7]
        config, inference, _ = instance_config(base_config, workdir, store, **config_settings)
        server.start(str(config), workdir / "run")
        try:
            run_wrk(f"{inference}/predictions/{MODEL_NAME}", image, 4, 2, workdir)   # warm-up, discarded
            return [run_wrk(f"{inference}/predictions/{MODEL_NAME}", image, c, duration_s, workdir)
                    for c in connection_counts]
        finally:
            server.stop(workdir / "run")


# The engines' rows (docs/engines.md): the same exported file on TorchServe (its archive, the shipped
# model-config.yaml) and on the KServe engine (python -m serving.kserve), loaded in turn by the same wrk.
ENGINE_ROWS = ("TorchServe (archive, serving/handler/model-config.yaml)", "KServe engine (python -m serving.kserve)")


def measure_engines(serialized_file: str, connections: int = 16, duration_s: float = 10.0,
                    data_dir: str | None = None, base_config: Path = REPO_ROOT / "config.properties"
                    ) -> dict[str, LoadResult]:
    """wrk at `connections` clients against each engine serving serialized_file, one row each (ENGINE_ROWS)."""
    torchserve = replace(SHIPPED, serialized_file=serialized_file)
    return {ENGINE_ROWS[0]: measure(torchserve, (connections,), duration_s, data_dir, base_config)[0],
            ENGINE_ROWS[1]: measure_kserve(serialized_file, connections, duration_s, data_dir, base_config)}


def measure_kserve(serialized_file: str, connections: int = 16, duration_s: float = 10.0,
                   data_dir: str | None = None, base_config: Path = REPO_ROOT / "config.properties") -> LoadResult:
    """wrk against a KServe engine of its own (python -m serving.kserve) serving serialized_file."""
    if shutil.which("wrk") is None:
        raise LoadToolMissing("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="kserve_load_") as temp:
        workdir = Path(temp)
        image = write_samples(data_dir, workdir / "samples")[7]
        port, grpc_port = free_ports(2)
        engine = kserve_engine.start(serialized_file, workdir / "kserve", port=port, grpc_port=grpc_port,
                                     config=base_config)
        try:
            url = f"{engine.address}/predictions/{MODEL_NAME}"
            run_wrk(url, image, 4, 2, workdir)   # warm-up, discarded
            return run_wrk(url, image, connections, duration_s, workdir)
        finally:
            kserve_engine.stop(workdir / "kserve")


def format_results(settings: ServeSettings, results: list[LoadResult]) -> str:
    lines = [f"workers={settings.workers} threads/worker={settings.threads_per_worker} "
             f"batch={settings.batch_size} delay={settings.max_batch_delay_ms}ms",
             "clients  requests/s    p50 ms   p90 ms   p99 ms  non-2xx  socket errors"]
    for r in results:
        lines.append(f"{r.connections:>7}  {r.requests_per_s:>10.0f}  {r.latency_ms.get('p50', 0):>8.2f} "
                     f"{r.latency_ms.get('p90', 0):>8.2f} {r.latency_ms.get('p99', 0):>8.2f}  {r.non_2xx:>7}  "
                     f"{r.socket_errors:>13}")
    return "\n".join(lines)


@click.command()
@click.option("--workers", type=click.IntRange(min=1), default=SHIPPED.workers, show_default=True)
@click.option("--threads", "threads_per_worker", type=click.IntRange(min=1), default=SHIPPED.threads_per_worker,
              show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=SHIPPED.batch_size, show_default=True)
@click.option("--max-batch-delay", "max_batch_delay_ms", type=click.IntRange(min=0),
              default=SHIPPED.max_batch_delay_ms, show_default=True)
@click.option("--model", "serialized_file", default=SHIPPED.serialized_file, show_default=True)
@click.option("--connections", default="1,16", show_default=True, help="Comma-separated client counts.")
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds per client count.")
@click.option("--data-dir", envvar="MNIST_DATA_DIR", default=None)
@click.option("--json", "json_path", default=None, help="Also write the results here.")
def main(connections, duration, data_dir, json_path, **settings) -> None:
    """Load-test TorchServe with the given batching and worker settings."""
    settings = ServeSettings(**settings)
    counts = [int(c) for c in connections.split(",")]
    try:
        results = measure(settings, counts, duration, data_dir)
    except SERVING_ERRORS as error:
        raise click.ClickException(str(error)) from None
    click.echo(format_results(settings, results))
    if json_path:
        Path(json_path).write_text(json.dumps({"settings": asdict(settings),
                                               "results": [asdict(r) for r in results]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
