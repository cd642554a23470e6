"""TorchServe's config.properties: read it, derive copies of it, and name the ports it listens on.

    python -m serving.server.properties production-config --base config.properties > config.production.properties

`make config.production.properties` runs that; PRODUCTION_OVERRIDES below is the one place the
production differences are written. instance_config makes the copy on free loopback ports that
tests and benchmarks run beside any other server.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import click

from serving.handler.artifact import MODEL_NAME

# TorchServe 0.12's own defaults for what a config leaves out (its gRPC APIs are always on).
DEFAULT_ADDRESSES = {"inference_address": "http://127.0.0.1:8080",
                     "management_address": "http://127.0.0.1:8081",
                     "metrics_address": "http://127.0.0.1:8082"}
DEFAULT_GRPC = {"grpc_inference_port": ("grpc_inference_address", "7070"),
                "grpc_management_port": ("grpc_management_address", "7071")}


def read_properties(path: str | os.PathLike) -> dict:
    return parse_properties(Path(path).read_text())


def parse_properties(text: str) -> dict:
    properties = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


def address(properties: dict, key: str) -> str:
    """An HTTP API's address (inference_address, management_address, metrics_address)."""
    return properties.get(key, DEFAULT_ADDRESSES[key])


def key_lifetime_s(properties: dict) -> float:
    """Seconds an inference or management key lives (token_expiration_min; TorchServe 0.12 reads
    a fraction too, and defaults to 60 minutes)."""
    try:
        return float(properties.get("token_expiration_min", "60")) * 60
    except ValueError:
        return 3600.0


def workflow_store(properties: dict, cwd: str | os.PathLike | None) -> Path | None:
    """The workflow store of a server started in cwd (relative paths resolve from there), or
    None when the config names none (TorchServe then uses model_store)."""
    store = properties.get("workflow_store")
    return Path(cwd or ".").resolve() / store if store else None


def token_auth_enabled(properties: dict) -> bool:
    # TorchServe 0.12 enables token authorization unless it is explicitly disabled.
    return properties.get("disable_token_authorization", "false").lower() != "true"


def workers_per_model(properties: dict) -> int:
    """The workers a server starts for a model: the archive names none (serving/handler/model-config.yaml)."""
    return int(properties["default_workers_per_model"])


@dataclass(frozen=True)
class Listener:
    """One socket the server will listen on, and the config key that sets its port."""
    key: str
    host: str
    port: int


def listeners(properties: dict) -> list[Listener]:
    """Every TCP port a server with these properties listens on: three HTTP APIs and two gRPC ones."""
    found = []
    for key in DEFAULT_ADDRESSES:
        parts = urlsplit(address(properties, key))
        if parts.scheme in ("http", "https"):   # unix: sockets have no port to clash on
            default_port = 443 if parts.scheme == "https" else 80
            found.append(Listener(key, parts.hostname or "0.0.0.0", parts.port or default_port))
    for port_key, (host_key, default_port) in DEFAULT_GRPC.items():
        found.append(Listener(port_key, properties.get(host_key, "127.0.0.1"),
                              int(properties.get(port_key, default_port))))
    return found


def port_taken(listener: Listener) -> str | None:
    """Why listener's port cannot be bound (another program holds it), or None when it is free."""
    with socket.socket(socket.AF_INET6 if ":" in listener.host else socket.AF_INET) as sock:
        # As Netty binds: a port left in TIME_WAIT by a server that just stopped is free to take.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((listener.host, listener.port))
        except OSError as error:
            return error.strerror or str(error)
    return None


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def set_properties(text: str, settings: dict[str, str]) -> str:
    """config.properties text with each key set to its value: a line that sets it is replaced
    in place, a key not yet there is appended. A key set twice is an error (which one wins?)."""
    for key, value in settings.items():
        pattern = rf"^{re.escape(key)}=.*$"
        count = len(re.findall(pattern, text, flags=re.M))
        if count > 1:
            raise ValueError(f"{key}= is set {count} times")
        if count:
            text = re.sub(pattern, lambda _: f"{key}={value}", text, flags=re.M)
        else:
            text = text.rstrip("\n") + f"\n{key}={value}\n"
    return text


def instance_config(base_config: str | os.PathLike, directory: str | os.PathLike,
                    model_store: str | os.PathLike, **extra: str) -> tuple[Path, str, str]:
    """A copy of base_config on free loopback ports with its own model store, for a second
    server beside any other (tests, benchmarks); extra settings are applied too.
    Returns (path, inference URL, management URL)."""
    inference, management, metrics, grpc_inference, grpc_management, worker = free_ports(6)
    settings = {"inference_address": f"http://127.0.0.1:{inference}",
                "management_address": f"http://127.0.0.1:{management}",
                "metrics_address": f"http://127.0.0.1:{metrics}",
                "grpc_inference_port": str(grpc_inference), "grpc_management_port": str(grpc_management),
                "model_store": str(model_store),
                # Worker sockets are named after their port: keep clear of another server's workers.
                "initial_worker_port": str(worker)}
    # Relative paths resolve from the server's working directory, and this copy's server runs
    # elsewhere: anchor the metrics file to the base config's directory (the repo root).
    metrics_config = read_properties(base_config).get("metrics_config")
    if metrics_config:
        settings["metrics_config"] = str((Path(base_config).parent / metrics_config).resolve())
    settings.update(extra)
    path = Path(directory) / "config.properties"
    path.write_text(set_properties(Path(base_config).read_text(), settings))
    return path, settings["inference_address"], settings["management_address"]


# config.production.properties is config.properties with exactly these differences (the one
# place they are written): `make config.production.properties` regenerates it, and a test
# fails when the committed file has drifted from what this produces.
PRODUCTION_OVERRIDES = {
    # Token authorization ON: a request without the right bearer key is refused (TorchServe 0.12
    # answers 400 InvalidKeyException). Still bind to loopback or a private interface and put
    # TLS (a reverse proxy) in front: keys travel in headers.
    "disable_token_authorization": "false",
    # Keys expire: a leaked inference or management key is only good for an hour. `python -m
    # serving.server run` renews both before they expire (`start` cannot: it returns), and every
    # client of ours re-reads key_file.json. The file's "API" key, which renews them, never expires.
    "token_expiration_min": "60",
    # No browser page may read answers: a public page cannot hold the bearer key, so the demo
    # page has no place here. Empty, not absent: TorchServe 0.12 sends no
    # Access-Control-Allow-Origin header when the value is empty.
    "cors_allowed_origin": "",
}
PRODUCTION_HEADER = f"""\
# GENERATED from config.properties by `make config.production.properties`: do not edit here.
# The differences (PRODUCTION_OVERRIDES in serving/server/properties.py, with their reasons) are at the end.
#   torchserve --start --ncs --ts-config config.production.properties > torchserve.log 2>&1
# At start TorchServe writes key_file.json into its working directory (readable by the
# server's user only; keep it that way). Every call then needs its key:
#   curl -H "Authorization: Bearer $(jq -r .inference.key key_file.json)" -T digit.png \\
#        http://127.0.0.1:8080/predictions/{MODEL_NAME}
# Keys expire (token_expiration_min): run the server with `python -m serving.server run`, which
# renews them, and read the key from the file for every call, never once for good.

"""


def production_config(base_text: str) -> str:
    """The production variant of config.properties: overridden keys removed from the base
    text and set again, with their reasons, in a block at the end."""
    lines = [line for line in base_text.splitlines()
             if line.split("=", 1)[0].strip() not in PRODUCTION_OVERRIDES or line.lstrip().startswith("#")]
    block = ["", "# --- Production overrides (serving/server/properties.py PRODUCTION_OVERRIDES)."]
    block += [f"{key}={value}" for key, value in PRODUCTION_OVERRIDES.items()]
    return PRODUCTION_HEADER + "\n".join(lines).rstrip("\n") + "\n" + "\n".join(block) + "\n"


@click.group()
def main() -> None:
    """Derive TorchServe configs from config.properties."""


@main.command("production-config")
@click.option("--base", default="config.properties", show_default=True, type=click.Path(exists=True, dir_okay=False))
def production_config_command(base: str) -> None:
    """Print config.production.properties, derived from the base config."""
    click.echo(production_config(Path(base).read_text()), nl=False)


if __name__ == "__main__":
    main()
