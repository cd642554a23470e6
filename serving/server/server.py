"""Start and stop a TorchServe instance in the background (the commands: serving/server/cli.py;
the foreground server of systemd and containers: serving/server/foreground.py).

Each instance keeps its pid file and logs in its own run dir (TorchServe puts the pid
file in the temp dir, so TMPDIR is pointed there): stopping one never stops another, and
`start` or `run` from a run dir whose server is up touches nothing. The config's parsing lives
in serving/server/properties.py, the readiness checks in serving/server/readiness.py, the token keys' upkeep
(renewal, whose key file is whose) in serving/server/keys.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil   # a TorchServe dependency: finds and waits for its Java process

from serving.handler.artifact import MODEL_NAME
from serving.server.keys import record_key_file, remove_own_key_file
from serving.server.pids import our_process
from serving.server.properties import address, listeners, port_taken, read_properties, workflow_store
from serving.server.readiness import NotReady, key_file_of, probe_once, retry
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
    """The TorchServe Java process named in pid_file, or None (no file yet, gone, or not ours)."""
    return our_process(pid_file, TORCHSERVE_JAVA_CLASS)


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


def stale_archives(config: str, run_dir: str | os.PathLike) -> list[str]:
    """The archives that changed on disk since run_dir's server loaded them; all of them when
    the server left no record (one started before records were kept: it may serve anything)."""
    now = served.on_disk(read_properties(config), None)
    before = served.recorded(Path(run_dir).resolve()) or served.Served({})
    return before.changed(now)
