"""A fleet on free loopback ports for tests, and bounded load through its front door."""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from serving.handler.artifact import MODEL_NAME
from serving.server.properties import free_ports
from serving.fleet import frontdoor
from serving.fleet.topology import Fleet, ReplicaPorts

PORTS_PER_REPLICA = len(ReplicaPorts.__dataclass_fields__)


def open_to_workers(run_dir: Path) -> None:
    """o+x (enter, not list) on run_dir's parents that lack it, as the fleet asks (frontdoor.closed_parent)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    while (closed := frontdoor.closed_parent(Path(run_dir) / "x")) is not None:
        closed.chmod(closed.stat().st_mode | 0o001)


def plan_on_free_ports(run_dir: Path, base_config: Path, replicas: int = 2, **front_door) -> Fleet:
    """A fleet whose every port is free now (never the default 8088/8443/9080...), in a run dir
    nginx's workers (nobody) may enter: pytest's temp dirs are closed to other users (0700)."""
    open_to_workers(run_dir)
    ports = free_ports(replicas * PORTS_PER_REPLICA + 2)
    replica_ports = [ReplicaPorts(*ports[i * PORTS_PER_REPLICA:(i + 1) * PORTS_PER_REPLICA]) for i in range(replicas)]
    return Fleet.plan(replicas, run_dir, base_config, replica_ports=replica_ports,
                      http_port=ports[-2], tls_port=ports[-1], **front_door)


@dataclass
class LoadReport:
    statuses: Counter = field(default_factory=Counter)
    versions: list[str] = field(default_factory=list)    # model_version of each answer, in order
    failures: list[str] = field(default_factory=list)    # what went wrong, for the assertion message

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())


class PacedLoad:
    """`clients` threads POSTing an image to url, each at most `per_client_rps` requests a second
    (bounded: under the front door's rate limit), until stopped. Every answer is recorded.
    keep_alive: each client keeps one connection (http.client, which never retries a POST) for
    all its requests, as browsers and SDKs do; else a new connection per request."""

    def __init__(self, url: str, image: bytes, clients: int = 4, per_client_rps: float = 5.0,
                 headers: dict[str, str] | None = None, keep_alive: bool = False):
        self.url, self.image, self.interval_s, self.keep_alive = url, image, 1.0 / per_client_rps, keep_alive
        self.headers = {"Content-Type": "application/octet-stream", **(headers or {})}
        self.report, self.lock, self.stopping = LoadReport(), threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> PacedLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(120)

    def client(self) -> None:
        target = urllib.parse.urlsplit(self.url)
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60) if self.keep_alive else None
        while not self.stopping.is_set():
            started = time.monotonic()
            self.record(*(self.send_kept(connection, target.path) if connection else self.send()))
            self.stopping.wait(max(0.0, self.interval_s - (time.monotonic() - started)))
        if connection:
            connection.close()

    def send_kept(self, connection: http.client.HTTPConnection, path: str) -> tuple[int, str | None, str | None]:
        """One request on the kept connection (http.client reopens it only after a response said
        close); a connection the server dropped under the request is that request lost."""
        try:
            connection.request("POST", path, body=self.image, headers=self.headers)
            response = connection.getresponse()
            body = response.read()
        except (http.client.HTTPException, OSError) as error:
            connection.close()   # the next request opens a new one
            return 0, None, repr(error)
        if response.status != 200:
            return response.status, None, body.decode(errors="replace")[:200]
        return 200, json.loads(body).get("model_version"), None

    def send(self) -> tuple[int, str | None, str | None]:
        request = urllib.request.Request(self.url, data=self.image, method="POST", headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read()).get("model_version"), None
        except urllib.error.HTTPError as error:
            return error.code, None, error.read().decode(errors="replace")[:200]
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            return 0, None, repr(error)

    def record(self, status: int, version: str | None, failure: str | None) -> None:
        with self.lock:
            self.report.statuses[status] += 1
            if version:
                self.report.versions.append(version)
            if failure:
                self.report.failures.append(f"{status}: {failure}")


def predictions(front_url: str) -> str:
    return f"{front_url}/predictions/{MODEL_NAME}"


def wait_for(condition, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(interval_s)
