"""Operating the server as a service: Prometheus metrics, the readiness check, TorchServe in
the foreground, and the plain `torchserve --start` of the project's environment.

Every server here is our own (free loopback ports, own run dir), stopped by its own pid file.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from http_client import request
from imaging import hostile_corpus
from repo import REPO_ROOT, subprocess_env
from serving.server import readiness
from serving.server import server
from serving.server.properties import free_ports, instance_config, read_properties
from serving.server.archive import build_archive
from serving.handler.artifact import MODEL_NAME, TORCHSCRIPT_NAME
from servers import launch_server, predictions_url, worker_pids

GOOD_REQUESTS = 12
STOP_BOUND_S = 30.0


# --- helpers ---------------------------------------------------------------------------------
def metrics_address(workdir: Path) -> str:
    return read_properties(workdir / "config.properties")["metrics_address"]


def counts_by(families, metric: str, label: str) -> dict[str, float]:
    """{label value: value} of one counter among parsed Prometheus metric families."""
    return {sample.labels[label]: sample.value for family in families if family.name == metric
            for sample in family.samples}


def scraped_counts(address: str, metric: str, label: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{address}/metrics", timeout=10) as response:
        return counts_by(text_string_to_metric_families(response.read().decode()), metric, label)


def poll(read, done, timeout_s: float = 60.0):
    """read() until done(value) (metrics arrive asynchronously) or time runs out; the last value."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.5)
        value = read()
    return value


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def send_good_and_hostile(inference: str, mnist_digits) -> tuple[Counter, Counter]:
    """GOOD_REQUESTS real digits, the hostile corpus and one several-image request with a bad
    image among good ones. Returns what the answers say: (digits answered, codes refused)."""
    images = mnist_digits.images
    pngs = [mnist_digits.png(i) for i in range(GOOD_REQUESTS)]
    bodies = [(png, {"Content-Type": "image/png"}) for png in pngs]
    bodies += [(body, headers) for _, body, headers, _, _ in hostile_corpus(images[0], images[1])]
    several = {"images": [base64.b64encode(pngs[0]).decode(), "%%% not base64", base64.b64encode(pngs[1]).decode()]}
    bodies.append((json.dumps(several).encode(), {"Content-Type": "application/json"}))
    digits, codes = Counter(), Counter()
    for body, headers in bodies:
        _, answer = request(predictions_url(inference), body, headers=headers)
        answer = json.loads(answer)
        for item in answer.get("predictions", [answer]):
            if "digit" in item:
                digits[str(item["digit"])] += 1
            else:
                codes[item["code"]] += 1
    return digits, codes


@contextmanager
def prometheus(target: str, directory: Path):
    """A real Prometheus on a free loopback port scraping target (host:port) every second,
    with its own config and storage in directory; stopped by its pid. Yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("these tests need Prometheus: `make prometheus` (apt-get install prometheus)")
    port = free_ports(1)[0]
    config = directory / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                      f"scrape_configs:\n  - job_name: digitserve\n    static_configs:\n"
                      f"      - targets: ['{target}']\n")
    with open(directory / "prometheus.log", "wb") as log:
        process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
                                    f"--web.listen-address=127.0.0.1:{port}"],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def promql(prometheus_url: str, query: str, label: str) -> dict[str, float]:
    """{label value: value} of an instant query through Prometheus's HTTP API ({} until it
    answers)."""
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            result = json.loads(response.read())["data"]["result"]
    except OSError:
        return {}
    return {series["metric"][label]: float(series["value"][1]) for series in result}


def ready(config: Path, cwd: Path, *options: str) -> subprocess.CompletedProcess:
    """`python -m serving.server ready` as a probe runs it."""
    return subprocess.run([sys.executable, "-m", "serving.server", "ready", "--config", str(config), *options],
                          cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=120)


def listening(address: str) -> bool:
    parts = urllib.parse.urlsplit(address)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
        return True
    except OSError:
        return False


def instance(tmp_path: Path, exported: Path, base_config: str = "config.properties"):
    """An archive and a config of our own on free ports, for a server the test starts itself."""
    model_store = tmp_path / "model_store"
    build_archive(exported / TORCHSCRIPT_NAME, model_store, force=True)   # the ~98% test model
    return instance_config(REPO_ROOT / base_config, tmp_path, model_store)


# --- metrics ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory, exported, mnist_digits):
    """A server of our own that has answered a known set of requests: (workdir, digits, codes)."""
    inference, _, run_dir, workdir = launch_server(tmp_path_factory.mktemp("metrics"), exported)
    try:
        # server.start's probe image got an answer before ours (more than one when a slow first probe
        # timed out on the client and was retried: each was answered before start returned). Count
        # them in once the metrics have caught up: two successive reads (poll's interval apart) agree.
        previous: list[dict] = [{}]

        def settled(counts: dict) -> bool:
            done = sum(counts.values()) >= 1 and counts == previous[0]
            previous[0] = counts
            return done

        probe = poll(lambda: scraped_counts(metrics_address(workdir), "DigitPredictions", "Digit"), settled)
        assert set(probe) == {"1"} and sum(probe.values()) >= 1, probe   # the probe is a drawn 1
        digits, codes = send_good_and_hostile(inference, mnist_digits)
        yield workdir, dict(digits + Counter(probe)), dict(codes)
    finally:
        server.stop(run_dir)


@pytest.mark.server
@pytest.mark.slow
def test_metrics_endpoint_counts_each_digit_and_each_refusal(metrics_server):
    workdir, digits, codes = metrics_server
    address = metrics_address(workdir)
    assert sum(codes.values()) >= 12 and len(digits) >= 5   # the corpus really covers codes and digits
    assert poll(lambda: scraped_counts(address, "DigitPredictions", "Digit"), digits.__eq__) == digits
    assert poll(lambda: scraped_counts(address, "RequestsRejected", "Code"), codes.__eq__) == codes
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"{address}/metrics", timeout=10) as response:
        names = {sample.name for family in text_string_to_metric_families(response.read().decode())
                 for sample in family.samples}
    assert {"HandlerTime", "PredictionTime", "PreprocessTime", "ts_inference_requests_total"} <= names


@pytest.mark.server
@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_same_counts(metrics_server, tmp_path):
    workdir, digits, codes = metrics_server
    target = urllib.parse.urlsplit(metrics_address(workdir)).netloc
    with prometheus(target, tmp_path) as url:
        query = f'sum by (Digit) (DigitPredictions{{ModelName="{MODEL_NAME}"}})'
        assert poll(lambda: promql(url, query, "Digit"), digits.__eq__) == digits
        query = f'sum by (Code) (RequestsRejected{{ModelName="{MODEL_NAME}"}})'
        assert poll(lambda: promql(url, query, "Code"), codes.__eq__) == codes


# --- readiness and the foreground server -------------------------------------------------------
@pytest.mark.server
@pytest.mark.slow
def test_ready_and_run_through_a_servers_life(tmp_path, exported):
    """`run` as systemd would start it, `ready` as a probe would call it: not ready before
    start, ready while serving, not ready while both workers hang, ready again once TorchServe
    has replaced them after they were killed; SIGTERM ends it (exit 0) within a bound, ports freed.
    Every state asserted is one the test holds or waits for, never a passing one (right after a
    SIGKILL the management API may say READY for a while, or the workers may be back already)."""
    config, inference, management = instance(tmp_path, exported)
    run_dir = tmp_path / "run"
    before = ready(config, tmp_path)
    assert before.returncode == 1 and "Connection refused" in before.stderr, before
    assert len(before.stderr.strip().splitlines()) == 1 and "Traceback" not in before.stderr

    with open(tmp_path / "run.out", "wb") as log:
        runner = subprocess.Popen([sys.executable, "-m", "serving.server", "run", "--config", str(config),
                                   "--run-dir", str(run_dir)], cwd=tmp_path, env=subprocess_env(),
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        assert readiness.retry(lambda: readiness.check_ready(config, tmp_path), 180).startswith("ready:")
        serving = ready(config, tmp_path)
        assert serving.returncode == 0 and serving.stdout.startswith(f"ready: {MODEL_NAME} 2/2 workers READY"), serving

        # Stopped workers hang for as long as the test keeps them stopped (TorchServe restarts a
        # worker only after default_response_timeout, 30 s): `ready`'s probe times out in 5 s.
        killed = worker_pids(management)
        for pid in killed:
            os.kill(pid, signal.SIGSTOP)
        down = ready(config, tmp_path)
        assert down.returncode == 1 and "not ready: " in down.stderr, down
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        replaced = worker_pids(management, replacing=killed)
        assert not set(killed) & set(replaced) and len(replaced) == len(killed)
        recovered = ready(config, tmp_path, "--wait", "60")   # the replacements may still be warming up
        assert recovered.returncode == 0 and recovered.stdout.startswith("ready:"), recovered

        java = server.java_process(run_dir / ".model_server.pid")
        assert java is not None
        stopping = time.monotonic()
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(STOP_BOUND_S) == 0
        print(f"run stopped {time.monotonic() - stopping:.1f} s after SIGTERM")
        assert not java.is_running() and not [pid for pid in replaced if alive(pid)]
        assert not [address for address in (inference, management, metrics_address(tmp_path)) if listening(address)]
        after = ready(config, tmp_path)
        assert after.returncode == 1 and "Connection refused" in after.stderr, after
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        server.stop(run_dir)


# --- the plain `torchserve --start` ---------------------------------------------------------------
def install_activate_line(venv: Path) -> str:
    """The $(INSTALLED) recipe's activate line, as make expands it for this venv."""
    printed = subprocess.run(["make", "-n", "-B", f"VENV={venv}", f"{venv}/.installed"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout
    [line] = [line for line in printed.splitlines() if "activate.sh" in line]
    return line


def test_install_makes_plain_torchserve_start_use_the_projects_config(tmp_path):
    """The activate line, run twice: one torchserve() function that adds this checkout's
    config to `--start` only when the command names no config of its own."""
    line = install_activate_line(tmp_path)
    activate = tmp_path / "bin" / "activate"
    activate.parent.mkdir()
    activate.write_text("# venv activate\n")
    for _ in range(2):
        subprocess.run(["bash", "-c", line], cwd=REPO_ROOT, check=True)
    assert activate.read_text().count("torchserve() {") == 1
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "torchserve").write_text('#!/bin/sh\necho "$@"\n')
    (stub / "torchserve").chmod(0o755)
    config = str(REPO_ROOT / "config.properties")

    def typed(command: str, **env: str) -> str:
        """What the real torchserve would be called with (the stub echoes its arguments)."""
        base = {key: value for key, value in os.environ.items() if key != "TS_CONFIG_FILE"}
        script = f'source "{activate}" && {command}'
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                              env={**base, "PATH": f"{stub}:{os.environ['PATH']}", **env}).stdout.strip()

    assert typed("torchserve --start --ncs") == f"--start --ncs --ts-config {config}"
    assert typed("torchserve --start --ts-config config.production.properties") == \
        "--start --ts-config config.production.properties"     # an explicit config always wins
    assert typed("torchserve --stop") == "--stop"
    assert typed("torchserve --start", TS_CONFIG_FILE="other.properties") == "--start"   # the user's own choice


@pytest.mark.server
@pytest.mark.slow
def test_plain_torchserve_start_in_an_activated_venv_serves(tmp_path, exported):
    """`torchserve --start --ncs` with no --ts-config, typed in a shell that sourced the venv's
    activate script (its function pointed at a config on free ports, here the production one,
    token auth on): it serves, and `ready` authorizes with key_file.json."""
    config, inference, _ = instance(tmp_path, exported, "config.production.properties")
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    activate = tmp_path / "activate"
    activate.write_text((REPO_ROOT / "serving" / "server" / "activate.sh").read_text().replace("@CONFIG@", str(config)))
    env = {**server.server_env(run_dir), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with open(run_dir / "logs" / "torchserve.out", "wb") as log:
        subprocess.run(["bash", "-c", f'source "{activate}" && torchserve --start --ncs'], cwd=tmp_path,
                       env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=True)
    try:
        answer = readiness.wait_until_answering(inference, 180, key_file=tmp_path / "key_file.json")
        assert answer["digit"] == 1
        # One worker answered; the other may still be loading (both CI runs of this stop saw
        # "1 of 2 READY (READY, UNLOADING)" here in a full suite): wait as a probe would.
        serving = ready(config, tmp_path, "--wait", "120")
        assert serving.returncode == 0 and serving.stdout.startswith("ready:"), serving
        elsewhere = ready(config, run_dir)   # no key_file.json there
        assert elsewhere.returncode == 1 and "no management key" in elsewhere.stderr, elsewhere
    finally:
        server.stop(run_dir)
    assert not listening(inference)
