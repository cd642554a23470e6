"""The lifecycle commands are safe to repeat and fail in one line: `start` beside a running
server, `run` beside it, a port another program holds, a server that dies at start, `stop` with
nothing running, `ready --wait`, the demo page twice, `make predict` with nothing answering; and
the archive: its named file list, what the handler imports, the accuracy floor.

Commands run as real processes, the way make runs them: what a user sees is what is asserted.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from repo import REPO_ROOT, subprocess_env
from servers import launch_server
from serving.server import keys
from serving.server import foreground, server
from serving.server.archive import MANIFEST, SHIPPED_DIR, archive_contents, build_archive
from serving.handler.artifact import SERVE_ACCURACY_FLOOR, TORCHSCRIPT_NAME, read_metadata
from serving.server.properties import free_ports, instance_config
from serving.server.readiness import probe_once

FAIL_FAST_S = 30.0   # "at once": well under the 180 s start timeout, with room for a slow machine


def cli(module: str, *args, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def one_line_error(run: subprocess.CompletedProcess) -> str:
    """The single line a failed command printed (Click's "Error: ..."); no traceback."""
    assert run.returncode == 1, run
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    return run.stderr.strip()


@pytest.fixture
def bare_config(tmp_path) -> Path:
    """config.properties on free loopback ports with an empty model store: enough to start Java."""
    (tmp_path / "store").mkdir()
    return instance_config(REPO_ROOT / "config.properties", tmp_path, tmp_path / "store")[0]


# --- stop, ready --wait, a taken port, a server that dies at start -------------------------------
def test_stop_says_when_nothing_was_running(tmp_path):
    stopped = cli("serving.server", "stop", "--run-dir", tmp_path / "run")
    assert stopped.returncode == 0 and stopped.stdout == f"no TorchServe running from {tmp_path / 'run'}\n", stopped
    page = cli("serving.web.demo", "stop", "--run-dir", tmp_path / "demo")
    assert page.returncode == 0 and page.stdout == f"no page server running from {tmp_path / 'demo'}\n", page


def test_ready_wait_retries_until_its_time_is_up_then_gives_the_last_reason(bare_config):
    started = time.monotonic()
    waited = cli("serving.server", "ready", "--config", bare_config, "--wait", 3)
    assert time.monotonic() - started >= 3
    assert "not ready" in one_line_error(waited) and "Connection refused" in waited.stderr


@pytest.mark.server
@pytest.mark.parametrize("key", ["inference_address", "grpc_management_port"])
def test_a_port_held_by_another_program_fails_at_once_naming_port_and_key(tmp_path, key):
    (tmp_path / "store").mkdir()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        value = f"http://127.0.0.1:{port}" if key.endswith("address") else str(port)
        config = instance_config(REPO_ROOT / "config.properties", tmp_path, tmp_path / "store", **{key: value})[0]
        started = time.monotonic()
        refused = cli("serving.server", "start", "--config", config, "--run-dir", tmp_path / "run", "--timeout", 60)
        elapsed = time.monotonic() - started
    line = one_line_error(refused)
    assert elapsed < FAIL_FAST_S, f"took {elapsed:.0f} s: {line}"
    assert f"port {port}" in line and key in line, line


@pytest.mark.server
@pytest.mark.slow
def test_start_stops_waiting_once_torchserve_has_died_and_quotes_why(tmp_path):
    """A config TorchServe rejects at start (a number that is not one): Java exits within seconds,
    and start says why at once instead of waiting out its timeout."""
    (tmp_path / "store").mkdir()
    config = instance_config(REPO_ROOT / "config.properties", tmp_path, tmp_path / "store",
                             max_request_size="abc")[0]
    started = time.monotonic()
    failed = cli("serving.server", "start", "--config", config, "--run-dir", tmp_path / "run", "--timeout", 120)
    elapsed = time.monotonic() - started
    line = one_line_error(failed)
    assert elapsed < FAIL_FAST_S, f"took {elapsed:.0f} s: {line}"
    assert "exited at start" in line and 'Invalid configuration: For input string: "abc"' in line, line


def fake_java(ignore_sigterm: bool = False) -> subprocess.Popen:
    """A process that TorchServe's own check takes for its Java: the class name on its command line."""
    ignore = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignore_sigterm else ""
    return subprocess.Popen([sys.executable, "-c", f"{ignore}import time; time.sleep(120)",
                             server.TORCHSERVE_JAVA_CLASS])


def fake_server(run_dir: Path, ignore_sigterm: bool = False) -> subprocess.Popen:
    """A fake Java named by run_dir's pid file, as if `start` had launched it from there."""
    java = fake_java(ignore_sigterm)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / server.PID_FILE).write_text(str(java.pid))
    time.sleep(0.3)   # let it install its signal handler before anyone signals it
    return java


def test_stop_says_when_java_outlives_its_timeout(tmp_path):
    java = fake_server(tmp_path / "run", ignore_sigterm=True)
    try:
        stopped = cli("serving.server", "stop", "--run-dir", tmp_path / "run", "--timeout", 2, timeout_s=60)
        line = one_line_error(stopped)
        assert f"(pid {java.pid}) is still running 2 s after SIGTERM" in line and f"kill -9 {java.pid}" in line, line
        assert java.poll() is None
    finally:
        java.kill()
        java.wait()


def test_stop_leaves_other_key_files_alone(tmp_path):
    """`torchserve --stop` deletes key_file.json from its working directory, whoever it belongs
    to: stopping our server from a directory where another server keeps its keys must not."""
    java = fake_server(tmp_path / "run")
    other = tmp_path / "other_server"
    other.mkdir()
    (other / "key_file.json").write_text('{"API": {"key": "another servers key"}}')
    threading.Thread(target=java.wait, daemon=True).start()   # reap it once stopped, as init would a real Java
    try:
        stopped = subprocess.run([sys.executable, "-m", "serving.server", "stop", "--run-dir", str(tmp_path / "run")],
                                 cwd=other, env=subprocess_env(), capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0 and stopped.stdout == "TorchServe stopped.\n", stopped
        assert (other / "key_file.json").is_file(), "stop deleted another server's key file"
    finally:
        java.kill()
        java.wait()


def test_stop_removes_the_key_file_it_recorded_only_while_it_is_its_own(tmp_path):
    key_file = tmp_path / "key_file.json"
    for rewritten_by_another, kept in ((False, False), (True, True)):
        key_file.write_text('{"API": {"key": "ours"}}')
        keys.record_key_file(tmp_path, key_file)
        if rewritten_by_another:
            key_file.write_text('{"API": {"key": "a later server started in the same directory"}}')
        keys.remove_own_key_file(tmp_path)
        assert key_file.exists() == kept and not (tmp_path / keys.KEY_OWNER).exists()


def test_start_refuses_a_workflow_store_with_something_in_it(tmp_path):
    """TorchServe loads a workflow archive named by a plain name from workflow_store: it must be empty."""
    (tmp_path / "store").mkdir()
    config = instance_config(REPO_ROOT / "config.properties", tmp_path, tmp_path / "store",
                             workflow_store=str(tmp_path / "workflows"))[0]
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "planted.war").write_bytes(b"PK")
    refused = cli("serving.server", "start", "--config", config, "--run-dir", tmp_path / "run", timeout_s=60)
    line = one_line_error(refused)
    assert f"the workflow store {tmp_path / 'workflows'} must be empty" in line, line
    assert not (tmp_path / "run" / server.PID_FILE).exists()


def test_start_names_a_workflow_store_it_cannot_make_in_one_line(tmp_path):
    """A workflow_store under a file (or on a read-only filesystem) is a config mistake: one line
    naming the setting, not an OSError traceback."""
    (tmp_path / "store").mkdir()
    (tmp_path / "a-file").write_text("not a directory")
    config = instance_config(REPO_ROOT / "config.properties", tmp_path, tmp_path / "store",
                             workflow_store=str(tmp_path / "a-file" / "workflows"))[0]
    refused = cli("serving.server", "start", "--config", config, "--run-dir", tmp_path / "run", timeout_s=60)
    line = one_line_error(refused)
    assert "cannot prepare the workflow store" in line and "workflow_store" in line, line


def test_the_supervisor_never_ends_another_servers_java(tmp_path):
    """`run` from a run dir whose pid file names another server's live Java: torchserve refuses
    ("already running", exit 1), and the supervisor must leave that Java and its pid file alone."""
    other = fake_java()
    try:
        pid_file = tmp_path / server.PID_FILE
        pid_file.write_text(str(other.pid))
        time.sleep(0.05)   # process start times have a clock tick's resolution: the launcher starts later
        refusing_launcher = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"])
        assert foreground.supervise(refusing_launcher, pid_file, [], stop_timeout_s=5) == 1
        assert other.poll() is None, "the supervisor ended another server's Java"
        assert pid_file.read_text() == str(other.pid)
    finally:
        other.kill()
        other.wait()


# --- a server already up: start, run and a second run dir leave it alone ------------------------
@pytest.mark.server
@pytest.mark.slow
def test_start_and_run_beside_a_running_server_leave_it_serving(tmp_path, exported):
    inference, _, run_dir, workdir = launch_server(tmp_path, exported)
    config = workdir / "config.properties"
    try:
        java = server.java_process(run_dir / server.PID_FILE)
        assert java is not None

        again = cli("serving.server", "start", "--config", config, "--run-dir", run_dir)
        assert again.returncode == 0 and again.stderr == "", again
        assert again.stdout.startswith(f"TorchServe is already running from {run_dir} (pid {java.pid})"), again
        assert inference in again.stdout

        refused = cli("serving.server", "run", "--config", config, "--run-dir", run_dir, timeout_s=60)
        line = one_line_error(refused)
        assert f"already running from {run_dir} (pid {java.pid}" in line and "`make stop` first" in line, line

        elsewhere = cli("serving.server", "start", "--config", config, "--run-dir", tmp_path / "second", timeout_s=60)
        assert "is taken" in one_line_error(elsewhere)

        assert java.is_running() and server.java_process(run_dir / server.PID_FILE).pid == java.pid
        assert probe_once(inference)["digit"] == 1

        stopped = cli("serving.server", "stop", "--run-dir", run_dir)
        assert stopped.returncode == 0 and stopped.stdout == "TorchServe stopped.\n", stopped
        assert not java.is_running()
    finally:
        server.stop(run_dir)


# --- the demo page twice, make predict with nothing answering --------------------------------------
@pytest.mark.slow  # starts servers
def test_the_demo_page_started_twice_says_already_running(tmp_path):
    port = free_ports(1)[0]
    config = tmp_path / "config.properties"
    config.write_text(f"cors_allowed_origin=http://127.0.0.1:{port}\n")
    run_dir = tmp_path / "demo"
    try:
        first = cli("serving.web.demo", "start", "--config", config, "--run-dir", run_dir, timeout_s=60)
        assert first.returncode == 0 and first.stdout.startswith(f"The draw-a-digit page: http://127.0.0.1:{port}/")
        second = cli("serving.web.demo", "start", "--config", config, "--run-dir", run_dir, timeout_s=60)
        assert second.returncode == 0, second
        assert second.stdout.startswith(f"The draw-a-digit page is already running: http://127.0.0.1:{port}/"), second
    finally:
        stopped = cli("serving.web.demo", "stop", "--run-dir", run_dir)
    assert stopped.stdout == "Demo page server stopped.\n"


def test_demo_stop_never_signals_a_process_that_took_over_its_pid(tmp_path):
    """A pid file left by a crashed page server, its number since given to another process."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "demo").mkdir()
        (tmp_path / "demo" / "demo.pid").write_text(str(stranger.pid))
        stopped = cli("serving.web.demo", "stop", "--run-dir", tmp_path / "demo")
        assert stopped.stdout == f"no page server running from {tmp_path / 'demo'}\n", stopped
        time.sleep(0.2)
        assert stranger.poll() is None, "demo stop killed a process that is not its page server"
    finally:
        stranger.kill()
        stranger.wait()


def test_make_predict_fails_when_nothing_answers(tmp_path):
    """The recipe's own curl line, pointed at a loopback port where nothing listens."""
    printed = subprocess.run(["make", "-n", "-o", ".venv/.installed", "predict", "IMG=digit.png"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout
    [line] = [line for line in printed.splitlines() if line.startswith("curl ")]
    assert "127.0.0.1:8080" in line
    command = line.replace("127.0.0.1:8080", f"127.0.0.1:{free_ports(1)[0]}")
    (tmp_path / "digit.png").write_bytes(b"not sent anyway")
    run = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert run.returncode != 0, run
    assert "Failed to connect" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


# --- the archive -------------------------------------------------------------------------------------
def test_the_archive_holds_exactly_its_named_files(tmp_path, exported):
    """The .mar holds the model, its manifest and exactly the files of serving/handler/."""
    model = exported / TORCHSCRIPT_NAME
    mar = build_archive(model, tmp_path, force=True)
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
    assert names == archive_contents(model)
    shipped = {path.name for path in SHIPPED_DIR.iterdir() if path.name != "__pycache__"}
    assert names - {model.name, MANIFEST} == shipped


def test_the_archive_refuses_a_model_below_the_floor_unless_forced(tmp_path, exported):
    model = exported / TORCHSCRIPT_NAME
    accuracy = read_metadata(model)["checkpoint_test_acc"]
    assert accuracy < SERVE_ACCURACY_FLOOR, "the test model is meant to be below the floor (~98%)"
    refused = cli("serving.server.archive", "--serialized-file", model, "--export-path", tmp_path)
    line = one_line_error(refused)
    assert f"{accuracy:.2%}" in line and f"{SERVE_ACCURACY_FLOOR:.0%} floor" in line and "--force" in line, line
    assert not (tmp_path / "mnist.mar").exists()
    forced = cli("serving.server.archive", "--serialized-file", model, "--export-path", tmp_path, "--force")
    assert forced.returncode == 0 and (tmp_path / "mnist.mar").is_file(), forced

