"""The key hop of a replica pod: nginx beside TorchServe, adding the replica's current inference
key to every request it forwards, and the loop that keeps that key current. deploy/kubernetes runs
it as the replica pod's second container, on the same image:

    python -m serving.fleet.keyhop --config /srv/replica/config.properties --run-dir /srv/replica \\
        --hop-dir /srv/key-hop --address 0.0.0.0 --port 9086
    key hop 0.0.0.0:9086 -> 127.0.0.1:9080, its key from /srv/replica/key_file.json

It is `make fleet`'s hop for one replica: the server block is serving/fleet/nginx.conf.template's
KEYED_REPLICA block rendered by serving/fleet/frontdoor.py, and a new key is rendered in and nginx
reloaded as serving/fleet/rotation.py does it (the call returns once no old worker accepts). TorchServe
writes its keys into its working dir (the run dir, an emptyDir both containers mount) and
`serving.server run` renews them at half their lifetime; the hop follows the file within
KEY_POLL_S. The keys never leave the pod.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import click

from serving.fleet import frontdoor
from serving.fleet.frontdoor import FrontDoorError, RotationState
from serving.server.properties import read_properties
from serving.server.readiness import inference_key
from serving.fleet.rotation import KEY_POLL_S, FleetError, reloaded_workers
from serving.fleet.topology import Fleet, Replica, ReplicaPorts, replica_config

HOP_TEMPLATE = Path(__file__).resolve().with_name("nginx-key-hop.conf.template")
NGINX_STOP_S = 10


class KeyHopError(Exception):
    """The key hop cannot be planned; the message says why, in one line."""


def plan(config: Path, run_dir: Path, hop_dir: Path, port: int) -> Fleet:
    """A fleet of the pod's one replica (its config and run dir, where its key file is), whose
    run dir is the hop's: nginx's files go to hop_dir/nginx."""
    properties = read_properties(config)
    inference = urlsplit(properties["inference_address"])
    ports = replace(ReplicaPorts.derived(0), inference=inference.port, key_hop=port)
    hop = Fleet(hop_dir.resolve(), config.resolve(), (Replica("replica", ports, run_dir.resolve()),),
                replica_config(properties, config.resolve().parent))
    if not hop.token_auth:
        raise KeyHopError(f"{config} turns token authorization off: the key hop would have no key to add")
    if inference.hostname not in ("127.0.0.1", "localhost"):
        raise KeyHopError(f"{config}: inference_address {properties['inference_address']} is not loopback: "
                          "a client could go round the hop")
    return hop


def template() -> str:
    """The hop's nginx.conf template: the fleet's hop server block inside a minimal main config."""
    block = frontdoor.BLOCK.search(frontdoor.TEMPLATE.read_text())
    return HOP_TEMPLATE.read_text().replace("{{KEY_HOP}}", block.group(0))


def write(hop: Fleet, address: str, key: str | None) -> Path:
    """Render the hop with key (none yet: a placeholder TorchServe refuses) and check it (`nginx -t`)."""
    (replica,) = hop.replicas
    state = RotationState(inference_keys={replica.name: key} if key else {})
    return frontdoor.write_config(hop, state, template(), overrides={"HOP_ADDRESS": address})


def follow(hop: Fleet, address: str, nginx: subprocess.Popen, rendered: str | None, poll_s: float) -> int:
    """While nginx runs: when the key file changes (a renewal, a restart), render and reload."""
    (replica,) = hop.replicas
    while nginx.poll() is None:
        key = inference_key(replica.key_file)
        if key != rendered:
            write(hop, address, key)
            reloaded_workers(hop)
            rendered = key
            print(f"{time.strftime('%H:%M:%S')} key hop reloaded with "
                  f"{'the renewed key' if key else 'no key (none in the key file)'}", flush=True)
        time.sleep(poll_s)
    return nginx.returncode


def run(hop: Fleet, address: str, poll_s: float = KEY_POLL_S) -> int:
    """nginx in the foreground, following the key; nginx's exit status (SIGTERM: a graceful quit)."""
    (replica,) = hop.replicas
    key = inference_key(replica.key_file)
    write(hop, address, key)
    nginx = subprocess.Popen(frontdoor.nginx_command(hop, "-g", "daemon off;"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return follow(hop, address, nginx, key, poll_s)
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
def main(config: str, run_dir: str, hop_dir: str, address: str, port: int) -> None:
    """nginx that adds the replica's current inference key; exits when nginx does."""
    try:
        hop = plan(Path(config), Path(run_dir), Path(hop_dir), port)
        (replica,) = hop.replicas
        click.echo(f"key hop {address}:{port} -> {replica.inference_url}, its key from {replica.key_file}")
        status = run(hop, address)
    except (KeyHopError, FrontDoorError, FleetError, OSError) as error:
        raise click.ClickException(str(error)) from None
    sys.exit(status)


if __name__ == "__main__":
    main()
