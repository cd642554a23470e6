"""Start and stop a TorchServe instance, check that its model answers, or run it in the foreground.

    python -m serving.server start --config config.properties --run-dir .run/torchserve
    python -m serving.server stop --run-dir .run/torchserve
    python -m serving.server ready --config config.properties   # exit 0 only if it answers
    ready: mnist 2/2 workers READY, probe image answered digit 1 in 9 ms
    python -m serving.server ready --wait 60                   # the same, retried for up to 60 s
    python -m serving.server run --config config.properties     # foreground: systemd, containers

Each instance keeps its pid file and logs in its own run dir (TorchServe puts the pid
file in the temp dir, so TMPDIR is pointed there): stopping one never stops another, and
`start` or `run` from a run dir whose server is up touches nothing. The config's parsing lives
in serving/server/properties.py, the readiness checks in serving/server/readiness.py, the token keys' upkeep
(renewal, whose key file is whose) in serving/server/keys.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import psutil   # a TorchServe dependency: finds and waits for its Java process

from serving.handler.artifact import MODEL_NAME
from serving.server.keys import KeyRenewer, key_renewer, record_key_file, remove_own_key_file
from serving.server.properties import address, listeners, port_taken, read_properties, workflow_store
from serving.server.readiness import NotReady, check_ready, key_file_of, probe_once, retry
from serving.server import served

PID_FILE = ".model_server.pid"                            # TorchServe's name, in its temp dir
TORCHSERVE_JAVA_CLASS = "org.pytorch.serve.ModelServer"   # how torchserve itself recognises its Java
# TorchServe writes key_file.json and then makes it 0600: with this umask it is private from its
# first byte (and so is everything else the server writes).
SERVER_UMASK = 0o077
STOP_TIMEOUT_S = 30.0


class ServerError(Exception):
    """A server that cannot start or run; the message says why, in one line."""


class AlreadyRunning(ServerError):
    """The run dir's pid file names a live TorchServe: this run dir's server is up already."""

    def __init__(self, run_dir: str | os.PathLike, pid: int, inference_address: str):
        super().__init__(f"a TorchServe is already running from {run_dir} (pid {pid}, {inference_address}): "
                         "`make stop` first")
        self.pid, self.inference_address = pid, inference_address


def torchserve_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("torchserve")), *args]


def server_env(run_dir: Path) -> dict:
    env = dict(os.environ)
    # torchserve prefers TS_CONFIG_FILE to --ts-config: a variable left in the caller's
    # environment must not replace the config we pass.
    env.pop("TS_CONFIG_FILE", None)
    env.update(TMPDIR=str(run_dir), TEMP=str(run_dir), LOG_LOCATION=str(run_dir / "logs"),
               METRICS_LOCATION=str(run_dir / "logs"))
    return env


def require_java() -> None:
    if shutil.which("java") is None:
        raise ServerError("TorchServe needs Java 17: install openjdk-17-jre-headless")


def java_process(pid_file: Path) -> psutil.Process | None:
    """The TorchServe Java process named in pid_file, or None (no file yet, or gone)."""
    try:
        process = psutil.Process(int(pid_file.read_text().split()[0]))
        alive = process.status() != psutil.STATUS_ZOMBIE
        return process if alive and TORCHSERVE_JAVA_CLASS in process.cmdline() else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def check_can_start(config: str | os.PathLike, run_dir: str | os.PathLike) -> dict:
    """The config's properties, once it is sure a server may start: none running from run_dir
    (AlreadyRunning), and every port of the config free (ServerError naming the port and its key).
    TorchServe itself would only log a port clash and leave its caller waiting."""
    properties = read_properties(config)
    running = java_process(Path(run_dir).resolve() / PID_FILE)
    if running is not None:
        raise AlreadyRunning(run_dir, running.pid, address(properties, "inference_address"))
    for listener in listeners(properties):
        why = port_taken(listener)
        if why is not None:
            raise ServerError(f"port {listener.port} on {listener.host} ({listener.key} in {config}) is taken: "
                              f"{why}; stop the program holding it or choose another port")
    return properties


def prepare_workflow_store(properties: dict, cwd: str | os.PathLike | None) -> None:
    """The config's workflow store as an empty directory nobody but root may write (TorchServe
    loads a workflow archive by plain name from there, and its workflow API ignores
    enable_model_api); ServerError when something is in it already."""
    store = workflow_store(properties, cwd)
    if store is None:
        return
    try:
        store.mkdir(parents=True, exist_ok=True)
        if any(store.iterdir()):
            raise ServerError(f"the workflow store {store} must be empty: TorchServe would load what is in it")
        store.chmod(0o555)
    except OSError as error:   # e.g. a read-only filesystem: say which setting, not a traceback
        raise ServerError(f"cannot prepare the workflow store {store} (workflow_store in the config): "
                          f"{error.strerror}") from None


# Lines of TorchServe's output that never say why it ended: Java stack frames, and the JVM's
# complaint about threads still running while it shut down.
QUIET_PREFIXES = ("at ", "...", "Exception in thread")


@dataclass(frozen=True)
class LaunchLog:
    """The part of a run dir's torchserve.out that one launch wrote (the file keeps every launch)."""
    path: Path
    offset: int

    @classmethod
    def open(cls, run_dir: Path) -> LaunchLog:
        path = run_dir / "logs" / "torchserve.out"
        return cls(path, path.stat().st_size if path.exists() else 0)

    def last_words(self) -> str:
        """The last line that says something: not quiet, not an INFO or DEBUG log line."""
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                lines = log.read().decode(errors="replace").splitlines()
        except OSError:
            lines = []
        said = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith(QUIET_PREFIXES)
                and "[INFO ]" not in line and "[DEBUG]" not in line]
        return said[-1] if said else "(no output)"


def check_alive(java: psutil.Process, log: LaunchLog) -> None:
    """ServerError with its last words once java has died: no point waiting for its answer."""
    try:
        if java.is_running() and java.status() != psutil.STATUS_ZOMBIE:
            return
    except psutil.NoSuchProcess:
        pass
    raise ServerError(f"TorchServe (pid {java.pid}) exited at start: {log.last_words()}; see {log.path.parent}/")


def start(config: str, run_dir: str | os.PathLike, timeout_s: float = 180.0,
          cwd: str | os.PathLike | None = None) -> dict:
    """Start TorchServe in the background and return the probe image's answer once the model
    answers. AlreadyRunning when run_dir's server is up; ServerError when it cannot start.
    cwd: the server's working directory, where it writes key_file.json when token
    authorization is on (relative paths in the config resolve from there too)."""
    require_java()
    properties = check_can_start(config, run_dir)
    prepare_workflow_store(properties, cwd)
    run_dir = Path(run_dir).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    served.record(run_dir, served.on_disk(properties, cwd))   # what this start loads
    launch_log = LaunchLog.open(run_dir)
    # TorchServe's Java process inherits stdout: send it to a file, or a caller's pipe never closes.
    with open(launch_log.path, "ab") as log:
        launcher = subprocess.run(torchserve_command("--start", "--ncs", "--ts-config", config),
                                  env=server_env(run_dir), stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, cwd=cwd, umask=SERVER_UMASK)
    java = java_process(run_dir / PID_FILE)   # the launcher wrote the pid file of the Java it started
    if launcher.returncode != 0:
        raise ServerError(f"torchserve --start failed: {launch_log.last_words()}")
    if java is None:
        raise ServerError(f"TorchServe exited at start: {launch_log.last_words()}")
    inference = address(properties, "inference_address")
    key_file = key_file_of(properties, cwd)
    try:
        answer = retry(lambda: probe_once(inference, MODEL_NAME, key_file), timeout_s,
                       give_up=lambda: check_alive(java, launch_log))
        if key_file is not None:   # its key answered: the file is this server's
            record_key_file(run_dir, key_file)
        return answer
    except NotReady as error:
        stop(run_dir)
        raise ServerError(f"model {MODEL_NAME} did not answer within {timeout_s:.0f} s: {error}; "
                          f"see {run_dir}/logs/") from None
    except ServerError:
        stop(run_dir)   # Java is gone: this only clears its pid file
        raise


def stop(run_dir: str | os.PathLike, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the server started from run_dir, wait until it has freed its ports and remove its
    key file; False when none was running there. ServerError when Java outlives timeout_s."""
    run_dir = Path(run_dir).resolve()
    java = java_process(run_dir / PID_FILE)
    if java is None:
        (run_dir / PID_FILE).unlink(missing_ok=True)
        return False
    # `torchserve --stop` also deletes key_file.json from its working directory, whichever
    # server that file belongs to: run it in the run dir, where none is, and remove ours below.
    subprocess.run(torchserve_command("--stop"), env=server_env(run_dir), cwd=run_dir,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    # --stop sends SIGTERM, deletes the pid file and returns at once: wait until Java has
    # exited and freed its ports, so that a caller may start another server on them.
    try:
        java.wait(timeout_s)
    except psutil.TimeoutExpired:
        raise ServerError(f"TorchServe's Java (pid {java.pid}) is still running {timeout_s:.0f} s after SIGTERM "
                          f"and may still hold its ports: `kill -9 {java.pid}`") from None
    remove_own_key_file(run_dir)
    return True


# --- Foreground: TorchServe as the main process of a systemd unit or a container ----------
def own_java(pid_file: Path, launcher_started: float) -> psutil.Process | None:
    """The Java named in pid_file if our launcher started it: one begun before the launcher
    belongs to another server, and must never be stopped by this one."""
    java = java_process(pid_file)
    try:
        return java if java is not None and java.create_time() >= launcher_started else None
    except psutil.Error:
        return None


def end_java(java: psutil.Process, stop_timeout_s: float) -> bool:
    """SIGTERM the Java process, SIGKILL it if it has not ended within stop_timeout_s.
    True when it ended by itself after SIGTERM (or was already gone)."""
    try:
        java.terminate()
        java.wait(stop_timeout_s)
        return True
    except psutil.TimeoutExpired:
        java.kill()
        return False
    except psutil.NoSuchProcess:
        return True


def supervise(launcher: subprocess.Popen, pid_file: Path, stop_requests: list, stop_timeout_s: float,
              renewer: KeyRenewer | None = None) -> int:
    """Wait for `torchserve --foreground` to end, stopping its Java process when a signal was
    recorded in stop_requests and renewing its keys meanwhile. 0 after a requested clean stop;
    non-zero otherwise."""
    launcher_started = psutil.Process(launcher.pid).create_time()
    java, clean_stop = None, True
    while launcher.poll() is None:
        java = java or own_java(pid_file, launcher_started)
        if renewer is not None and java is not None and not stop_requests:
            renewer.tick()
        if stop_requests and java is not None:
            clean_stop = end_java(java, stop_timeout_s)   # the launcher returns once Java has ended
        elif stop_requests and time.monotonic() - stop_requests[0] > stop_timeout_s:
            launcher.kill()   # Java never appeared: nothing else to stop
        try:
            launcher.wait(0.2)
        except subprocess.TimeoutExpired:
            pass
    java = java or own_java(pid_file, launcher_started)
    if java is not None:
        end_java(java, stop_timeout_s)   # the launcher was killed from outside: Java must not outlive it
    if java_process(pid_file) is None:   # ours has ended; a pid file naming another server's Java stays
        pid_file.unlink(missing_ok=True)
        remove_own_key_file(pid_file.parent)
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
    Its output stays on our stdout, for journald or `docker logs`; log files go to run_dir/logs.
    AlreadyRunning or ServerError, before anything starts, when it cannot start."""
    require_java()
    properties = check_can_start(config, run_dir)
    prepare_workflow_store(properties, None)
    run_dir = Path(run_dir).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    command = torchserve_command("--start", "--foreground", "--ncs", "--ts-config", str(config))
    stop_requests: list[float] = []
    handlers = {signum: signal.signal(signum, lambda *_: stop_requests.append(time.monotonic()))
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        launcher = subprocess.Popen(command, env=server_env(run_dir), stdin=subprocess.DEVNULL,
                                    start_new_session=True, umask=SERVER_UMASK)
        return supervise(launcher, run_dir / PID_FILE, stop_requests, stop_timeout_s,
                         key_renewer(properties, run_dir))
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


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


def stale_archives(config: str, run_dir: str | os.PathLike) -> list[str]:
    """The archives that changed on disk since run_dir's server loaded them; all of them when
    the server left no record (one started before records were kept: it may serve anything)."""
    now = served.on_disk(read_properties(config), None)
    before = served.recorded(Path(run_dir).resolve()) or served.Served({})
    return before.changed(now)


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


if __name__ == "__main__":
    main()
