"""Several TorchServe replicas under one supervisord, nginx in front, and rolling model updates.

    python -m serving.fleet start --archive model_store/mnist.mar     # `make fleet` runs this
    fleet is up: http://127.0.0.1:8088 and https://127.0.0.1:8443 (2 replicas serving w-0123456789ab)
    python -m serving.fleet status                                    # JSON: front_door, replicas
    python -m serving.fleet rollout .run/v2/mnist.mar                 # replica by replica
    rolled out 2.0 on replica-0, replica-1 (previous: w-0123456789ab)
    python -m serving.fleet rollout --rollback
    python -m serving.fleet stop                                      # `make fleet-stop`

The layout (names, ports, directories) is serving/fleet/topology.py's; nginx's config is rendered by
serving/fleet/frontdoor.py from serving/nginx.conf.template. supervisord (config generated into the
fleet's run dir) runs each replica as `python -m serving.server run`, which exits non-zero when
its Java dies, so supervisord starts it again; and nginx in the foreground; and, with token auth
on, `follow-keys`, which renders each replica's renewed inference key into nginx's config
(serving/fleet/rotation.py: the fleet's state and nginx following it).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

import click
import psutil   # a TorchServe dependency

from serving.fleet import frontdoor

from serving.server import server
from serving.handler.artifact import MODEL_NAME
from serving.fleet.frontdoor import FrontDoorError, RotationState
from serving.server.pids import our_process
from serving.server.properties import Listener, port_taken, set_properties
from serving.server.readiness import NotReady, check_ready, probe_image, reason, retry
from serving.fleet.rotation import (FleetError, FleetState, ServedArchive, apply_front_door, archive_version, follow_keys,
                                    load_fleet, nginx_master, read_state, write_state)
from serving.server.server import ServerError
from serving.fleet.topology import DEFAULT_REPLICAS, FLEET_DIR, FLEET_FILE, Fleet, Replica, TopologyError
from serving.fleet.replicas import replica_status, rollout

SUPERVISORD = Path(sys.executable).with_name("supervisord")
SUPERVISORCTL = Path(sys.executable).with_name("supervisorctl")
REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300.0      # two replicas loading their workers at once on two cores
REPLICA_STOP_S = 40          # `run` gives Java 30 s after SIGTERM, then kills it


# --- start and stop -----------------------------------------------------------------------------
def supervisord_config(fleet: Fleet) -> str:
    logs = fleet.run_dir / "logs"
    lines = ["[supervisord]", f"logfile={logs}/supervisord.log", f"pidfile={fleet.run_dir}/supervisord.pid",
             f"directory={fleet.run_dir}", "",
             "[unix_http_server]", f"file={fleet.run_dir}/supervisor.sock", "chmod=0700", "",
             "[rpcinterface:supervisor]",
             "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
             "[supervisorctl]", f"serverurl=unix://{fleet.run_dir}/supervisor.sock", ""]
    programs = {replica.name: (replica.run_command(), replica.run_dir) for replica in fleet.replicas}
    programs["nginx"] = (frontdoor.nginx_command(fleet.nginx_dir, "-g", "daemon off;"), fleet.run_dir)
    if fleet.token_auth:
        programs["follow-keys"] = ([sys.executable, "-m", "serving.fleet", "follow-keys", "--run-dir",
                                    str(fleet.run_dir)], fleet.run_dir)
    for name, (command, directory) in programs.items():
        quoted = " ".join(f'"{part}"' if " " in part else part for part in command)
        lines += [f"[program:{name}]", f"command={quoted}", f"directory={directory}",
                  f'environment=PYTHONPATH="{REPO_ROOT}"',
                  # Restart whatever ends: a replica whose Java died exits non-zero.
                  "autorestart=true", "startsecs=1", "startretries=100",
                  f"stopwaitsecs={REPLICA_STOP_S}", "stopasgroup=false",
                  "redirect_stderr=true", f"stdout_logfile={logs}/{name}.log", ""]
    return "\n".join(lines)


def supervisord_process(fleet: Fleet) -> psutil.Process | None:
    """This fleet's supervisord: started with this run dir's config (start)."""
    return our_process(fleet.run_dir / "supervisord.pid", "supervisord", f"-c {fleet.run_dir / 'supervisord.conf'}")


def prepare_replica(fleet: Fleet, replica: Replica, archive: Path, served: ServedArchive) -> None:
    replica.model_store.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(archive, replica.model_store / served.file)
    text = set_properties(fleet.base_config.read_text(), replica.settings(fleet.config, fleet.workers_per_replica, served.file))
    replica.config.write_text(text)


class FleetRunning(FleetError):
    """start: a fleet is up from this run dir already."""


def start(fleet: Fleet, archive: str | Path, timeout_s: float = START_TIMEOUT_S) -> ServedArchive:
    """Start the replicas and nginx under supervisord; return once the front door answers.
    FleetRunning when this run dir's fleet is up."""
    archive = Path(archive)
    if supervisord_process(fleet) is not None:
        raise FleetRunning(f"a fleet is already running from {fleet.run_dir}: `make fleet-stop` first")
    if not archive.is_file():
        raise FleetError(f"no model archive at {archive}: `make archive` first")
    try:
        server.require_java()
        frontdoor.render(fleet, RotationState())   # a bad origin or key file: refused before anything starts
    except (ServerError, FrontDoorError) as error:
        raise FleetError(str(error)) from None
    check_ports_free(fleet)
    version = archive_version(archive)
    served = ServedArchive(version, f"{MODEL_NAME}-{version}.mar")
    (fleet.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (fleet.run_dir / FLEET_FILE).write_text(fleet.to_json())
    for replica in fleet.replicas:
        prepare_replica(fleet, replica, archive, served)
    state = FleetState(served)
    write_state(fleet, state)
    try:
        frontdoor.make_certificate(fleet)
        if fleet.token_auth:   # a fresh secret for the key hops at each start: an old one stops working
            frontdoor.new_hop_secret(frontdoor.hop_secret_path(fleet))
        apply_front_door(fleet, state, reload=False)
    except FrontDoorError as error:
        raise FleetError(str(error)) from None
    config = fleet.run_dir / "supervisord.conf"
    config.write_text(supervisord_config(fleet))
    launched = subprocess.run([str(SUPERVISORD), "-c", str(config)], capture_output=True, text=True)
    if launched.returncode != 0:
        raise FleetError(f"supervisord did not start: {launched.stderr.strip() or launched.stdout.strip()}")
    try:
        wait_until_serving(fleet, timeout_s)
    except NotReady as error:
        stop(fleet)
        raise FleetError(f"the fleet did not answer within {timeout_s:.0f} s: {error}; "
                         f"see {fleet.run_dir}/logs/") from None
    return served


def check_ports_free(fleet: Fleet) -> None:
    """FleetError naming a port another program holds: under supervisord, nginx or a replica would
    only fail and be restarted again and again while start waited."""
    door = fleet.front_door
    wanted = [Listener("front door http_port", door.address, door.http_port),
              Listener("front door tls_port", door.address, door.tls_port)]
    for replica in fleet.replicas:
        ports = asdict(replica.ports)
        ports.pop("initial_worker")   # names unix sockets in the replica's own dir, not a TCP port
        if not fleet.token_auth:
            ports.pop("key_hop")
        wanted += [Listener(f"{replica.name} {name}", "127.0.0.1", port) for name, port in ports.items()]
    for listener in wanted:
        why = port_taken(listener)
        if why is not None:
            raise FleetError(f"port {listener.port} ({listener.key}) is taken: {why}; stop what holds it "
                             "or choose other ports")


def wait_until_serving(fleet: Fleet, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for replica in fleet.replicas:
        retry(lambda: check_ready(replica.config, replica.run_dir), max(1.0, deadline - time.monotonic()))
    retry(lambda: probe_front_door(fleet), max(1.0, deadline - time.monotonic()))


def probe_front_door(fleet: Fleet) -> dict:
    """The probe image through the front door (with a client key when it asks for one)."""
    door = fleet.front_door
    headers = {"Content-Type": "application/octet-stream"}
    if door.api_keys_file:
        headers["X-API-Key"] = frontdoor.read_client_keys(door.api_keys_file)[0]
    sent = urllib.request.Request(f"{door.http_url}/predictions/{MODEL_NAME}", data=probe_image(), headers=headers)
    try:
        with urllib.request.urlopen(sent, timeout=10) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as error:
        raise NotReady(f"{door.http_url}: {reason(error)}") from None


def stop(fleet: Fleet, timeout_s: float = REPLICA_STOP_S + 20) -> bool:
    """Stop everything the fleet started; False when nothing was running."""
    process = supervisord_process(fleet)
    if process is None:
        return False
    # supervisord stops its programs (SIGTERM: each replica's `run` stops its Java) and exits.
    subprocess.run([str(SUPERVISORCTL), "-c", str(fleet.run_dir / "supervisord.conf"), "shutdown"],
                   capture_output=True, text=True)
    try:
        process.wait(timeout_s)
    except psutil.TimeoutExpired:
        raise FleetError(f"supervisord (pid {process.pid}) is still running {timeout_s:.0f} s after shutdown: "
                         f"`kill {process.pid}`") from None
    return True


# --- status -------------------------------------------------------------------------------------
def status(fleet: Fleet) -> dict:
    state, nginx = read_state(fleet), nginx_master(fleet.nginx_dir)
    door = fleet.front_door
    return {"front_door": {"http": door.http_url, "https": door.https_url, "nginx_pid": nginx.pid if nginx else None,
                           "supervisord_pid": getattr(supervisord_process(fleet), "pid", None),
                           "out_of_rotation": list(state.down), "rate_limit_per_s": door.rate_limit_per_s,
                           "origins": list(door.origins), "client_keys": door.api_keys_file is not None,
                           "serving": state.serving.version,
                           "previous": state.previous.version if state.previous else None},
            "replicas": [replica_status(replica) for replica in fleet.replicas]}


# --- commands -----------------------------------------------------------------------------------
def fleet_errors():
    return (FleetError, FrontDoorError, TopologyError, OSError)


@click.group()
def main() -> None:
    """Replicas of TorchServe behind nginx: start, stop, status, rollout."""


RUN_DIR_OPTION = click.option("--run-dir", default=str(FLEET_DIR), show_default=True)


@main.command("start")
@click.option("--archive", default="model_store/mnist.mar", show_default=True)
@click.option("--replicas", type=click.IntRange(min=1), default=DEFAULT_REPLICAS, show_default=True, envvar="REPLICAS")
@click.option("--workers", type=click.IntRange(min=1), default=None, envvar="FLEET_WORKERS",
              help="Workers per replica [the cores this machine gives, shared by the replicas].")
@click.option("--config", default="config.properties", show_default=True, type=click.Path(exists=True, dir_okay=False))
@RUN_DIR_OPTION
@click.option("--origins", envvar="FLEET_ORIGINS", default="", help="Comma-separated origins allowed by CORS.")
@click.option("--rate-limit", type=click.IntRange(min=1), envvar="FLEET_RATE_LIMIT", default=None,
              help="Requests/s per client address.")
@click.option("--trusted-proxies", envvar="FLEET_TRUSTED_PROXIES", default="",
              help="Comma-separated proxy addresses/ranges whose X-Forwarded-For the rate limit trusts.")
@click.option("--api-keys", envvar="FLEET_API_KEYS", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A file of allowed client keys (X-API-Key); none: no key asked.")
@click.option("--tls-cert", envvar="FLEET_TLS_CERT", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--tls-key", envvar="FLEET_TLS_KEY", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--http-port", type=int, default=None, help="Front door HTTP port [8088].")
@click.option("--tls-port", type=int, default=None, help="Front door TLS port [8443].")
@click.option("--base-port", type=int, default=None, help="First replica port [9080].")
def start_command(archive, replicas, workers, config, run_dir, origins, rate_limit, trusted_proxies, api_keys, tls_cert, tls_key,
                  http_port, tls_port, base_port) -> None:
    """Start the replicas and the front door; exit 0 once a probe image is answered through it."""
    door = {key: value for key, value in
            {"origins": tuple(o.strip() for o in origins.split(",") if o.strip()), "rate_limit_per_s": rate_limit,
             "trusted_proxies": tuple(p.strip() for p in trusted_proxies.split(",") if p.strip()),
             "api_keys_file": api_keys and Path(api_keys).resolve(), "tls_cert": tls_cert and Path(tls_cert).resolve(),
             "tls_key": tls_key and Path(tls_key).resolve(), "http_port": http_port, "tls_port": tls_port}.items()
            if value is not None}
    if bool(tls_cert) != bool(tls_key):
        raise click.ClickException("give both FLEET_TLS_CERT and FLEET_TLS_KEY, or neither")
    try:
        fleet = Fleet.plan(replicas, run_dir, config, workers=workers,
                           **({"base_port": base_port} if base_port else {}), **door)
        served = start(fleet, archive)
    except FleetRunning:
        try:
            return serve_on(run_dir, archive)
        except fleet_errors() as error:
            raise click.ClickException(str(error)) from None
    except fleet_errors() as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"fleet is up: {fleet.front_door.http_url} and {fleet.front_door.https_url} "
               f"({len(fleet.replicas)} replicas of {fleet.workers_per_replica} workers serving {served.version}); "
               f"logs: {run_dir}/logs")


def serve_on(run_dir: str, archive: str) -> None:
    """`make fleet` with the fleet up (like `make serve` with its server up): exit 0, saying so;
    when the archive built since holds another version, roll it out (no request lost)."""
    fleet = load_fleet(run_dir)
    serving, wanted = read_state(fleet).serving.version, archive_version(Path(archive))
    if wanted == serving:
        click.echo(f"fleet is already running from {run_dir}: {fleet.front_door.http_url} serving {serving}. "
                   f"Stop it with `make fleet-stop`.")
        return
    click.echo(f"fleet is already running from {run_dir} and serves {serving}; {archive} holds {wanted}: "
               f"rolling it out")
    state = rollout(fleet, archive)
    click.echo(f"rolled out {state.serving.version} on {', '.join(r.name for r in fleet.replicas)} "
               f"(previous: {state.previous.version}; `python -m serving.fleet rollout --rollback` returns)")


@main.command("stop")
@RUN_DIR_OPTION
def stop_command(run_dir: str) -> None:
    """Stop the replicas, nginx and supervisord."""
    try:
        stopped = Path(run_dir, FLEET_FILE).is_file() and stop(load_fleet(run_dir))
    except fleet_errors() as error:
        raise click.ClickException(str(error)) from None
    click.echo("fleet stopped." if stopped else f"no fleet running from {run_dir}")


@main.command("status")
@RUN_DIR_OPTION
def status_command(run_dir: str) -> None:
    """JSON: the front door, and each replica's ports, Java pid, served version and readiness."""
    try:
        click.echo(json.dumps(status(load_fleet(run_dir)), indent=1))
    except fleet_errors() as error:
        raise click.ClickException(str(error)) from None


@main.command("rollout")
@click.argument("archive", required=False, type=click.Path(dir_okay=False))
@click.option("--rollback", is_flag=True, help="Return to the version served before the last rollout.")
@RUN_DIR_OPTION
def rollout_command(archive: str | None, rollback: bool, run_dir: str) -> None:
    """Switch every replica, one at a time, to ARCHIVE's version (or back, with --rollback)."""
    if bool(archive) == rollback:
        raise click.ClickException("give an ARCHIVE to roll out, or --rollback (not both)")
    try:
        fleet = load_fleet(run_dir)
        state = rollout(fleet, archive, rollback)
    except fleet_errors() as error:
        raise click.ClickException(str(error)) from None
    previous = f"previous: {state.previous.version}" if state.previous else "rolled back: no older version kept"
    click.echo(f"rolled out {state.serving.version} on {', '.join(r.name for r in fleet.replicas)} ({previous})")


@main.command("follow-keys", hidden=True)
@RUN_DIR_OPTION
def follow_keys_command(run_dir: str) -> None:
    """Under supervisord, with token auth: keep nginx's replica keys current."""
    try:
        follow_keys(load_fleet(run_dir))
    except fleet_errors() as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
