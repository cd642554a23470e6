"""Serve the draw-a-digit page (serving/web/) in the background, on the origin TorchServe allows.

    python -m serving.web.demo start --config config.properties --run-dir .run/demo
    python -m serving.web.demo stop --run-dir .run/demo

`make demo` runs `make serve` and then `start`, which prints
    The draw-a-digit page: http://127.0.0.1:8000/ (log: .run/demo/demo.log; `make stop` stops it)
or, with the page already up, "The draw-a-digit page is already running: ..." (exit 0 either way).
The page calls TorchServe from its own origin, and the browser shows it the answers only if
TorchServe allows that origin; so the page is served at exactly the config's
cors_allowed_origin, read from the config rather than typed a second time.
"""
from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import click
from serving.server.pids import is_alive, our_process
from serving.server.properties import read_properties
from serving.web import WEB_DIR

PID_FILE, LOG_FILE = "demo.pid", "demo.log"


class DemoError(Exception):
    """The page cannot be served; the message says why, in one line."""


class AlreadyRunning(DemoError):
    """The run dir's page server is up already."""

    def __init__(self, url: str, pid: int):
        super().__init__(f"the draw-a-digit page is already running: {url} (pid {pid})")
        self.url, self.pid = url, pid


def allowed_origin(config: str | os.PathLike) -> tuple[str, int]:
    """(host, port) of the page origin that the TorchServe config allows."""
    origin = read_properties(config).get("cors_allowed_origin", "")
    parts = urlsplit(origin)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise DemoError(
            f"{config}: cors_allowed_origin={origin!r} names no http origin to serve the page from; "
            "set it to one, such as http://127.0.0.1:8000")
    return parts.hostname, parts.port or 80


def static_server(host: str, port: int, directory: str | os.PathLike = WEB_DIR) -> ThreadingHTTPServer:
    """A standard-library static file server for directory, bound but not yet serving."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(directory))
    return ThreadingHTTPServer((host, port), handler)


SERVE_COMMAND = ("-m", "serving.web.demo", "serve")   # what start runs, and how stop recognises it


def running_pid(run_dir: Path) -> int | None:
    """The pid of the demo server started from run_dir, if it is still alive and ours."""
    process = our_process(run_dir / PID_FILE, " ".join(SERVE_COMMAND))
    return process.pid if process else None


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server binds
        try:
            sock.bind((host, port))
        except OSError as error:
            raise DemoError(f"cannot serve the page on {host}:{port}: {error.strerror} "
                            "(another `make demo`? `make stop` stops it)") from None


def last_line(log: Path) -> str:
    """The last non-blank line of the page server's log: its reason for exiting."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:  # port taken, bad host, ...: the reason is in its log
            raise DemoError(f"the demo server exited at start: {last_line(log)} (see {log})")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    process.terminate()
    process.wait()
    raise DemoError(f"the demo server did not answer {url} within {timeout_s:.0f} s; see {log}")


def start(config: str | os.PathLike, run_dir: str | os.PathLike) -> str:
    """Start the page's server in the background (it outlives this process); returns its URL.
    AlreadyRunning when run_dir's page server is up; DemoError when it cannot start."""
    host, port = allowed_origin(config)
    url = f"http://{host}:{port}/"
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    pid = running_pid(run_dir)
    if pid is not None:
        raise AlreadyRunning(url, pid)
    check_port_free(host, port)
    command = [sys.executable, *SERVE_COMMAND, "--host", host, "--port", str(port)]
    log = run_dir / LOG_FILE
    # Output to a file and a session of its own: `make`'s pipe closes, and the server lives on.
    with open(log, "ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    (run_dir / PID_FILE).write_text(str(process.pid))
    try:
        wait_until_serving(url, process, log)
    except DemoError:
        (run_dir / PID_FILE).unlink(missing_ok=True)
        raise
    return url


def stop(run_dir: str | os.PathLike) -> bool:
    """Stop the server started from run_dir; False when none was running."""
    run_dir = Path(run_dir).resolve()
    pid = running_pid(run_dir)
    (run_dir / PID_FILE).unlink(missing_ok=True)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


@click.group()
def main() -> None:
    """Serve the draw-a-digit page in the background, beside `make serve`'s TorchServe."""


@main.command("start")
@click.option("--config", default="config.properties", show_default=True, type=click.Path(exists=True, dir_okay=False),
              help="TorchServe config whose cors_allowed_origin says where the page is served.")
@click.option("--run-dir", default=".run/demo", show_default=True, help="Where the pid file and log go.")
@click.option("--server", default=None, help="The inference server the page posts to (its ?server=), when not "
                                             "the page's default TorchServe: the KServe engine's http://127.0.0.1:8085.")
def start_command(config: str, run_dir: str, server: str | None) -> None:
    query = f"?server={server}" if server else ""
    try:
        url = start(config, run_dir)
    except AlreadyRunning as running:
        click.echo(f"The draw-a-digit page is already running: {running.url}{query} (pid {running.pid}; "
                   "`make stop` stops it)")
        return
    except DemoError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"The draw-a-digit page: {url}{query} (log: {Path(run_dir) / LOG_FILE}; `make stop` stops it)")


@main.command("stop")
@click.option("--run-dir", default=".run/demo", show_default=True)
def stop_command(run_dir: str) -> None:
    click.echo("Demo page server stopped." if stop(run_dir) else f"no page server running from {run_dir}")


@main.command("serve", hidden=True)
@click.option("--host", required=True)
@click.option("--port", required=True, type=int)
def serve_command(host: str, port: int) -> None:
    """Serve the page in the foreground (what `start` runs in the background)."""
    with static_server(host, port) as httpd:
        click.echo(f"serving {WEB_DIR} on http://{host}:{port}/", err=True)
        httpd.serve_forever()


if __name__ == "__main__":
    main()
