"""The key hop of a replica pod: nginx beside TorchServe, adding the replica's current inference
key to every request it forwards, and the loop that keeps that key current. deploy/kubernetes runs
it as the replica pod's second container, on the same image:

    python -m serving.fleet.keyhop --config /srv/replica/config.properties --run-dir /srv/replica \\
        --hop-dir /srv/key-hop --address 0.0.0.0 --port 9086 --secret-file /etc/digitserve/hop-secret/hop-secret.conf
    key hop 0.0.0.0:9086 -> 127.0.0.1:9080, its key from /srv/replica/key_file.json

The whole key-renewal path of a pod reads here: plan (the replica's config parsed once, its run dir,
where the hop listens), render (the fleet's own hop server block, serving/fleet/frontdoor.py
hop_server, inside nginx-key-hop.conf.template), write (`nginx -t`, then in place), follow (a new
key in the key file: render, reload, and return once no old worker accepts, serving/fleet/rotation.py
reloaded_workers). It forwards only requests carrying the front door's secret header (the
Secret both pods mount, included by nginx; checked here before nginx starts). TorchServe
writes its keys into its working dir (the run dir, an emptyDir both containers mount) and
`serving.server run` renews them at half their lifetime; the hop follows the file within
KEY_POLL_S. The keys never leave the pod.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import click

from serving.fleet import frontdoor
from serving.fleet.frontdoor import FrontDoorError, HopSite
from serving.fleet.rotation import KEY_POLL_S, FleetError, reloaded_workers
from serving.fleet.topology import Replica, ReplicaConfig, ReplicaPorts, replica_config
from serving.server.properties import read_properties
from serving.server.readiness import inference_key

HOP_TEMPLATE = Path(__file__).resolve().with_name("nginx-key-hop.conf.template")
NGINX_STOP_S = 10


class KeyHopError(Exception):
    """The key hop cannot be planned; the message says why, in one line."""


@dataclass(frozen=True)
class KeyHop:
    """A replica pod's hop: the replica's config (parsed once), the replica itself (its run dir
    holds the key file), where the hop listens, nginx's own dir, and the hop secret file nginx includes."""
    config: ReplicaConfig
    replica: Replica
    address: str
    nginx_dir: Path
    secret_file: Path

    def site(self, key: str | None) -> HopSite:
        return HopSite(self.address, self.replica.ports.key_hop, self.replica.ports.inference, key, self.secret_file)


def plan(config: Path, run_dir: Path, hop_dir: Path, port: int, secret_file: Path, address: str = "0.0.0.0") -> KeyHop:
    """The hop for the replica config runs in run_dir; nginx's files go to hop_dir/nginx; secret_file:
    the front door's secret (frontdoor.hop_secret_text's line), checked here (FrontDoorError)."""
    frontdoor.read_hop_secret(secret_file)
    properties = read_properties(config)
    inference = urlsplit(properties["inference_address"])
    parsed = replica_config(properties, config.resolve().parent)
    if not parsed.token_auth:
        raise KeyHopError(f"{config} turns token authorization off: the key hop would have no key to add")
    if inference.hostname not in ("127.0.0.1", "localhost"):
        raise KeyHopError(f"{config}: inference_address {properties['inference_address']} is not loopback: "
                          "a client could go round the hop")
    ports = replace(ReplicaPorts.derived(0), inference=inference.port, key_hop=port)
    return KeyHop(parsed, Replica("replica", ports, run_dir.resolve()), address, hop_dir.resolve() / "nginx",
                  secret_file.resolve())


def render(hop: KeyHop, key: str | None) -> str:
    """nginx-key-hop.conf.template around the fleet's hop server block (frontdoor.hop_server)."""
    return frontdoor.fill(HOP_TEMPLATE.read_text(), {
        "NGINX_DIR": hop.nginx_dir, "MAX_BODY_BYTES": hop.config.max_body_bytes,
        "KEY_HOP": frontdoor.hop_server(hop.site(key), hop.config.response_timeout_s)})


def write(hop: KeyHop, key: str | None) -> Path:
    """Render the hop with key (none yet: a placeholder TorchServe refuses) and check it (`nginx -t`)."""
    return frontdoor.install(hop.nginx_dir, render(hop, key))


def follow(hop: KeyHop, nginx: subprocess.Popen, rendered: str | None, poll_s: float) -> int:
    """While nginx runs: when the key file changes (a renewal, a restart), render and reload."""
    while nginx.poll() is None:
        key = inference_key(hop.replica.key_file)
        if key != rendered:
            write(hop, key)
            reloaded_workers(hop.nginx_dir)
            rendered = key
            print(f"{time.strftime('%H:%M:%S')} key hop reloaded with "
                  f"{'the renewed key' if key else 'no key (none in the key file)'}", flush=True)
        time.sleep(poll_s)
    return nginx.returncode


def run(hop: KeyHop, poll_s: float = KEY_POLL_S) -> int:
    """nginx in the foreground, following the key; nginx's exit status (SIGTERM: a graceful quit)."""
    key = inference_key(hop.replica.key_file)
    write(hop, key)
    nginx = subprocess.Popen(frontdoor.nginx_command(hop.nginx_dir, "-g", "daemon off;"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return follow(hop, nginx, key, poll_s)
    finally:
        if nginx.poll() is None:
            nginx.send_signal(signal.SIGQUIT)   # nginx's graceful stop: requests in flight finish
            nginx.wait(NGINX_STOP_S)


@click.command()
@click.option("--config", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The replica's config.properties (token auth on, inference on loopback).")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False), help="The replica's run dir (its key file).")
@click.option("--hop-dir", required=True, type=click.Path(file_okay=False), help="Where nginx writes (hop-dir/nginx).")
@click.option("--address", default="0.0.0.0", show_default=True, help="Where the hop listens.")
@click.option("--port", required=True, type=click.IntRange(1, 65535))
@click.option("--secret-file", required=True, type=click.Path(dir_okay=False),
              help="The front door's secret, one `set $hop_secret \"...\";` line (a mounted Secret).")
def main(config: str, run_dir: str, hop_dir: str, address: str, port: int, secret_file: str) -> None:
    """nginx that adds the replica's current inference key to the front door's requests; exits when nginx does."""
    try:
        hop = plan(Path(config), Path(run_dir), Path(hop_dir), port, Path(secret_file), address)
        click.echo(f"key hop {address}:{port} -> {hop.replica.inference_url}, its key from {hop.replica.key_file}")
        status = run(hop)
    except (KeyHopError, FrontDoorError, FleetError, OSError) as error:
        raise click.ClickException(str(error)) from None
    sys.exit(status)


if __name__ == "__main__":
    main()
