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
                "initial_worker_port": str(worker), **extra}
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
    # Keys expire: a leaked key is only good for an hour.
    "token_expiration_min": "60",
}
PRODUCTION_HEADER = """\
# GENERATED from config.properties by `make config.production.properties`: do not edit here.
# The differences (PRODUCTION_OVERRIDES in serving/server.py, with their reasons) are at the end.
#   torchserve --start --ncs --ts-config config.production.properties > torchserve.log 2>&1
# At start TorchServe writes key_file.json into its working directory (readable by the
# server's user only; keep it that way). Every call then needs its key:
#   curl -H "Authorization: Bearer $(jq -r .inference.key key_file.json)" -T digit.png \\
#        http://127.0.0.1:8080/predictions/mnist

"""


def production_config(base_text: str) -> str:
    """The production variant of config.properties: overridden keys removed from the base
    text and set again, with their reasons, in a block at the end."""
    lines = [line for line in base_text.splitlines()
             if line.split("=", 1)[0].strip() not in PRODUCTION_OVERRIDES or line.lstrip().startswith("#")]
    block = ["", "# --- Production overrides (serving/server.py PRODUCTION_OVERRIDES)."]
    block += [f"{key}={value}" for key, value in PRODUCTION_OVERRIDES.items()]
    return PRODUCTION_HEADER + "\n".join(lines).rstrip("\n") + "\n" + "\n".join(block) + "\n"


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


@main.command("production-config")
@click.option("--base", default="config.properties", show_default=True, type=click.Path(dir_okay=False))
def production_config_command(base: str) -> None:
    """Print config.production.properties, derived from the base config."""
    click.echo(production_config(Path(base).read_text()), nl=False)


@main.command("stop")
@click.option("--run-dir", default=".run/torchserve", show_default=True)
def stop_command(run_dir: str) -> None:
    stop(run_dir)
    click.echo("TorchServe stopped.")


if __name__ == "__main__":
    main()
