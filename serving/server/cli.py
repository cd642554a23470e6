"""`python -m serving.server`: start, stop, check or run in the foreground one TorchServe.

    python -m serving.server start --config config.properties --run-dir .run/torchserve
    python -m serving.server stop --run-dir .run/torchserve
    python -m serving.server ready --config config.properties   # exit 0 only if it answers
    ready: mnist 2/2 workers READY, probe image answered digit 1 in 9 ms
    python -m serving.server ready --wait 60                   # the same, retried for up to 60 s
    python -m serving.server run --config config.properties     # foreground: systemd, containers
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from serving.handler.artifact import MODEL_NAME
from serving.server.foreground import run_foreground
from serving.server.properties import address, read_properties
from serving.server.readiness import NotReady, check_ready, retry
from serving.server.server import STOP_TIMEOUT_S, AlreadyRunning, ServerError, stale_archives, start, stop


@click.group()
def main() -> None:
    """Start, stop, check or run in the foreground a TorchServe instance whose pid file and
    logs live in --run-dir."""


@main.command("start")
@click.option("--config", default="config.properties", show_default=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--run-dir", default=".run/torchserve", show_default=True)
@click.option("--timeout", "timeout_s", default=180.0, show_default=True, help="Seconds to wait for an answer.")
def start_command(config: str, run_dir: str, timeout_s: float) -> None:
    """Start TorchServe in the background; when this run dir's server is up already, say so (exit 0)."""
    try:
        answer = start(config, run_dir, timeout_s=timeout_s)
    except AlreadyRunning as running:
        changed = stale_archives(config, run_dir)
        if not changed:
            click.echo(f"TorchServe is already running from {run_dir} (pid {running.pid}): "
                       f"{running.inference_address}/predictions/{MODEL_NAME}. Stop it with `make stop`.")
            return
        click.echo(f"TorchServe (pid {running.pid}) serves an older {', '.join(Path(path).name for path in changed)} "
                   f"than the one on disk now: restarting it to serve the new one")
        try:
            stop(run_dir)
            answer = start(config, run_dir, timeout_s=timeout_s)
        except ServerError as error:
            raise click.ClickException(str(error)) from None
    except ServerError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"TorchServe is up: {address(read_properties(config), 'inference_address')}/predictions/{MODEL_NAME} "
               f"(model_version {answer.get('model_version')}) answered a probe image with digit {answer['digit']}. "
               f"Logs: {run_dir}/logs. Stop with `make stop`.")


@main.command("stop")
@click.option("--run-dir", default=".run/torchserve", show_default=True)
@click.option("--timeout", "timeout_s", default=STOP_TIMEOUT_S, show_default=True,
              help="Seconds Java gets to exit after SIGTERM.")
def stop_command(run_dir: str, timeout_s: float) -> None:
    """Stop the run dir's server (and remove its key file); exit 1 when Java outlives the timeout."""
    try:
        stopped = stop(run_dir, timeout_s)
    except ServerError as error:
        raise click.ClickException(str(error)) from None
    click.echo("TorchServe stopped." if stopped else f"no TorchServe running from {run_dir}")


@main.command("ready")
@click.option("--config", default="config.properties", show_default=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--timeout", "timeout_s", default=5.0, show_default=True, help="Seconds for each of the two calls.")
@click.option("--wait", "wait_s", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Retry for up to this many seconds until ready.")
def ready_command(config: str, timeout_s: float, wait_s: float) -> None:
    """Exit 0 when every worker of the model is READY and a probe image gets a prediction;
    else exit 1 with the reason. For a Kubernetes exec probe or a load-balancer check; run it
    in the server's working directory (with token auth, key_file.json is read from there)."""
    try:
        click.echo(retry(lambda: check_ready(config, timeout_s=timeout_s), wait_s))
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
    try:
        status = run_foreground(config, run_dir, stop_timeout_s)
    except ServerError as error:
        raise click.ClickException(str(error)) from None
    sys.exit(status)
