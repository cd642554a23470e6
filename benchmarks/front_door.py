"""The front door's cost: wrk through a fleet's nginx (HTTP and TLS) and straight to the same replicas.

    python -m benchmarks.front_door --connections 16 --duration 5 --data-dir ../shared/mnist

starts a fleet of two replicas (serving/fleet) on free loopback ports, warms each row up, then
measures the three rows in turn for FRONT_DOOR_ROUNDS rounds and prints each row's requests/s,
p50/p99, the front door's cost per round and in all (paired_cost), and where the CPU went: each
process kind's CPU time per request and the machine's idle share (CpuUse). `make bench` writes the
same rows into benchmarks/RESULTS.md. wrk must be installed; requests only go to 127.0.0.1.
"""
from __future__ import annotations

import functools
import operator
import resource
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import click
import psutil

from serving.fleet import fleet as fleet_stage
from serving.fleet.topology import Fleet, ReplicaPorts
from serving.handler.artifact import MODEL_NAME
from serving.server.archive import build_archive
from serving.server.properties import free_ports
from serving.server.readiness import inference_key
from training.samples import write_samples

from .serve_load import (REPO_ROOT, SERVING_ERRORS, SHIPPED, LoadResult, LoadToolMissing, Target, combined, run_wrk,
                         run_wrk_spread)


# The front door's rows: nginx (HTTP, then TLS) in front of the fleet's replicas, and the same
# replicas called directly, the clients spread over them: what the proxy costs at equal capacity.
FRONT_DOOR_ROWS = ("front door, HTTP", "front door, TLS", "direct to the replicas")
NO_RATE_LIMIT = 1_000_000   # requests/s: wrk from one address must measure nginx, not its limit


def fleet_on_free_ports(workdir: Path, replicas: int, base_config: Path) -> Fleet:
    workdir.chmod(0o711)   # a TemporaryDirectory is 0700: nginx's workers (nobody, under root) must enter it
    per_replica = len(fields(ReplicaPorts))
    ports = free_ports(replicas * per_replica + 2)
    replica_ports = [ReplicaPorts(*ports[i * per_replica:(i + 1) * per_replica]) for i in range(replicas)]
    return Fleet.plan(replicas, workdir / "fleet", base_config, replica_ports=replica_ports, http_port=ports[-2],
                      tls_port=ports[-1], rate_limit_per_s=NO_RATE_LIMIT)


FRONT_DOOR_WARM_UP_S = 5.0   # per row, at full load, discarded: the replicas' Java is still compiling for a minute
# The rows measured in turn, forwards then backwards (HTTP, TLS, direct, direct, TLS, HTTP): each
# row's mean position in time is the same, so a steady drift of the machine touches each alike. A
# row's rate is its rounds' mean, each latency percentile their median: one stall of the machine
# lifts a 5 s run's p99 (~50 requests) by tens of ms in whichever row it falls. Its cost: paired_cost.
FRONT_DOOR_ROUNDS = 6


def round_order(rows: list[str], round_index: int) -> list[str]:
    """The rows in the order round_index measures them: forwards in even rounds, backwards in odd ones."""
    return list(rows) if round_index % 2 == 0 else list(reversed(rows))


def merged(results: list[LoadResult]) -> LoadResult:
    """Runs of one row (the same load, in turn with the others) as one: requests and errors added,
    the rate their mean, each latency percentile their median."""
    return combined(results, results[0].connections, sum(r.duration_s for r in results),
                    sum(r.requests_per_s for r in results) / len(results), percentile=statistics.median)


def round_costs(rates: list[float], direct_rates: list[float]) -> list[float]:
    """Each round's own cost of a front-door row: the share of that round's direct rate it lost. A
    round measures the three rows within seconds of one another, on one state of the machine."""
    if not rates or len(rates) != len(direct_rates):
        raise ValueError(f"{len(rates)} front-door rounds against {len(direct_rates)} direct ones")
    return [1 - rate / direct for rate, direct in zip(rates, direct_rates)]


def paired_cost(rates: list[float], direct_rates: list[float]) -> float:
    """A row's cost: its rounds' median. A stall in one 5 s run moves one round's cost, not this."""
    return statistics.median(round_costs(rates, direct_rates))


def cost_text(rates: list[float], direct_rates: list[float]) -> str:
    return (f"{paired_cost(rates, direct_rates):.0%} (rounds: "
            + " ".join(f"{cost:.0%}" for cost in round_costs(rates, direct_rates)) + ")")


# Where a row's CPU went: the fleet's processes by kind (supervisord's descendants), and wrk (this
# process's waited-for children). Their CPU times are read around each run.
PROCESS_KINDS = ("nginx", "TorchServe Java", "TorchServe workers", "wrk")


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds per process kind over some runs, and the machine's idle and total core-seconds."""
    seconds: dict
    idle_s: float
    machine_s: float

    def joined(self, other: CpuSample, op) -> CpuSample:
        """op (operator.add or operator.sub) applied to each figure of the two samples."""
        return CpuSample({kind: op(self.seconds[kind], other.seconds[kind]) for kind in PROCESS_KINDS},
                         op(self.idle_s, other.idle_s), op(self.machine_s, other.machine_s))

    def __sub__(self, earlier: CpuSample) -> CpuSample:
        return self.joined(earlier, operator.sub)

    def __add__(self, other: CpuSample) -> CpuSample:
        return self.joined(other, operator.add)


@dataclass(frozen=True)
class CpuUse:
    """A row's CPU: milliseconds of CPU time per request for each process kind, and the share of
    the machine's core time that stayed idle while it ran."""
    ms_per_request: dict
    idle_share: float


KIND_BY_NAME = {"nginx": PROCESS_KINDS[0], "java": PROCESS_KINDS[1]}


def process_kind(process: psutil.Process) -> str | None:
    if process.name() in KIND_BY_NAME:
        return KIND_BY_NAME[process.name()]
    return PROCESS_KINDS[2] if any("model_service_worker" in part for part in process.cmdline()) else None


def fleet_processes(fleet: Fleet) -> dict[str, list[psutil.Process]]:
    """The fleet's running processes of each kind whose CPU a row counts (wrk's is read apart)."""
    found = {kind: [] for kind in PROCESS_KINDS[:3]}
    for process in fleet_stage.supervisord_process(fleet).children(recursive=True):
        try:
            kind = process_kind(process)
        except psutil.Error:   # gone since the listing
            continue
        if kind:
            found[kind].append(process)
    return found


def cpu_sample(fleet: Fleet) -> CpuSample:
    """The fleet's processes' CPU seconds so far, by kind; wrk's (waited-for children); the machine's."""
    seconds = dict.fromkeys(PROCESS_KINDS, 0.0)
    for kind, processes in fleet_processes(fleet).items():
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.Error:   # gone since the listing: its time is not counted
                continue
            seconds[kind] += times.user + times.system
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds[PROCESS_KINDS[3]] = children.ru_utime + children.ru_stime
    machine = psutil.cpu_times()
    idle = machine.idle + getattr(machine, "iowait", 0.0)
    return CpuSample(seconds, idle, sum(machine))


def cpu_use(sample: CpuSample, requests: int) -> CpuUse:
    return CpuUse({kind: 1000 * seconds / max(1, requests) for kind, seconds in sample.seconds.items()},
                  sample.idle_s / sample.machine_s if sample.machine_s > 0 else 0.0)


@dataclass(frozen=True)
class FrontDoorRow:
    """One row: its rounds merged (merged), each round's requests/s in order, and its CPU."""
    load: LoadResult
    round_rates: tuple
    cpu: CpuUse

    def as_json(self) -> dict:
        """The row as results.json keeps it: the load's fields, with the rounds' rates and the CPU."""
        return {**asdict(self.load), "round_rates": list(self.round_rates), "cpu": asdict(self.cpu)}


def measured_row(runs: list[LoadResult], samples: list[CpuSample]) -> FrontDoorRow:
    load = merged(runs)
    return FrontDoorRow(load, tuple(run.requests_per_s for run in runs),
                        cpu_use(functools.reduce(operator.add, samples), load.requests))


def measure_front_door(serialized_file: str, connections: int = 16, duration_s: float = 5.0,
                       data_dir: str | None = None, replicas: int = 2,
                       base_config: Path = REPO_ROOT / "config.properties") -> dict[str, FrontDoorRow]:
    """wrk at `connections` clients through a fleet's front door (HTTP, TLS) and straight to its
    replicas (the clients spread over them), one row each (FRONT_DOOR_ROWS): after a warm-up of
    each, the three measured in turn FRONT_DOOR_ROUNDS times (round_order), duration_s each time."""
    if shutil.which("wrk") is None:
        raise LoadToolMissing("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="front_door_") as temp:
        workdir = Path(temp)
        archive = build_archive(serialized_file, workdir / "model_store")
        image = write_samples(data_dir, workdir / "samples")[7]
        fleet = fleet_on_free_ports(workdir, replicas, base_config)
        fleet_stage.start(fleet, archive)
        path = f"/predictions/{MODEL_NAME}"
        direct = [Target(f"{replica.inference_url}{path}", replica_headers(replica)) for replica in fleet.replicas]
        loads = {FRONT_DOOR_ROWS[0]: lambda seconds: run_wrk(f"{fleet.front_door.http_url}{path}", image,
                                                             connections, seconds, workdir),
                 FRONT_DOOR_ROWS[1]: lambda seconds: run_wrk(f"{fleet.front_door.https_url}{path}", image,
                                                             connections, seconds, workdir),
                 FRONT_DOOR_ROWS[2]: lambda seconds: run_wrk_spread(direct, image, connections, seconds, workdir)}
        try:
            for load in loads.values():
                load(FRONT_DOOR_WARM_UP_S)
            runs, samples = {row: [] for row in loads}, {row: [] for row in loads}
            for round_index in range(FRONT_DOOR_ROUNDS):
                for row in round_order(list(loads), round_index):
                    before = cpu_sample(fleet)
                    runs[row].append(loads[row](duration_s))
                    samples[row].append(cpu_sample(fleet) - before)
            return {row: measured_row(runs[row], samples[row]) for row in loads}
        finally:
            fleet_stage.stop(fleet)


def replica_headers(replica) -> dict[str, str]:
    """Every fleet replica runs token auth (serving/fleet/topology.py): called directly, it
    needs its inference key, which the front door otherwise adds."""
    key = inference_key(replica.key_file)
    return {"Authorization": f"Bearer {key}"} if key else {}


def cpu_text(cpu: dict) -> str:
    """A row's CPU as one phrase (cpu: CpuUse as results.json keeps it)."""
    return (", ".join(f"{kind} {ms:.2f}" for kind, ms in cpu["ms_per_request"].items())
            + f" ms a request; machine idle {cpu['idle_share']:.1%}")


def format_front_door(rows: dict[str, FrontDoorRow], connections: int, duration_s: float) -> str:
    direct = rows[FRONT_DOOR_ROWS[2]].round_rates
    lines = [f"{connections} clients, {duration_s:g} s each, {FRONT_DOOR_ROUNDS} rounds"]
    for name, row in rows.items():
        r = row.load
        lines.append(f"{name:<22} {r.requests_per_s:>8.0f} req/s  p50 {r.latency_ms.get('p50', 0):6.2f} ms  "
                     f"p99 {r.latency_ms.get('p99', 0):6.2f} ms  non-2xx {r.non_2xx}  socket errors {r.socket_errors}"
                     + (f"  cost {cost_text(row.round_rates, direct)}" if name != FRONT_DOOR_ROWS[2] else ""))
        lines.append(f"{'':<22} CPU: {cpu_text(asdict(row.cpu))}")
    return "\n".join(lines)


@click.command()
@click.option("--model", "serialized_file", default=SHIPPED.serialized_file, show_default=True)
@click.option("--connections", type=click.IntRange(min=2), default=16, show_default=True)
@click.option("--duration", type=float, default=5.0, show_default=True, help="Seconds per row and round.")
@click.option("--data-dir", envvar="MNIST_DATA_DIR", default=None)
def main(serialized_file, connections, duration, data_dir) -> None:
    """Measure what a fleet's front door costs against its replicas called directly."""
    try:
        rows = measure_front_door(serialized_file, connections, duration, data_dir)
    except SERVING_ERRORS as error:
        raise click.ClickException(str(error)) from None
    click.echo(format_front_door(rows, connections, duration))


if __name__ == "__main__":
    main()
