"""Start and stop a TorchServe instance, and wait until its model really answers.

    python -m serving.server start --config config.properties --run-dir .run/torchserve
    python -m serving.server stop --run-dir .run/torchserve
    python -m serving.server ready --config config.properties   # exit 0 only if it answers
    ready: mnist 2/2 workers READY, probe image answered digit 1 in 9 ms
    python -m serving.server run --config config.properties     # foreground: systemd, containers

Each instance keeps its pid file and logs in its own run dir (TorchServe puts the pid
file in the temp dir, so TMPDIR is pointed there): stopping one never stops another.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import click
import psutil   # a TorchServe dependency: finds and waits for its Java process

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
    # Keys expire: a leaked key is only good for an hour.
    "token_expiration_min": "60",
    # No browser page may read answers: a public page cannot hold the bearer key, so the demo
    # page has no place here. Empty, not absent: TorchServe 0.12 sends no
    # Access-Control-Allow-Origin header when the value is empty.
    "cors_allowed_origin": "",
}
PRODUCTION_HEADER = f"""\
# GENERATED from config.properties by `make config.production.properties`: do not edit here.
# The differences (PRODUCTION_OVERRIDES in serving/server.py, with their reasons) are at the end.
#   torchserve --start --ncs --ts-config config.production.properties > torchserve.log 2>&1
# At start TorchServe writes key_file.json into its working directory (readable by the
# server's user only; keep it that way). Every call then needs its key:
#   curl -H "Authorization: Bearer $(jq -r .inference.key key_file.json)" -T digit.png \\
#        http://127.0.0.1:8080/predictions/{MODEL_NAME}

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
    # torchserve prefers TS_CONFIG_FILE to --ts-config: a variable left in the caller's
    # environment must not replace the config we pass.
    env.pop("TS_CONFIG_FILE", None)
    env.update(TMPDIR=str(run_dir), TEMP=str(run_dir), LOG_LOCATION=str(run_dir / "logs"),
               METRICS_LOCATION=str(run_dir / "logs"))
    return env


def token_auth_enabled(properties: dict) -> bool:
    # TorchServe 0.12 enables token authorization unless it is explicitly disabled.
    return properties.get("disable_token_authorization", "false").lower() != "true"


def api_key(key_file: Path, api: str) -> str | None:
    """The bearer key of an API ("inference" or "management") from TorchServe's key_file.json,
    once it exists."""
    try:
        return json.loads(key_file.read_text())[api]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def inference_key(key_file: Path) -> str | None:
    return api_key(key_file, "inference")


class NotReady(Exception):
    """The server cannot answer yet; the message says why, in one line."""


def reason(error: Exception) -> str:
    """One line for a failed HTTP call: "Connection refused", not "<urlopen error [Errno 111] ...>"."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    cause = getattr(error, "reason", error)
    return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__


def probe_once(inference_address: str, model: str = MODEL_NAME, key_file: Path | None = None,
               timeout_s: float = 10.0) -> dict:
    """POST the probe image once: the model's answer, or NotReady saying why not."""
    # An explicit content type: urllib would otherwise send form-urlencoded, which TorchServe parses as a form.
    headers = {"Content-Type": "application/octet-stream"}
    if key_file is not None:
        key = inference_key(key_file)
        if key is None:
            raise NotReady(f"no inference key in {key_file}")
        headers["Authorization"] = f"Bearer {key}"
    url = f"{inference_address}/predictions/{model}"
    request = urllib.request.Request(url, data=probe_image(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as error:
        raise NotReady(f"{url}: {reason(error)}") from None
    if not isinstance(answer, dict) or "digit" not in answer:
        raise NotReady(f"{url}: unexpected answer {str(answer)[:200]}")
    return answer


def wait_until_answering(inference_address: str, timeout_s: float = 180.0, model: str = MODEL_NAME,
                         key_file: Path | None = None) -> dict:
    """POST a real image until the model returns a prediction (/ping alone says too little:
    it is Healthy before any worker has loaded the model). With key_file, authorize with its key."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        try:
            return probe_once(inference_address, model, key_file)
        except NotReady as error:
            last_error = str(error)
        time.sleep(0.5)
    raise TimeoutError(f"model {model} did not answer within {timeout_s:.0f} s: {last_error}")


def require_java() -> None:
    if shutil.which("java") is None:
        raise click.ClickException("TorchServe needs Java 17: install openjdk-17-jre-headless")


def start(config: str, run_dir: str | os.PathLike, timeout_s: float = 180.0,
          cwd: str | os.PathLike | None = None) -> dict:
    """Start TorchServe in the background and return once the model answers.
    cwd: the server's working directory, where it writes key_file.json when token
    authorization is on (relative paths in the config resolve from there too)."""
    require_java()
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
    java = java_process(run_dir / ".model_server.pid")
    subprocess.run([str(Path(sys.executable).with_name("torchserve")), "--stop"], env=server_env(run_dir),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    # --stop sends SIGTERM, deletes the pid file and returns at once: wait until Java has
    # exited and freed its ports, so that a caller may start another server on them.
    if java is not None:
        try:
            java.wait(30)
        except psutil.TimeoutExpired:
            pass


# --- Readiness: one check, for a Kubernetes exec probe or a load balancer ------------------
def model_workers(management_address: str, model: str = MODEL_NAME, key_file: Path | None = None,
                  timeout_s: float = 5.0) -> list[dict]:
    """The model's workers as the management API lists them, or NotReady saying why not."""
    headers = {}
    if key_file is not None:
        key = api_key(key_file, "management")
        if key is None:
            raise NotReady(f"no management key in {key_file}")
        headers["Authorization"] = f"Bearer {key}"
    url = f"{management_address}/models/{model}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as response:
            return json.loads(response.read())[0].get("workers", [])
    except urllib.error.HTTPError as error:
        raise NotReady(f"no model {model} at {management_address}" if error.code == 404
                       else f"{url}: {reason(error)}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, IndexError, AttributeError) as error:
        raise NotReady(f"{url}: {reason(error)}") from None


def check_ready(config: str | os.PathLike, cwd: str | os.PathLike = ".", timeout_s: float = 5.0) -> str:
    """One line saying why the server is ready: every worker of the model READY and one probe
    image answered. Otherwise NotReady with the reason. cwd: the server's working directory,
    where token authorization has its key_file.json."""
    properties = read_properties(config)
    key_file = Path(cwd).resolve() / "key_file.json" if token_auth_enabled(properties) else None
    workers = model_workers(properties.get("management_address", "http://127.0.0.1:8081"), MODEL_NAME,
                            key_file, timeout_s)
    statuses = [worker.get("status", "?") for worker in workers]
    # A worker being replaced (killed, crashed, timed out) is not READY: report the pod
    # degraded until TorchServe has it back, rather than let the one left take all traffic.
    if not workers or statuses.count("READY") < len(workers):
        raise NotReady(f"workers not ready: {statuses.count('READY')} of {len(workers)} READY ({', '.join(statuses)})")
    started = time.monotonic()
    try:
        answer = probe_once(properties.get("inference_address", "http://127.0.0.1:8080"), MODEL_NAME, key_file,
                            timeout_s)
    except NotReady as error:
        raise NotReady(f"probe failed: {error}") from None
    return (f"ready: {MODEL_NAME} {len(workers)}/{len(workers)} workers READY, probe image answered "
            f"digit {answer['digit']} in {(time.monotonic() - started) * 1000:.0f} ms")


# --- Foreground: TorchServe as the main process of a systemd unit or a container ----------
TORCHSERVE_JAVA_CLASS = "org.pytorch.serve.ModelServer"   # how torchserve itself recognises its Java


def java_process(pid_file: Path):
    """The TorchServe Java process named in pid_file, or None (no file yet, or gone)."""
    try:
        process = psutil.Process(int(pid_file.read_text().split()[0]))
        return process if TORCHSERVE_JAVA_CLASS in process.cmdline() else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def end_java(pid_file: Path, stop_timeout_s: float) -> bool:
    """SIGTERM the Java process, SIGKILL it if it has not ended within stop_timeout_s.
    True when it ended by itself after SIGTERM (or was already gone)."""
    java = java_process(pid_file)
    if java is None:
        return True
    try:
        java.terminate()
        java.wait(stop_timeout_s)
        return True
    except psutil.TimeoutExpired:
        java.kill()
        return False
    except psutil.NoSuchProcess:
        return True


def supervise(launcher: subprocess.Popen, pid_file: Path, stop_requests: list, stop_timeout_s: float) -> int:
    """Wait for `torchserve --foreground` to end, stopping its Java process when a signal was
    recorded in stop_requests. 0 after a requested clean stop; non-zero otherwise."""
    clean_stop = True
    while launcher.poll() is None:
        if stop_requests and java_process(pid_file) is not None:
            clean_stop = end_java(pid_file, stop_timeout_s)   # the launcher returns once Java has ended
        elif stop_requests and time.monotonic() - stop_requests[0] > stop_timeout_s:
            launcher.kill()   # Java never appeared: nothing else to stop
        try:
            launcher.wait(0.2)
        except subprocess.TimeoutExpired:
            pass
    if java_process(pid_file) is not None:   # the launcher was killed from outside: Java must not outlive it
        end_java(pid_file, stop_timeout_s)
    pid_file.unlink(missing_ok=True)
    if stop_requests:
        return 0 if clean_stop else 1
    if launcher.returncode != 0:   # torchserve refused to start (its reason is on stdout)
        return launcher.returncode
    click.echo("TorchServe ended without being asked to stop: see its output and logs", err=True)
    return 1


def run_foreground(config: str, run_dir: str | os.PathLike, stop_timeout_s: float = 30.0) -> int:
    """`torchserve --start --foreground` until it ends or SIGTERM/SIGINT asks it to; the exit status.

    TorchServe 0.12's --foreground only waits for its Java process: it passes no signal on
    (a SIGTERM to it would orphan Java) and exits 0 however Java ended. So it runs in a
    session of its own (a terminal's Ctrl-C reaches only us), we stop Java ourselves, and a
    server that ends unasked exits non-zero so that systemd or the container runtime restarts it.
    Its output stays on our stdout, for journald or `docker logs`; log files go to run_dir/logs."""
    require_java()
    run_dir = Path(run_dir).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs",
               "--ts-config", str(config)]
    stop_requests: list[float] = []
    handlers = {signum: signal.signal(signum, lambda *_: stop_requests.append(time.monotonic()))
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        launcher = subprocess.Popen(command, env=server_env(run_dir), stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        return supervise(launcher, run_dir / ".model_server.pid", stop_requests, stop_timeout_s)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@click.group()
def main() -> None:
    """Start, stop, check or run in the foreground a TorchServe instance whose pid file and
    logs live in --run-dir."""


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


@main.command("ready")
@click.option("--config", default="config.properties", show_default=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--timeout", "timeout_s", default=5.0, show_default=True, help="Seconds for each of the two calls.")
def ready_command(config: str, timeout_s: float) -> None:
    """Exit 0 when every worker of the model is READY and a probe image gets a prediction;
    else exit 1 with the reason. For a Kubernetes exec probe or a load-balancer check; run it
    in the server's working directory (with token auth, key_file.json is read from there)."""
    try:
        click.echo(check_ready(config, timeout_s=timeout_s))
    except NotReady as error:
        raise click.ClickException(f"not ready: {error}") from None


@main.command("run")
@click.option("--config", default="config.properties", show_default=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--run-dir", default=".run/torchserve", show_default=True)
@click.option("--stop-timeout", "stop_timeout_s", default=30.0, show_default=True,
              help="Seconds TorchServe gets to stop after SIGTERM/SIGINT before it is killed.")
def run_command(config: str, run_dir: str, stop_timeout_s: float) -> None:
    """TorchServe in the foreground, for systemd and containers: SIGTERM or Ctrl-C stops it
    (exit 0); exit non-zero when it fails to start or ends unasked."""
    sys.exit(run_foreground(config, run_dir, stop_timeout_s))


if __name__ == "__main__":
    main()
