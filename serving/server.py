"""Start and stop a TorchServe instance, and wait until its model really answers.

    python -m serving.server start --config config.properties --run-dir .run/torchserve
    python -m serving.server stop --run-dir .run/torchserve

Each instance keeps its pid file and logs in its own run dir (TorchServe puts the pid
file in the temp dir, so TMPDIR is pointed there): stopping one never stops another.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import click

from .artifact import MODEL_NAME


def read_properties(path: str | os.PathLike) -> dict:
    properties = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def instance_config(base_config: str | os.PathLike, directory: str | os.PathLike,
                    model_store: str | os.PathLike) -> tuple[Path, str, str]:
    """A copy of base_config on free loopback ports with its own model store, for a second
    server beside any other (tests, benchmarks). Returns (path, inference URL, management URL)."""
    inference, management, metrics, grpc_inference, grpc_management, worker = free_ports(6)
    text = Path(base_config).read_text()
    settings = {"inference_address": f"http://127.0.0.1:{inference}",
                "management_address": f"http://127.0.0.1:{management}",
                "metrics_address": f"http://127.0.0.1:{metrics}",
                "grpc_inference_port": str(grpc_inference), "grpc_management_port": str(grpc_management),
                "model_store": str(model_store)}
    for key, value in settings.items():
        text, count = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        if count != 1:
            raise ValueError(f"{base_config} has no single {key}= line")
    # Worker sockets are named after their port: keep clear of another server's workers.
    text += f"\ninitial_worker_port={worker}\n"
    path = Path(directory) / "config.properties"
    path.write_text(text)
    return path, settings["inference_address"], settings["management_address"]


def probe_image() -> bytes:
    """A drawn '1' as PNG: enough to prove the model loads, preprocesses and predicts."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(image).line([(14, 5), (14, 23)], fill=255, width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def server_env(run_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(TMPDIR=str(run_dir), TEMP=str(run_dir), LOG_LOCATION=str(run_dir / "logs"),
               METRICS_LOCATION=str(run_dir / "logs"))
    return env


def token_auth_enabled(properties: dict) -> bool:
    # TorchServe 0.12 enables token authorization unless it is explicitly disabled.
    return properties.get("disable_token_authorization", "false").lower() != "true"


def inference_key(key_file: Path) -> str | None:
    """The inference bearer key from TorchServe's key_file.json, once it exists."""
    try:
        return json.loads(key_file.read_text())["inference"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def wait_until_answering(inference_address: str, timeout_s: float = 180.0, model: str = MODEL_NAME,
                         key_file: Path | None = None) -> dict:
    """POST a real image until the model returns a prediction (/ping alone says too little:
    it is Healthy before any worker has loaded the model). With key_file, authorize with its key."""
    deadline = time.monotonic() + timeout_s
    body, last_error = probe_image(), "no answer yet"
    while time.monotonic() < deadline:
        # An explicit content type: urllib would otherwise send form-urlencoded, which TorchServe parses as a form.
        headers = {"Content-Type": "application/octet-stream"}
        if key_file is not None:
            key = inference_key(key_file)
            if key is None:
                last_error = f"no key in {key_file} yet"
                time.sleep(0.5)
                continue
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{inference_address}/predictions/{model}", data=body, method="POST",
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.loads(response.read())
                if "digit" in answer:
                    return answer
                last_error = f"unexpected answer {answer}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as error:
            last_error = str(error)
        time.sleep(0.5)
    raise TimeoutError(f"model {model} did not answer within {timeout_s:.0f} s: {last_error}")


def start(config: str, run_dir: str | os.PathLike, timeout_s: float = 180.0,
          cwd: str | os.PathLike | None = None) -> dict:
    """Start TorchServe in the background and return once the model answers.
    cwd: the server's working directory, where it writes key_file.json when token
    authorization is on (relative paths in the config resolve from there too)."""
    if shutil.which("java") is None:
        raise click.ClickException("TorchServe needs Java 17: install openjdk-17-jre-headless")
    run_dir = Path(run_dir).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).with_name("torchserve")), "--start", "--ncs", "--ts-config", config]
    # TorchServe's Java process inherits stdout: send it to a file, or a caller's pipe never closes.
    with open(run_dir / "logs" / "torchserve.out", "ab") as log:
        subprocess.run(command, env=server_env(run_dir), stdout=log, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, check=True, cwd=cwd)
    properties = read_properties(config)
    address = properties.get("inference_address", "http://127.0.0.1:8080")
    key_file = Path(cwd or ".").resolve() / "key_file.json" if token_auth_enabled(properties) else None
    try:
        return wait_until_answering(address, timeout_s, key_file=key_file)
    except TimeoutError as error:
        stop(run_dir)
        raise click.ClickException(f"{error}; see {run_dir}/logs/") from None


def stop(run_dir: str | os.PathLike) -> None:
    run_dir = Path(run_dir).resolve()
    subprocess.run([str(Path(sys.executable).with_name("torchserve")), "--stop"], env=server_env(run_dir),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    pid_file = run_dir / ".model_server.pid"
    deadline = time.monotonic() + 30
    while pid_file.exists() and time.monotonic() < deadline:  # --stop returns before Java exits
        time.sleep(0.2)


@click.group()
def main() -> None:
    """Start or stop a TorchServe instance whose pid file and logs live in --run-dir."""


@main.command("start")
@click.option("--config", default="config.properties", show_default=True, type=click.Path(dir_okay=False))
@click.option("--run-dir", default=".run/torchserve", show_default=True)
@click.option("--timeout", "timeout_s", default=180.0, show_default=True, help="Seconds to wait for an answer.")
def start_command(config: str, run_dir: str, timeout_s: float) -> None:
    answer = start(config, run_dir, timeout_s=timeout_s)
    address = read_properties(config).get("inference_address")
    click.echo(f"TorchServe is up: {address}/predictions/{MODEL_NAME} answered a probe image with "
               f"digit {answer['digit']}. Logs: {run_dir}/logs. Stop with `make stop`.")


@main.command("stop")
@click.option("--run-dir", default=".run/torchserve", show_default=True)
def stop_command(run_dir: str) -> None:
    stop(run_dir)
    click.echo("TorchServe stopped.")


if __name__ == "__main__":
    main()
