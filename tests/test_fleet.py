"""The fleet with real parts: two real TorchServe replicas under a real supervisord behind a real
nginx, on free loopback ports, one fleet for the module. Each fault of issue 19 under bounded load:
a replica's Java killed, a rollout (and its rollback), a rate limit hit, an origin not on the
list, closed paths, an oversize body, TLS checked against the generated certificate; and the
draw-a-digit page answering through the front door in a real Chromium.

    MNIST_DATA_DIR=../shared/mnist .venv/bin/python -m pytest -q tests/test_fleet.py
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple
from pathlib import Path

import psutil
import pytest
import yaml
from PIL import Image

from imaging import encode
from fleet_helpers import PacedLoad, plan_on_free_ports, predictions, wait_for
from http_client import request
from repo import REPO_ROOT, subprocess_env
from benchmarks import front_door as front_door_bench
from serving.fleet import fleet as fleet_module
from serving.fleet import frontdoor, rotation
from serving.server import keys, server
from serving.server.pids import our_process
from serving.web import demo
from serving.fleet import replicas as replicas_module
from serving.server.archive import MANIFEST, ArchiveError, build_archive
from serving.handler.artifact import MODEL_NAME, TORCHSCRIPT_NAME, read_metadata
from serving.fleet.frontdoor import FrontDoorError, RotationState
from serving.server.properties import listeners, read_properties, set_properties
from serving.server.readiness import inference_key
from serving.fleet.topology import (CLIENT_TIMEOUT_S, CLOSED_PATHS, CONNECTIONS_PER_ADDRESS, HOP_SECRET_HEADER,
                                     NGINX_PRIORITY, SPOOLED_BODIES_PER_ADDRESS, SPOOLED_BODY_BYTES, Fleet,
                                     TopologyError, nginx_workers, workers_per_replica)

LISTED_ORIGIN = "http://localhost:3000"
RATE_LIMIT = 40            # requests/s per client address; the paced loads below stay well under it
LOAD = {"clients": 4, "per_client_rps": 4.0}   # 16 requests/s: bounded, and under RATE_LIMIT
NEW_VERSION = "2.0"
# Above the per-address limit and above nginx's old worker_connections (1,024), which they filled.
IDLE_CONNECTIONS = max(1100, CONNECTIONS_PER_ADDRESS + 1)
TRUSTED_PROXY = "127.0.0.2"   # the module fleet trusts its X-Forwarded-For (an Ingress's role)
B_REQUESTS = 40           # client B's predictions beside a flood of explanations (0.2 s apart)


def manifest_version(archive: Path) -> str:
    with zipfile.ZipFile(archive) as mar:
        return json.loads(mar.read(MANIFEST))["model"]["modelVersion"]


# --- without a server: the archive's version, the rendered config ---------------------------------
@pytest.fixture(scope="module")
def archives(tmp_path_factory, exported) -> dict[str, Path]:
    """The exported model as the archive `make fleet` serves (its weights' version) and as 2.0."""
    root = tmp_path_factory.mktemp("archives")
    return {"first": build_archive(exported / TORCHSCRIPT_NAME, root / "v1", force=True),
            "new": build_archive(exported / TORCHSCRIPT_NAME, root / "v2", force=True, version=NEW_VERSION)}


def test_archive_version_defaults_to_the_weights_and_can_be_named(archives, exported, tmp_path):
    assert manifest_version(archives["first"]) == read_metadata(exported / TORCHSCRIPT_NAME)["model_version"]
    assert manifest_version(archives["new"]) == NEW_VERSION
    with pytest.raises(ArchiveError, match="becomes part of a URL"):
        build_archive(exported / TORCHSCRIPT_NAME, tmp_path, force=True, version="2.0/../x")


def test_archive_cli_takes_version_and_export_path(exported, tmp_path):
    built = subprocess.run([sys.executable, "-m", "serving.server.archive", "--serialized-file", exported / TORCHSCRIPT_NAME,
                            "--version", "3.1", "--export-path", tmp_path / "v3", "--force"],
                           cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert manifest_version(tmp_path / "v3" / f"{MODEL_NAME}.mar") == "3.1"


def nginx_accepts(fleet: Fleet, state: RotationState = RotationState()) -> str:
    frontdoor.make_certificate(fleet)
    return frontdoor.write_config(fleet, state).read_text()


def test_the_template_renders_a_config_nginx_accepts_default_and_production(tmp_path):
    plain = plan_on_free_ports(tmp_path / "plain", REPO_ROOT / "config.properties", origins=(LISTED_ORIGIN,))
    text = nginx_accepts(plain, RotationState(down=frozenset({"replica-1"})))
    assert "{{" not in text and f'"{LISTED_ORIGIN}" "{LISTED_ORIGIN}";' in text
    assert "real_ip" not in text   # no proxy trusted unless named
    upstream = text[text.index("upstream replicas {"):]
    assert upstream.index("least_conn;") < upstream.index("keepalive 32;")   # nginx -t passed above
    behind = plan_on_free_ports(tmp_path / "behind", REPO_ROOT / "config.properties", trusted_proxies=("10.0.0.0/8",))
    assert "set_real_ip_from 10.0.0.0/8;" in nginx_accepts(behind)
    # Every fleet runs token auth (management must need a key): nginx reaches each replica's hop.
    assert re.search(rf"server 127\.0\.0\.1:{plain.replicas[1].ports.key_hop} .*down;", text)
    assert f"client_max_body_size {read_properties(REPO_ROOT / 'config.properties')['max_request_size']};" in text
    production = plan_on_free_ports(tmp_path / "prod", REPO_ROOT / "config.production.properties")
    text = nginx_accepts(production, RotationState(inference_keys={"replica-0": "key-zero"}))
    assert text.count('proxy_set_header Authorization "Bearer key-zero";') == 1
    assert (production.nginx_dir / "nginx.conf").stat().st_mode & 0o077 == 0   # it holds keys


def test_a_config_is_private_even_over_a_candidate_a_failed_run_left(tmp_path):
    """nginx.conf holds the replicas' keys: 0600. A world-readable nginx.conf.new left behind (a
    run killed between writing and renaming it) kept its mode under touch, and the config took it."""
    plan = plan_on_free_ports(tmp_path / "fleet", REPO_ROOT / "config.properties")
    stale = frontdoor.config_path(plan.nginx_dir).with_suffix(".new")
    stale.parent.mkdir(parents=True)
    stale.write_text("left behind")
    stale.chmod(0o644)
    nginx_accepts(plan, RotationState(inference_keys={"replica-0": "key-zero"}))
    assert frontdoor.config_path(plan.nginx_dir).stat().st_mode & 0o077 == 0 and not stale.exists()
    keys = tmp_path / "client-keys.map"   # any private file written over one that was readable
    keys.write_text("old")
    keys.chmod(0o644)
    frontdoor.write_private(keys, "new")
    assert keys.stat().st_mode & 0o077 == 0 and keys.read_text() == "new"


@pytest.mark.parametrize("version", ["../../x", "1.0/../../mnist", "1.0?x=1", "", 2.0])
def test_a_rollout_refuses_an_archive_whose_version_is_no_path_segment(tmp_path, version):
    """Issue 27 point 13: the version becomes a file name and a management API path; checked as
    serving/server/archive.py checks the versions it writes."""
    archive = tmp_path / "odd.mar"
    with zipfile.ZipFile(archive, "w") as mar:
        mar.writestr(MANIFEST, json.dumps({"model": {"modelName": MODEL_NAME, "modelVersion": version}}))
    with pytest.raises(rotation.FleetError, match="must be letters, digits"):
        rotation.archive_version(archive)


def test_bad_origins_and_client_key_files_are_refused_in_one_line(tmp_path):
    with pytest.raises(FrontDoorError, match="not an address or CIDR range"):
        frontdoor.render(plan_on_free_ports(tmp_path, REPO_ROOT / "config.properties", trusted_proxies=("0/0;",)),
                         RotationState())
    with pytest.raises(FrontDoorError, match="not scheme://host"):
        frontdoor.render(plan_on_free_ports(tmp_path, REPO_ROOT / "config.properties", origins=("evil;",)),
                         RotationState())
    keys = tmp_path / "keys.txt"
    keys.write_text('short"key\n')
    with pytest.raises(FrontDoorError, match="key 1"):
        frontdoor.render(plan_on_free_ports(tmp_path, REPO_ROOT / "config.properties", api_keys_file=keys),
                         RotationState())


def test_a_taken_port_fails_start_at_once_naming_it(tmp_path):
    plan = plan_on_free_ports(tmp_path / "fleet", REPO_ROOT / "config.properties")
    archive = tmp_path / "any.mar"
    archive.write_bytes(b"checked after the ports")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", plan.replicas[1].ports.management))
        holder.listen()
        with pytest.raises(fleet_module.FleetError, match=rf"port {plan.replicas[1].ports.management} "
                                                          r"\(replica-1 management\) is taken"):
            fleet_module.start(plan, archive)
    assert fleet_module.supervisord_process(plan) is None


def test_default_replica_ports_stay_clear_of_make_serve_and_prometheus(tmp_path):
    serve = {listener.port for listener in listeners(read_properties(REPO_ROOT / "config.properties"))}
    plan = Fleet.plan(16, tmp_path, REPO_ROOT / "config.properties")
    ports = [port for replica in plan.replicas for port in astuple(replica.ports)]
    assert len(set(ports)) == len(ports)
    assert not set(ports) & (serve | {9090, plan.front_door.http_port, plan.front_door.tls_port}), \
        "9090: Prometheus' default, which docs/operating.md runs"


def test_replicas_share_the_cores_in_workers_and_their_config_says_so(tmp_path):
    """The archive names no worker count (TorchServe 0.12 lets an archive's minWorkers win over any
    config): each replica's config does, its share of the cores, so that the replicas' workers
    together never outnumber them."""
    archive_config = yaml.safe_load((REPO_ROOT / "serving/handler/model-config.yaml").read_text())
    assert not {"minWorkers", "maxWorkers"} & set(archive_config)
    assert [workers_per_replica(replicas, cores=2) for replicas in (1, 2, 3)] == [2, 1, 1]
    assert workers_per_replica(2, cores=16) == 8
    plan = Fleet.plan(2, tmp_path, REPO_ROOT / "config.properties")
    assert plan.workers_per_replica == max(1, len(os.sched_getaffinity(0)) // 2)
    assert Fleet.from_json(plan.to_json()) == plan
    chosen = Fleet.plan(2, tmp_path, REPO_ROOT / "config.properties", workers=3)
    settings = chosen.replicas[1].settings(chosen.config, chosen.workers_per_replica)
    assert settings["default_workers_per_model"] == "3"
    with pytest.raises(TopologyError, match="at least one worker"):
        Fleet.plan(2, tmp_path, REPO_ROOT / "config.properties", workers=0)


def test_a_pid_file_naming_another_process_is_never_taken_for_ours(tmp_path):
    """A pid file outlives its process, and its number may go to any other: every "is this pid
    ours" check (the server's Java, the fleet's supervisord and nginx, the page server) holds the
    command line too. The nginx one did not: it took any live pid, which `make fleet-stop` signals."""
    plan = plan_on_free_ports(tmp_path / "fleet", REPO_ROOT / "config.properties")
    frontdoor.make_certificate(plan)
    frontdoor.write_config(plan, RotationState())
    pid_files = {"nginx": plan.nginx_dir / "nginx.pid", "supervisord": plan.run_dir / "supervisord.pid",
                 "java": plan.replicas[0].run_dir / server.PID_FILE, "page": tmp_path / "demo" / demo.PID_FILE}
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for pid_file in pid_files.values():
            pid_file.parent.mkdir(parents=True, exist_ok=True)
            pid_file.write_text(f"{stranger.pid}\n")
        found = {"nginx": rotation.nginx_master(plan.nginx_dir), "supervisord": fleet_module.supervisord_process(plan),
                 "java": server.java_process(pid_files["java"]), "page": demo.running_pid(pid_files["page"].parent)}
        assert found == dict.fromkeys(pid_files), found
        assert our_process(pid_files["nginx"], "time.sleep(120)").pid == stranger.pid   # the same check, ours
        # In the foreground, as supervisord runs it: a daemonizing nginx would hold a captured pipe open.
        nginx = subprocess.Popen(frontdoor.nginx_command(plan.nginx_dir, "-g", "daemon off;"), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        master = wait_for(lambda: rotation.nginx_master(plan.nginx_dir), 10, what="nginx's master in its pid file")
        assert master.pid == nginx.pid != stranger.pid and master.pid == int(pid_files["nginx"].read_text())
    finally:
        if "nginx" in locals():
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(10)
        stranger.kill()
        stranger.wait()
    assert our_process(pid_files["nginx"], "time.sleep(120)") is None   # gone: a dead pid is never ours


# --- one real fleet for the rest ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(tmp_path_factory, archives) -> Fleet:
    plan = plan_on_free_ports(tmp_path_factory.mktemp("fleet"), REPO_ROOT / "config.properties",
                              origins=(LISTED_ORIGIN,), rate_limit_per_s=RATE_LIMIT,
                              trusted_proxies=(TRUSTED_PROXY,))
    fleet_module.start(plan, archives["first"])
    yield plan
    assert fleet_module.stop(plan)
    assert fleet_module.supervisord_process(plan) is None


@pytest.fixture(scope="module")
def digit_7(mnist_digits) -> bytes:
    return mnist_digits.png(next(index for index in range(100) if mnist_digits.label(index) == 7))


def front(fleet: Fleet, path: str = f"/predictions/{MODEL_NAME}") -> str:
    return f"{fleet.front_door.http_url}{path}"


def server_test(function):
    """A test of the real fleet: it starts real servers and needs the trained model."""
    return pytest.mark.slow(pytest.mark.server(function))


@server_test
def test_front_door_answers_a_7_with_its_model_version_rest_and_v2(fleet, digit_7, archives):
    status, body = request(front(fleet), digit_7)
    answer = json.loads(body)
    assert status == 200 and answer["digit"] == 7, answer
    assert answer["model_version"] == manifest_version(archives["first"])
    v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(digit_7).decode()]}]}
    status, body = request(front(fleet, f"/v2/models/{MODEL_NAME}/infer"), json.dumps(v2).encode(),
                           headers={"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["model_version"] == manifest_version(archives["first"]), body


def served_workers(replica, version: str | None = None) -> int:
    path = f"/models/{MODEL_NAME}" + (f"/{version}" if version else "")
    return len(replicas_module.management_call(replica, path)[0]["workers"])


@server_test
def test_each_replica_runs_its_share_of_the_cores_in_workers(fleet):
    """Two replicas on a 2-core machine ran 2 workers each (the archive's count) before."""
    assert [served_workers(replica) for replica in fleet.replicas] == [fleet.workers_per_replica] * 2
    assert fleet.workers_per_replica == max(1, len(os.sched_getaffinity(0)) // 2)


@server_test
def test_status_prints_the_issues_json_shape(fleet, archives):
    shown = subprocess.run([sys.executable, "-m", "serving.fleet", "status", "--run-dir", fleet.run_dir],
                           cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["front_door"]["http"] == fleet.front_door.http_url
    assert [set(r) for r in status["replicas"]] == \
        [{"name", "inference", "management", "java_pid", "model_version", "ready"}] * 2
    assert all(r["ready"] and r["java_pid"] and r["model_version"] == manifest_version(archives["first"])
               for r in status["replicas"]), status


@server_test
@pytest.mark.parametrize("path", CLOSED_PATHS)
def test_management_metrics_workflow_paths_are_404_json(fleet, path):
    for method, data in (("GET", None), ("POST", b"x")):
        status, body = request(front(fleet, path), data, method=method)
        assert status == 404 and json.loads(body)["code"] == "not_found", (method, path, body)


@server_test
def test_a_describe_header_gets_404_not_the_model_card(fleet, digit_7):
    status, body = request(front(fleet), digit_7,
                           headers={"Content-Type": "application/octet-stream", "describe": "True"})
    assert status == 404 and json.loads(body)["code"] == "not_found", body


@server_test
def test_only_the_fleets_own_rollout_can_register_a_model_on_a_replica(fleet, tmp_path):
    """Issue 27 point 1: TorchServe 0.12 loads any absolute directory holding MAR-INF/MANIFEST.json
    that a management call names (ModelArchive.downloadModel refuses only `..`), and any local user
    reaches loopback. Every fleet replica runs token auth: without the management key (in its
    0600 key_file.json) the call is refused and nothing runs; the rollout (with it) still works
    (test_a_rollout_under_load_loses_no_request_and_rollback_returns)."""
    evil, ran = tmp_path / "evil", tmp_path / "handler-ran"
    (evil / "MAR-INF").mkdir(parents=True)
    (evil / "evil_handler.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n"
                                          "def handle(data, context):\n    return ['ran'] * len(data or [])\n")
    (evil / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({
        "runtime": "python", "archiverVersion": "0.12.0",
        "model": {"modelName": "evil", "handler": "evil_handler.py", "modelVersion": "1.0"}}))
    replica = fleet.replicas[0]
    query = urllib.parse.urlencode({"url": str(evil), "model_name": "evil", "initial_workers": 1, "synchronous": "true"})
    status, body = request(f"{replica.management_url}/models?{query}", b"", method="POST")
    assert status == 400 and b"InvalidKeyException" in body, (status, body[:300])
    assert (replica.key_file.stat().st_mode & 0o777) == 0o600
    models = replicas_module.management_call(replica, "/models")["models"]
    assert [model["modelName"] for model in models] == [MODEL_NAME] and not ran.exists()


def test_the_key_owner_record_is_private(tmp_path):
    """Issue 27 point 12: key_file.owner holds an unsalted hash of the never-expiring API key."""
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"API": {"key": "an-api-key"}}))
    keys.record_key_file(tmp_path, key_file)
    assert ((tmp_path / keys.KEY_OWNER).stat().st_mode & 0o777) == 0o600


def nginx_workers_running(fleet) -> list[psutil.Process]:
    """The front door's nginx workers: the children of the master its pid file names."""
    return psutil.Process(int((fleet.nginx_dir / "nginx.pid").read_text())).children()


@server_test
def test_the_front_door_runs_one_nginx_worker_per_sixteen_cores_ahead_of_the_replicas(fleet):
    """Issue 27, the front door's cost: nginx's `auto` ran one worker per core, each splitting the
    clients and waking apart from the other, on the cores the replicas' workers use: the replicas'
    batches closed early (docs/fleet.md). One worker per 16 cores, forwarding
    ahead of the replicas' workers (a higher priority, where root may give it)."""
    assert [nginx_workers(cores) for cores in (1, 2, 15, 16, 32, 64)] == [1, 1, 1, 1, 2, 4]
    workers = nginx_workers_running(fleet)
    assert len(workers) == nginx_workers() == max(1, len(os.sched_getaffinity(0)) // 16)
    if os.geteuid() == 0:   # CI runs as root; lowering a priority needs it
        assert {worker.nice() for worker in workers} == {NGINX_PRIORITY}


@server_test
def test_the_front_door_bench_counts_the_cpu_of_every_process_of_the_fleet(fleet):
    """benchmarks/front_door.py charges each row's CPU to nginx, TorchServe's Java and its workers
    by walking the fleet's process tree: a kind it missed would read 0 ms a request, and the
    breakdown in benchmarks/RESULTS.md would put the front door's cost in the wrong place."""
    found = front_door_bench.fleet_processes(fleet)
    assert len(found["nginx"]) == 1 + nginx_workers()   # the master and its workers
    assert len(found["TorchServe Java"]) == len(fleet.replicas)
    assert len(found["TorchServe workers"]) == len(fleet.replicas) * fleet.workers_per_replica
    sample = front_door_bench.cpu_sample(fleet)
    assert all(sample.seconds[kind] > 0 for kind in ("TorchServe Java", "TorchServe workers")), sample
    assert 0 < sample.idle_s < sample.machine_s


@server_test
def test_the_access_log_is_not_world_readable(fleet):
    """Issue 27 point 12: nginx's access log (client addresses and paths) is 0640, not 0644."""
    assert ((fleet.nginx_dir / frontdoor.ACCESS_LOG).stat().st_mode & 0o777) == frontdoor.ACCESS_LOG_MODE == 0o640


def torchserve_access_log(replica) -> str:
    path = replica.run_dir / "logs" / "access_log.log"
    return path.read_text(errors="replace") if path.exists() else ""


@server_test
def test_a_key_hop_refuses_a_request_without_the_front_doors_secret(fleet, digit_7):
    """Issue 27 point 11: a key hop added the replica's key to any request on its paths from
    anyone who reached it (any local process; in a pod, anyone the NetworkPolicy lets in). It asks
    for the fleet's secret header now, which the front door alone sends: without it, or with a
    wrong one, 403 JSON from the hop and TorchServe never sees the request (its access log holds
    no trace of it); with it, the hop answers, and the front door still does. The secret is in a
    0600 file of the fleet's run dir and in no other file there."""
    replica = fleet.replicas[0]
    hop = f"http://127.0.0.1:{replica.ports.key_hop}/predictions/{MODEL_NAME}"
    refused = f"refused-{os.getpid()}-{time.monotonic_ns()}"
    for headers in ({}, {HOP_SECRET_HEADER: "0" * 64}, {HOP_SECRET_HEADER: ""}):
        status, body = request(f"{hop}?marker={refused}", digit_7,
                               headers={"Content-Type": "application/octet-stream", **headers})
        assert status == 403 and json.loads(body)["code"] == "forbidden", (headers, status, body[:200])
    secret_file = fleet.nginx_dir / frontdoor.HOP_SECRET_FILE
    assert (secret_file.stat().st_mode & 0o777) == 0o600
    secret = frontdoor.read_hop_secret(secret_file)
    answered = f"answered-{os.getpid()}-{time.monotonic_ns()}"
    status, body = request(f"{hop}?marker={answered}", digit_7,
                           headers={"Content-Type": "application/octet-stream", HOP_SECRET_HEADER: secret})
    assert status == 200 and json.loads(body)["digit"] == 7, body[:200]
    status, body = request(front(fleet), digit_7)   # the front door sends it
    assert status == 200 and json.loads(body)["digit"] == 7, body[:200]
    # The access log shows the query: the answered request is there (so the refused ones could be).
    wait_for(lambda: answered in torchserve_access_log(replica), 10, 0.2, "the answered request in the access log")
    assert refused not in torchserve_access_log(replica)
    assert request(f"http://127.0.0.1:{replica.ports.key_hop}/ping", method="GET")[0] == 200   # the kubelet's probe
    holders = [path for path in fleet.run_dir.rglob("*") if path != secret_file and "model_store" not in path.parts
               and secret.encode() in file_bytes(path)]
    assert holders == [], holders


def file_bytes(path: Path) -> bytes:
    """A regular file's bytes; nothing for anything else, or a file gone since it was listed."""
    try:
        return path.read_bytes() if path.is_file() else b""
    except OSError:
        return b""


def raw_request(port: int, target: str, headers: list[tuple[str, str]], body: bytes = b"",
                source: str = "127.0.0.1") -> tuple[int, bytes]:
    """One request with the request line and headers exactly as given (repeats kept)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        connection.putrequest("POST", target, skip_host=True, skip_accept_encoding=True)
        for name, value in [("Host", f"127.0.0.1:{port}"), *headers, ("Content-Length", str(len(body)))]:
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@server_test
@pytest.mark.parametrize("target", ["/ping/../predictions/mnist", f"/predictions/evil/1.0/../../{MODEL_NAME}",
                                    f"/predictions/%2e%2e/predictions/{MODEL_NAME}", f"//predictions/{MODEL_NAME}",
                                    f"/models%2f..%2fpredictions/{MODEL_NAME}", f"/predictions/./{MODEL_NAME}"])
def test_a_path_with_dot_or_empty_segments_is_refused_not_forwarded_raw(fleet, digit_7, target):
    """Issue 27 point 6: nginx matches the allowlist on the normalized path but would forward the
    raw one (`/ping/../predictions/mnist` reached TorchServe's /ping): such paths get 400 JSON."""
    status, body = raw_request(fleet.front_door.http_port, target, [("Content-Type", "application/octet-stream")],
                               digit_7)
    assert status == 400 and json.loads(body)["code"] == "bad_request", (target, status, body[:200])


@server_test
def test_describe_and_explain_headers_from_a_client_never_reach_a_replica(fleet, digit_7):
    """Issue 27 point 8: nginx's `if` sees the first describe header, TorchServe keeps the last;
    an Explain header turns a prediction into an explanation. The front door strips both."""
    plain = json.loads(request(front(fleet), digit_7)[1])
    for headers in ([("describe", ""), ("Describe", "True")], [("Explain", "True")], [("EXPLAIN", "true")]):
        status, body = raw_request(fleet.front_door.http_port, f"/predictions/{MODEL_NAME}",
                                   [("Content-Type", "application/octet-stream"), *headers], digit_7)
        answer = json.loads(body)
        assert status == 200 and set(answer) == set(plain) and answer["digit"] == 7, (headers, body[:300])


def closed_connections(ports: set[int]) -> int:
    """TCP sockets in TIME_WAIT with either end on one of ports (/proc/net/tcp*: state 06): what a
    connection opened for one request and closed leaves behind for a minute."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, remote, state = line.split()[1:4]
            if state == "06" and {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)} & ports:
                count += 1
    return count


@server_test
def test_the_front_door_keeps_its_connections_to_hops_and_replicas_alive(fleet, digit_7):
    """Issue 27 (the front door must be cheap): a connection per request to each key hop and from
    each hop to its replica cost a third of the front door's throughput. 30 requests one after
    another leave (nearly) no closed connection on the hops' or the replicas' ports."""
    ports = {port for replica in fleet.replicas for port in (replica.ports.key_hop, replica.ports.inference)}
    before = closed_connections(ports)
    client = http.client.HTTPConnection("127.0.0.1", fleet.front_door.http_port, timeout=30)
    try:
        for _ in range(30):
            client.request("POST", f"/predictions/{MODEL_NAME}", digit_7, {"Content-Type": "application/octet-stream"})
            response = client.getresponse()
            assert response.status == 200 and json.loads(response.read())["digit"] == 7
    finally:
        client.close()
    assert closed_connections(ports) - before <= 4


@server_test
def test_each_request_is_logged_once_by_the_front_door_not_again_by_its_hop(fleet, digit_7):
    """The key hops log nothing: the front door's line names the hop (so the replica) that answered.
    A second line per request, from the hop, cost a write each (the log is buffered: flushed within 1 s)."""
    log = fleet.nginx_dir / frontdoor.ACCESS_LOG
    lines = lambda: log.read_text().count(f"POST /predictions/{MODEL_NAME} ")
    time.sleep(1.5)   # earlier tests' lines flushed
    before = lines()
    for _ in range(5):
        assert request(front(fleet), digit_7)[0] == 200
    wait_for(lambda: lines() >= before + 5, 10, 0.2, "five lines in the access log")
    time.sleep(1.5)   # past the flush: a hop's lines would be there too
    assert lines() == before + 5


@server_test
def test_idle_connections_from_one_address_leave_the_door_open_to_another(fleet, digit_7):
    """Issue 27 point 4: more idle connections from 127.0.0.1 than the per-address limit and than
    the old worker_connections (1,024); a client on 127.0.0.2 (loopback too) is still answered,
    and the idle ones are closed after the header timeout."""
    idle = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", fleet.front_door.http_port), timeout=10)
            sock.sendall(b"POST /predictions/mnist HTTP/1.1\r\n")   # a header never finished
            idle.append(sock)
        status, body = raw_request(fleet.front_door.http_port, f"/predictions/{MODEL_NAME}",
                                   [("Content-Type", "application/octet-stream")], digit_7, source="127.0.0.2")
        assert status == 200 and json.loads(body)["digit"] == 7, (status, body[:200])
        idle[0].settimeout(CLIENT_TIMEOUT_S + 20)   # the oldest: closed (reset) by client_header_timeout
        try:
            assert idle[0].recv(1024) == b""
        except ConnectionResetError:
            pass
    finally:
        for sock in idle:
            sock.close()


def spooling(port: int, source: str, length: int = 1_000_000) -> socket.socket:
    """A request whose large body is still arriving: header and its first KiB sent, the rest never."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(f"POST /predictions/{MODEL_NAME} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n".encode() + bytes(1024))
    return sock


@server_test
def test_large_bodies_in_progress_are_capped_per_address_and_in_all(fleet, digit_7):
    """Issue 27 point 5: nginx spools every body past 16 KiB to its temp files until the answer; in
    a pod those fill the nginx-tmp emptyDir, and one address holding its 64 requests with 4 MiB
    bodies filled its 256 MiB and had the pod evicted. Bodies of SPOOLED_BODY_BYTES or more count:
    SPOOLED_BODIES_PER_ADDRESS per address, ReplicaConfig.spooled_bodies in all; past either, 429 JSON, while
    a small body from the same address is still answered."""
    port = fleet.front_door.http_port
    large = encode(Image.open(io.BytesIO(digit_7)).convert("RGB").resize((80, 80)), "BMP")   # a digit, as a body over SPOOLED_BODY_BYTES
    assert len(large) >= SPOOLED_BODY_BYTES > len(digit_7)
    send = lambda body, source: raw_request(port, f"/predictions/{MODEL_NAME}",
                                            [("Content-Type", "application/octet-stream")], body, source=source)
    total = fleet.config.spooled_bodies
    sources = [f"127.0.0.{20 + index}" for index in range(math.ceil(total / SPOOLED_BODIES_PER_ADDRESS) + 1)]
    held = []
    try:
        held += [spooling(port, sources[0]) for _ in range(SPOOLED_BODIES_PER_ADDRESS)]
        time.sleep(0.5)
        status, body = send(large, sources[0])
        assert status == 429 and json.loads(body)["code"] == "rate_limited", (status, body[:200])
        assert send(digit_7, sources[0])[0] == 200      # small bodies are not counted
        assert send(large, sources[1])[0] == 200        # another address still sends large ones
        for source in sources[1:]:                       # fill the front door's spool from other addresses
            held += [spooling(port, source) for _ in range(min(SPOOLED_BODIES_PER_ADDRESS, total - len(held)))]
        time.sleep(0.5)
        assert len(held) == total
        assert send(large, sources[-1])[0] == 429
        assert send(digit_7, sources[-1])[0] == 200
    finally:
        for sock in held:
            sock.close()


def cors_headers(url: str, origin: str, image: bytes, key: str | None = None) -> dict:
    headers = {"Origin": origin, "Content-Type": "application/octet-stream"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    sent = urllib.request.Request(url, data=image, method="POST", headers=headers)
    with urllib.request.urlopen(sent, timeout=30) as response:
        assert "digit" in json.loads(response.read())
        return {key.lower(): value for key, value in response.headers.items()}


@server_test
def test_only_a_listed_origin_is_echoed_and_torchserves_own_is_hidden(fleet, digit_7):
    listed = cors_headers(front(fleet), LISTED_ORIGIN, digit_7)
    assert listed["access-control-allow-origin"] == LISTED_ORIGIN and listed["vary"] == "Origin"
    assert "access-control-allow-origin" not in cors_headers(front(fleet), "http://evil.example", digit_7)
    # A replica sends no CORS header (its config allows no origin: TorchServe would send its one
    # origin, the demo page's, on every port; issue 27 point 15)...
    replica_origin = read_properties(REPO_ROOT / "config.properties")["cors_allowed_origin"]
    direct = cors_headers(f"{fleet.replicas[0].inference_url}/predictions/{MODEL_NAME}", replica_origin, digit_7,
                          key=inference_key(fleet.replicas[0].key_file))
    assert "access-control-allow-origin" not in direct
    # ...and the front door's list alone decides: the demo page's origin is not on it.
    assert "access-control-allow-origin" not in cors_headers(front(fleet), replica_origin, digit_7)


@server_test
def test_an_oversize_body_is_413_json_at_the_proxy(fleet):
    status, body = request(front(fleet), b"\0" * (fleet.config.max_body_bytes + 1))
    assert status == 413 and json.loads(body)["code"] == "too_large", body
    # Refused by nginx, no replica saw it (logged once nginx has drained the rest of the upload).
    logged = wait_for(lambda: [line for line in (fleet.nginx_dir / "access.log").read_text().splitlines()
                               if '" 413 ' in line], 30, what="the 413 in nginx's access log")
    assert "upstream=- " in logged[-1], logged


@server_test
def test_tls_is_verified_against_the_generated_certificate(fleet, digit_7):
    verified = ssl.create_default_context(cafile=str(fleet.tls_dir / "cert.pem"))
    sent = urllib.request.Request(front(fleet).replace(fleet.front_door.http_url, fleet.front_door.https_url),
                                  data=digit_7, method="POST", headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(sent, timeout=30, context=verified) as response:
        assert json.loads(response.read())["digit"] == 7
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(sent, timeout=30, context=ssl.create_default_context())   # the system's CAs


@server_test
def test_tls_is_forward_secret_with_hsts_and_the_page_has_its_headers(fleet, digit_7):
    """Issue 27 point 9: TLS 1.2 without forward secrecy (AES128-SHA) is refused; answers over TLS
    carry HSTS; the page is never framed, sniffed or sent anywhere but its own origin."""
    cert = fleet.tls_dir / "cert.pem"
    weak = ssl.create_default_context(cafile=str(cert))
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("AES128-SHA")
    with pytest.raises(ssl.SSLError):
        with socket.create_connection(("127.0.0.1", fleet.front_door.tls_port), timeout=10) as sock:
            weak.wrap_socket(sock, server_hostname="127.0.0.1")
    context = ssl.create_default_context(cafile=str(cert))
    sent = urllib.request.Request(f"{fleet.front_door.https_url}/predictions/{MODEL_NAME}", data=digit_7,
                                  headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(sent, timeout=30, context=context) as response:
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    with urllib.request.urlopen(f"{fleet.front_door.http_url}/index.html", timeout=30) as page:
        headers = page.headers
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer"
    assert headers["Strict-Transport-Security"] is None   # plain HTTP: HSTS means nothing there


@server_test
def test_over_the_rate_limit_the_answer_is_429_json_with_retry_after(fleet):
    # Twice the limit and its burst at once, from this one address: the excess is refused, fast,
    # by nginx (an empty body would be a replica's 400; a 429 never reaches a replica).
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: raw_answer(front(fleet)), range(4 * RATE_LIMIT)))
    limited = [answer for answer in answers if answer[0] == 429]
    assert limited, f"no 429 among {sorted({a[0] for a in answers})}"
    status, headers, body = limited[0]
    assert json.loads(body)["code"] == "rate_limited" and headers["Retry-After"] == "1"
    assert headers["Content-Type"] == "application/json"
    time.sleep(2)   # the bucket drains before the next test's load


def json_post(port: int, path: str, body: dict, source: str) -> tuple[int, float]:
    """(status, seconds) of one JSON POST from the loopback address source (0: no answer in 30 s)."""
    started = time.monotonic()
    try:
        status, _ = raw_request(port, path, [("Content-Type", "application/json")], json.dumps(body).encode(), source)
    except OSError:
        status = 0
    return status, time.monotonic() - started


@server_test
def test_a_client_flooding_explanations_leaves_another_clients_predictions_fast(fleet, mnist_digits):
    """Issue 27 point 3: client A (127.0.0.1) sends explanations of 4 images (the most one may
    hold) at half its request allowance, RATE_LIMIT / 2 a second, without waiting for answers,
    while client B (127.0.0.2) sends predictions. An explanation costs hundreds of predictions:
    under one rate limit for every path, A's explanations filled the replicas' queues and B waited
    for seconds. With explanations' own allowance, B gets no failure and its p95 stays under 1 s."""
    images = [base64.b64encode(mnist_digits.png(index)).decode() for index in range(4)]
    port, stop, flooded = fleet.front_door.http_port, threading.Event(), Counter()

    def explain() -> None:
        flooded[json_post(port, f"/explanations/{MODEL_NAME}", {"images": images}, "127.0.0.1")[0]] += 1

    def flood(pool: ThreadPoolExecutor) -> None:
        while not stop.wait(2 / RATE_LIMIT):
            pool.submit(explain)

    with ThreadPoolExecutor(CONNECTIONS_PER_ADDRESS // 2) as pool:
        flooder = threading.Thread(target=flood, args=(pool,), daemon=True)
        flooder.start()
        try:
            time.sleep(2)   # A's flood under way
            answers, deadline = [], time.monotonic() + B_REQUESTS   # bounded: a starved B stops early
            while len(answers) < B_REQUESTS and time.monotonic() < deadline and not stop.wait(0.2):
                answers.append(json_post(port, f"/predictions/{MODEL_NAME}", {"images": images[:1]}, "127.0.0.2"))
        finally:
            stop.set()
            flooder.join(10)
            pool.shutdown(cancel_futures=True)
    latencies = sorted(seconds for _, seconds in answers)
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"client B: {len(answers)} predictions, p95 {p95:.2f} s; client A's explanations: {dict(flooded)}")
    assert flooded[200], f"A's explanations were never served: {flooded}"
    assert [status for status, _ in answers] == [200] * B_REQUESTS and p95 < 1.0, \
        (f"p95 {p95:.2f} s", Counter(status for status, _ in answers), flooded)
    time.sleep(2)   # the buckets drain before the next test


def burst(port: int, target: str, source: str, headers: list[tuple[str, str]] = (), times: int = 0) -> Counter:
    """The statuses of `times` (4 x RATE_LIMIT) bodiless POSTs to target from source, 8 at a time."""
    with ThreadPoolExecutor(8) as pool:
        return Counter(pool.map(lambda _: raw_request(port, target, list(headers), b"", source)[0],
                                range(times or 4 * RATE_LIMIT)))


@server_test
def test_guessing_paths_spends_the_rate_limit(fleet):
    """Issue 27 point 5: a path off the allowlist was answered 404 in nginx's rewrite phase,
    before limit_req ran, so path (and key) guessing was unlimited. Now it is denied in the
    access phase, after the limit counted it: past the burst, 429."""
    statuses = burst(fleet.front_door.http_port, "/models", "127.0.0.3")
    assert statuses[429] and statuses[404] and set(statuses) == {404, 429}, statuses
    status, body = raw_request(fleet.front_door.http_port, "/models", [], b"", "127.0.0.4")
    assert status == 404 and json.loads(body)["code"] == "not_found", body


@server_test
def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit(fleet):
    """Issue 27 point 10: behind an Ingress every client arrives from the proxy's address. The
    fleet here trusts 127.0.0.2 (TRUSTED_PROXY): the X-Forwarded-For it sends names the client
    the limit counts. From any other address the header is ignored (off by default)."""
    port = fleet.front_door.http_port
    flooded = burst(port, "/models", TRUSTED_PROXY, [("X-Forwarded-For", "198.51.100.1")])
    assert flooded[429], flooded
    status, _ = raw_request(port, "/models", [("X-Forwarded-For", "198.51.100.2")], b"", TRUSTED_PROXY)
    assert status == 404, f"another client behind the proxy got {status}: one bucket for all"
    with ThreadPoolExecutor(8) as pool:   # not trusted: a header per request changes nothing
        spoofed = Counter(pool.map(lambda i: raw_request(port, "/models", [("X-Forwarded-For", f"198.51.100.{i % 250}")],
                                                         b"", "127.0.0.5")[0], range(4 * RATE_LIMIT)))
    assert spoofed[429], spoofed
    time.sleep(2)


@server_test
def test_the_root_never_reflects_the_clients_host_into_the_pages_server(fleet):
    """Issue 27 point 9: `/` redirected to `?server=$scheme://$http_host`, so a forged Host
    named any server. It names this origin relatively now."""
    connection = http.client.HTTPConnection("127.0.0.1", fleet.front_door.http_port, timeout=30)
    try:
        connection.request("GET", "/", headers={"Host": "drawings.example"})
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 302 and response.getheader("Location") == "/index.html?server=/", \
        (response.status, response.getheader("Location"))


@server_test
def test_a_replica_sends_no_cors_header_on_any_port(fleet):
    """Issue 27 point 15: TorchServe 0.12 sends its one cors_allowed_origin on every port, so the
    demo page's origin (config.properties' http://127.0.0.1:8000) could read a replica's metrics
    and management answers. Fleet replicas allow no origin; the front door sends its own list."""
    origin = read_properties(REPO_ROOT / "config.properties")["cors_allowed_origin"]
    replica = fleet.replicas[0]
    for url in (f"http://127.0.0.1:{replica.ports.metrics}/metrics", f"{replica.management_url}/models",
                f"{replica.inference_url}/ping"):
        try:   # management and inference want a key (token auth): a 401 carried the origin too
            with urllib.request.urlopen(urllib.request.Request(url, headers={"Origin": origin}), timeout=30) as answer:
                headers = answer.headers
        except urllib.error.HTTPError as error:
            headers = error.headers
        assert headers.get("Access-Control-Allow-Origin") is None, (url, headers.get("Access-Control-Allow-Origin"))


def raw_answer(url: str) -> tuple[int, dict, bytes]:
    sent = urllib.request.Request(url, data=b"", method="POST", headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(sent, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# --- faults under bounded load ----------------------------------------------------------------------
def answered_by(fleet: Fleet, port: int, after_offset: int) -> bool:
    """nginx's access log shows a 200 from the upstream on port (a replica's key hop) since after_offset."""
    with open(fleet.nginx_dir / "access.log", "rb") as log:
        log.seek(after_offset)
        return any(f"upstream=127.0.0.1:{port} upstream_status=200" in line
                   for line in log.read().decode(errors="replace").splitlines())


@server_test
def test_a_killed_replica_loses_no_request_and_comes_back_into_rotation(fleet, digit_7):
    victim = fleet.replicas[0]
    killed = replicas_module.replica_status(victim)["java_pid"]
    with PacedLoad(predictions(fleet.front_door.http_url), digit_7, **LOAD) as load:
        time.sleep(2)
        os.kill(killed, signal.SIGKILL)
        back = wait_for(lambda: (s := replicas_module.replica_status(victim))["ready"] and s["java_pid"] != killed and s,
                        240, what=f"{victim.name} restarted by supervisord")
        offset = (fleet.nginx_dir / "access.log").stat().st_size
        wait_for(lambda: answered_by(fleet, victim.ports.key_hop, offset), 60,
                 what=f"nginx sending {victim.name} traffic again")
    report = load.report
    print(f"killed {victim.name}'s Java (pid {killed}); back as pid {back['java_pid']}; {report.sent} requests: "
          f"{dict(report.statuses)}")
    assert report.statuses == {200: report.sent} and report.sent > 50, report.failures[:5]


def fleet_cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.fleet", *args, "--run-dir", str(fleet.run_dir)],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)


def served_versions(fleet: Fleet) -> list[str]:
    return [replica["model_version"] for replica in fleet_module.status(fleet)["replicas"]]


@server_test
def test_rollout_refuses_the_version_already_served_in_one_line(fleet, archives):
    again = fleet_cli(fleet, "rollout", str(archives["first"]))
    assert again.returncode == 1 and "already the one served" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1


@server_test
def test_a_rollout_under_load_loses_no_request_and_rollback_returns(fleet, digit_7, archives, exported,
                                                                   tmp_path):
    first = manifest_version(archives["first"])
    # Kept-alive clients too: a reload of nginx mid-rollout would close their idle connections
    # under their next request (9 of 2,501 lost, before rollouts stopped reloading nginx).
    with PacedLoad(predictions(fleet.front_door.http_url), digit_7, **LOAD) as load, \
            PacedLoad(predictions(fleet.front_door.http_url), digit_7, **LOAD, keep_alive=True) as kept:
        rolled = fleet_cli(fleet, "rollout", str(archives["new"]))
        time.sleep(1)   # answers after the rollout, seen by the load
    assert rolled.returncode == 0, rolled.stderr
    assert rolled.stdout.strip() == f"rolled out {NEW_VERSION} on replica-0, replica-1 (previous: {first})"
    for report in (load.report, kept.report):
        print(f"rollout under load: {report.sent} requests: {dict(report.statuses)}")
        assert report.statuses == {200: report.sent} and report.sent > 20, report.failures[:5]
        assert report.versions[0] == first and report.versions[-1] == NEW_VERSION   # clients saw the switch
    assert served_versions(fleet) == [NEW_VERSION, NEW_VERSION]
    assert json.loads(request(front(fleet), digit_7)[1])["model_version"] == NEW_VERSION
    for replica in fleet.replicas:   # a restarted replica loads the version it serves now
        assert read_properties(replica.config)["load_models"] == f"{MODEL_NAME}={MODEL_NAME}-{NEW_VERSION}.mar"

    with PacedLoad(predictions(fleet.front_door.http_url), digit_7, **LOAD, keep_alive=True) as load:
        back = fleet_cli(fleet, "rollout", "--rollback")
    assert back.returncode == 0, back.stderr
    assert load.report.statuses == {200: load.report.sent}, load.report.failures[:5]
    assert served_versions(fleet) == [first, first]
    assert json.loads(request(front(fleet), digit_7)[1])["model_version"] == first
    # A second rollback has nothing older to return to: refused, not a roll forward.
    again = fleet_cli(fleet, "rollout", "--rollback")
    assert again.returncode == 1 and "nothing to roll back to" in again.stderr, again
    assert len(again.stderr.strip().splitlines()) == 1 and served_versions(fleet) == [first, first]

    # `make fleet` again: the fleet is up, exit 0; with a newer archive built, it rolls it out.
    # The one before the previous is unregistered (its workers freed), the previous one stays.
    third = build_archive(exported / TORCHSCRIPT_NAME, tmp_path / "v3", force=True, version="3.0")
    newer = fleet_cli(fleet, "start", "--archive", str(third))
    assert newer.returncode == 0 and "rolling it out" in newer.stdout, newer
    assert served_versions(fleet) == ["3.0", "3.0"]
    assert [replicas_module.registered_versions(replica) for replica in fleet.replicas] == [{first, "3.0"}] * 2
    # A version registered by a rollout runs the replica's share of the cores too.
    assert [served_workers(replica, "3.0") for replica in fleet.replicas] == [fleet.workers_per_replica] * 2
    same = fleet_cli(fleet, "start", "--archive", str(third))
    assert same.returncode == 0 and "already running" in same.stdout, same


# --- the production config: replicas keep their keys, nginx adds them, clients bring their own ----
CLIENT_KEY = "client-key-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed_fleet(tmp_path_factory, archives) -> Fleet:
    """A second fleet, on config.production.properties with keys that live 6 s (so the front
    door renews each replica's inference key every 1.5 s), asking its clients for an API key."""
    root = tmp_path_factory.mktemp("keyed")
    production = read_properties(REPO_ROOT / "config.production.properties")
    config = root / "short-keys.properties"
    config.write_text(set_properties((REPO_ROOT / "config.production.properties").read_text(), {
        "token_expiration_min": "0.1",
        "metrics_config": str(REPO_ROOT / production["metrics_config"])}))
    (root / "client-keys.txt").write_text(f"# allowed clients\n{CLIENT_KEY}\n")
    plan = plan_on_free_ports(root / "fleet", config, api_keys_file=root / "client-keys.txt")
    fleet_module.start(plan, archives["first"])
    yield plan
    assert fleet_module.stop(plan)


@server_test
def test_with_keys_nginx_adds_each_replicas_renewed_key_and_asks_clients_for_theirs(keyed_fleet, digit_7):
    direct = request(f"{keyed_fleet.replicas[0].inference_url}/predictions/{MODEL_NAME}", digit_7)
    assert direct[0] == 400 and b"InvalidKeyException" in direct[1]   # the replicas keep token auth
    status, body = request(front(keyed_fleet), digit_7)
    assert status == 401 and json.loads(body)["code"] == "unauthorized", body
    status, _ = request(front(keyed_fleet), digit_7,
                        headers={"Content-Type": "application/octet-stream", "X-API-Key": "not-" + CLIENT_KEY})
    assert status == 401
    before = {replica.name: inference_key(replica.key_file) for replica in keyed_fleet.replicas}
    with PacedLoad(predictions(keyed_fleet.front_door.http_url), digit_7, headers={"X-API-Key": CLIENT_KEY},
                   **LOAD) as load:
        time.sleep(8)
    report = load.report
    renewed = (keyed_fleet.run_dir / "logs" / "follow-keys.log").read_text().count("inference key out of rotation")
    print(f"keys renewed {renewed} times under load: {report.sent} requests: {dict(report.statuses)}")
    assert report.statuses == {200: report.sent} and report.sent > 50, report.failures[:5]
    assert renewed >= 2 and all(inference_key(r.key_file) != before[r.name] for r in keyed_fleet.replicas)


@server_test
def test_a_key_hop_forwards_only_the_front_doors_paths_and_strips_its_headers(keyed_fleet, digit_7):
    """Issue 27 point 11: a key hop added the replica's key to anything a local process sent it (in
    a pod: anyone who reaches it): the API description, a model card for a `describe` header, an
    explanation for `explain`. It forwards the front door's paths and the heartbeat alone now, with
    the front door's header stripping."""
    hop = f"http://127.0.0.1:{keyed_fleet.replicas[0].ports.key_hop}"
    secret = frontdoor.read_hop_secret(keyed_fleet.nginx_dir / frontdoor.HOP_SECRET_FILE)   # as the front door sends it

    def through_hop(path: str, data=None, headers=None, method="POST"):
        """This fleet renews each key every 1.5 s; the front door routes around a replica while its
        hop reloads, a direct caller may land in that window (TorchServe: 400 InvalidKey): again."""
        headers = {**(headers or ({"Content-Type": "application/octet-stream"} if data else {})), HOP_SECRET_HEADER: secret}
        for _ in range(20):
            status, body = request(f"{hop}{path}", data, method=method, headers=headers)
            if not (status == 400 and b"InvalidKeyException" in body):
                return status, body
            time.sleep(0.3)
        return status, body

    status, body = through_hop("/api-description", method="GET")
    assert status == 404 and json.loads(body)["code"] == "not_found", body
    status, body = through_hop(f"/predictions/{MODEL_NAME}/1.0", digit_7)
    assert status == 404, body
    assert through_hop("/ping", method="GET")[0] == 200
    for header in ("describe", "explain"):
        status, body = through_hop(f"/predictions/{MODEL_NAME}", digit_7,
                                   headers={"Content-Type": "application/octet-stream", header: "True"})
        assert status == 200 and json.loads(body)["digit"] == 7 and "attributions" not in json.loads(body), body


@server_test
def test_key_guessing_spends_the_rate_limit(keyed_fleet):
    """Issue 27 point 5: the key was checked with `return 401` in nginx's rewrite phase, before
    limit_req, so wrong keys were tried without limit. Checked in the access phase now (after the
    limit counted the request): past the burst, 429."""
    statuses = burst(keyed_fleet.front_door.http_port, f"/predictions/{MODEL_NAME}", "127.0.0.3",
                     [("X-API-Key", "guessed-0123456789abcdef")], times=4 * keyed_fleet.front_door.rate_limit_per_s)
    assert statuses[429] and statuses[401] and set(statuses) == {401, 429}, statuses


# --- the page -----------------------------------------------------------------------------------------
@pytest.mark.browser
@server_test
def test_the_page_from_the_front_door_gets_an_answer_with_no_cors(fleet):
    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail(f"no Chromium at {chromium}: run `make browser`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 760, "height": 560})
            page.goto(f"{fleet.front_door.http_url}/")
            page.wait_for_function("window.digitserve !== undefined")
            # `/` names this same origin as the page's server: no CORS involved.
            assert page.evaluate("window.digitserve.predictionsUrl") == predictions(fleet.front_door.http_url)
            box = page.locator("#canvas").bounding_box()
            page.mouse.move(box["x"] + 0.52 * box["width"], box["y"] + 0.15 * box["height"])
            page.mouse.down()
            page.mouse.move(box["x"] + 0.48 * box["width"], box["y"] + 0.85 * box["height"], steps=8)
            page.mouse.up()
            outcome = page.evaluate("window.digitserve.lastPrediction")   # the pen's release predicts
            assert outcome["ok"], outcome
            assert page.text_content("#answer").strip() == "1"
        finally:
            browser.close()


def test_a_fleet_under_a_directory_its_nginx_workers_cannot_enter_is_refused_in_one_line(tmp_path):
    """Started as root, nginx's workers run as nobody and spool every body past 16 KiB under the
    fleet's run dir: below a 0700 directory (pytest's own, a home) each such body got a 500 while
    small ones passed. The fleet refuses to start there, naming the directory."""
    closed = tmp_path / "closed"
    plan = plan_on_free_ports(closed / "fleet", REPO_ROOT / "config.properties")
    closed.chmod(0o700)
    if os.geteuid() != 0:
        pytest.skip("only a root-started nginx hands its work to nobody")
    with pytest.raises(FrontDoorError, match=f"{closed} is closed to other users"):
        nginx_accepts(plan)
