"""The fleet's layout in one place: how many replicas, each one's name, ports, run directory and
config, the front door's ports and the paths it opens. Pure data: `python -m serving.fleet`
starts and stops processes from it, and other deployments (Kubernetes manifests) read the same
records. Nothing here starts a process or opens a socket.

    Fleet.plan(replicas=2)   # replica-0: inference 9080, management 9081, ... in .run/fleet/replica-0
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from serving.handler.artifact import ARCHIVE_NAME, MODEL_NAME
from serving.server.properties import read_properties, token_auth_enabled

DEFAULT_REPLICAS = 2
FLEET_DIR = Path(".run/fleet")
BASE_CONFIG = Path("config.properties")
# Replica i listens on REPLICA_BASE_PORT + PORT_STRIDE * i + the offset of each of its ports:
# clear of config.properties' own 8080-8082 and 7070-7071, so `make serve` can run beside.
REPLICA_BASE_PORT = 9080
PORT_STRIDE = 100   # replica-1 from 9180: 9090 is Prometheus' default (docs/operating.md runs one)
FRONT_ADDRESS = "127.0.0.1"
FRONT_HTTP_PORT = 8088
FRONT_TLS_PORT = 8443
# Requests per second per client address: generous for a person or a page, it only stops floods.
DEFAULT_RATE_LIMIT = 100
# Connections: every address may hold at most CONNECTIONS_PER_ADDRESS requests in progress at the
# front door (nginx limit_conn; a browser opens 6, a load test a few dozen); each nginx worker (one
# per core) holds WORKER_CONNECTIONS, so a flood of idle connections from one address (which
# limit_conn cannot see: it counts requests, once their header is read) does not fill the door
# before CLIENT_TIMEOUT_S closes them. Both the fleet and the Kubernetes front door render these.
CONNECTIONS_PER_ADDRESS = 64
WORKER_CONNECTIONS = 8192
# nginx workers: forwarding a prediction costs nginx a small fraction of what the replicas spend
# on it, so one worker keeps up with the replicas of CORES_PER_NGINX_WORKER cores. More workers on
# cores the replicas use only split the clients and add wake-ups: on 2 cores, nginx's `auto` (two)
# made the replicas' batches smaller and the front door dearer than one (docs/fleet.md).
CORES_PER_NGINX_WORKER = 16
# ... and it runs before them: woken by a request or an answer, it forwards at once instead of
# waiting out a worker's time slice; it uses a small share of the CPU, so it starves none.
# Lowering a priority needs root: a fleet started by another user keeps the default.
NGINX_PRIORITY = -10
# Bodies past nginx's client_body_buffer_size (16k) are spooled to its body temp files until the
# answer (a retry may need them); in a pod those fill the nginx-tmp emptyDir, whose limit evicts the
# pod. So every body of SPOOLED_BODY_BYTES or more (or of unknown length: chunked) counts against two
# caps: at most SPOOLED_BODIES_PER_ADDRESS per client address, and at most what fits in
# BODY_SPOOL_BYTES (the emptyDir's sizeLimit, deploy/objects.py) at max_request_size each, in all.
# Past either, 429; small bodies (a digit's PNG) are never counted.
SPOOLED_BODY_BYTES = 10_000      # five digits of Content-Length: the nginx map's pattern
SPOOLED_BODIES_PER_ADDRESS = 8
BODY_SPOOL_BYTES = 256 * 2 ** 20
CLIENT_TIMEOUT_S = 10       # to send a request's header, each piece of its body, or read an answer
KEEPALIVE_TIMEOUT_S = 15    # an idle kept-alive client connection
# What the front door forwards (nginx regexes, anchored); every other path answers 404:
# management (/models), metrics, workflows (/workflows, /wfpredict), the API description.
OPEN_PATHS = (f"/predictions/{MODEL_NAME}", f"/explanations/{MODEL_NAME}", f"/v2/models/{MODEL_NAME}/infer")
# What costs hundreds of predictions (an explanation: up to 4 images x explain.IG_STEPS forward and
# backward passes) gets its own, much lower allowance per client address, on top of the rate above:
# EXPLAIN_RATE_PER_S (a burst of EXPLAIN_BURST at once) and EXPLAIN_CONCURRENCY in progress; past
# either, 429. Enough for a person pressing "Why?"; a flood of them no longer fills the replicas'
# queues for everyone else. (No v2 explain route is open: OPEN_PATHS holds only v2 infer.)
EXPENSIVE_PATHS = (f"/explanations/{MODEL_NAME}",)
EXPLAIN_RATE_PER_S = 1
EXPLAIN_BURST = 2
EXPLAIN_CONCURRENCY = 1
# TorchServe's frontend heartbeat (the replica pod's liveness probe goes through its key hop).
HEARTBEAT_PATH = "/ping"
# A key hop forwards the front door's paths (OPEN_PATHS) with the replica's key only to a request
# carrying the fleet's secret in this header, which the front door alone adds (and the hop strips);
# the heartbeat without it (the kubelet probes it). Every other path answers 404 there too, so a
# local process (or, in a pod, anyone who reaches the hop) gets no prediction with the key at all.
HOP_SECRET_HEADER = "X-Hop-Secret"
# Paths the front door must refuse: what tests try, and what a deployment must not expose.
CLOSED_PATHS = ("/models", f"/models/{MODEL_NAME}", "/metrics", "/workflows", f"/wfpredict/{MODEL_NAME}",
                "/api-description", "/ping", f"/v2/models/{MODEL_NAME}", "/token")

FLEET_FILE = "fleet.json"   # in the fleet's run dir: the plan `start` used, read by the other commands


def share_of_cores(parts: int, cores: int | None = None) -> int:
    """The cores this process may use (or `cores`) divided into `parts`, at least one."""
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // parts)


def workers_per_replica(replicas: int, cores: int | None = None) -> int:
    """Single-threaded workers each replica runs: the cores shared by the replicas (at least one
    each). More workers than cores make each one's batches smaller and every request dearer, most
    of all behind the front door (docs/fleet.md)."""
    return share_of_cores(replicas, cores)


def nginx_workers(cores: int | None = None) -> int:
    """The front door's nginx worker processes: one per CORES_PER_NGINX_WORKER cores, at least one."""
    return share_of_cores(CORES_PER_NGINX_WORKER, cores)


class TopologyError(Exception):
    """A fleet that cannot be planned as asked; the message says why, in one line."""


@dataclass(frozen=True)
class ReplicaPorts:
    inference: int
    management: int
    metrics: int
    grpc_inference: int
    grpc_management: int
    initial_worker: int   # names its workers' sockets (in the replica's own TMPDIR)
    # With token auth on, nginx's hop to this replica that adds its key (loopback; see frontdoor.py).
    key_hop: int

    @classmethod
    def derived(cls, index: int, base_port: int = REPLICA_BASE_PORT) -> ReplicaPorts:
        first = base_port + PORT_STRIDE * index
        return cls(*range(first, first + len(fields(cls))))


@dataclass(frozen=True)
class ReplicaConfig:
    """What the fleet reads of its replicas' config.properties, parsed once (replica_config):
    the front door, the key hop and the Kubernetes generator take this record."""
    token_auth: bool
    max_body_bytes: int           # max_request_size, which the front door enforces first
    response_timeout_s: int       # default_response_timeout, which the front door waits a little longer than
    metrics_config: str | None    # absolute: a replica's own config lives in its run dir

    @property
    def spooled_bodies(self) -> int:
        """Large bodies the front door holds at once, in all: what fits in three quarters of
        BODY_SPOOL_BYTES at max_body_bytes each (a filesystem needs headroom)."""
        return max(1, BODY_SPOOL_BYTES * 3 // 4 // self.max_body_bytes)


def replica_config(properties: dict, directory: str | os.PathLike) -> ReplicaConfig:
    """properties: a config.properties's; directory: where its relative paths start."""
    metrics = properties.get("metrics_config")
    return ReplicaConfig(token_auth=token_auth_enabled(properties), max_body_bytes=int(properties["max_request_size"]),
                         response_timeout_s=int(properties.get("default_response_timeout", "120")),
                         metrics_config=os.path.abspath(os.path.join(directory, metrics)) if metrics else None)


@dataclass(frozen=True)
class Replica:
    name: str
    ports: ReplicaPorts
    run_dir: Path      # its config, model store, logs, pid file and key_file.json (its working dir)

    @property
    def config(self) -> Path:
        return self.run_dir / "config.properties"

    @property
    def model_store(self) -> Path:
        return self.run_dir / "model_store"

    @property
    def key_file(self) -> Path:
        return self.run_dir / "key_file.json"

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.management}"

    def settings(self, config: ReplicaConfig, workers: int, archive: str = ARCHIVE_NAME) -> dict[str, str]:
        """What this replica's config.properties changes in the project's config; workers: its
        share of the cores (workers_per_replica). The archive names no worker count, so TorchServe
        starts this many, and a rollout's registration through the management API does too."""
        settings = {"inference_address": self.inference_url, "management_address": self.management_url,
                    "default_workers_per_model": str(workers),
                    "metrics_address": f"http://127.0.0.1:{self.ports.metrics}",
                    "grpc_inference_port": str(self.ports.grpc_inference),
                    "grpc_management_port": str(self.ports.grpc_management),
                    "initial_worker_port": str(self.ports.initial_worker),
                    "model_store": str(self.model_store), "load_models": f"{MODEL_NAME}={archive}",
                    "workflow_store": str(self.run_dir / "empty-workflow-store"),
                    # A rollout registers the new archive through the management API, so it is
                    # on; and TorchServe 0.12 loads any absolute directory it is given there
                    # (ModelArchive.downloadModel refuses only `..`; allowed_urls is consulted
                    # only for URLs). Any local user reaches loopback: so every fleet replica
                    # runs token auth, whatever the base config says. The management key is in
                    # the replica's key_file.json (TorchServe writes it 0600): only the fleet's
                    # own user (its rollout) can register; the key hops add the inference key.
                    "enable_model_api": "true", "disable_token_authorization": "false"}
        # No CORS from the replicas: TorchServe 0.12 sends its one cors_allowed_origin on every
        # port (NettyUtils.sendHttpResponse), so a page on that origin could read a replica's
        # metrics and management answers. The front door sends its own list (FLEET_ORIGINS);
        # an empty value sends no header.
        settings.update({"cors_allowed_origin": "", "cors_allowed_methods": "", "cors_allowed_headers": ""})
        if config.metrics_config:   # relative paths resolve from the replica's run dir: anchored
            settings["metrics_config"] = config.metrics_config
        return settings

    def run_command(self) -> list[str]:
        """The replica in the foreground (`run` renews its keys too); its working dir is run_dir."""
        return [sys.executable, "-m", "serving.server", "run", "--config", str(self.config),
                "--run-dir", str(self.run_dir)]

    def probe_command(self) -> list[str]:
        """Exit 0 when the replica answers (run it in run_dir, where its key file is)."""
        return [sys.executable, "-m", "serving.server", "ready", "--config", str(self.config)]


@dataclass(frozen=True)
class FrontDoor:
    address: str = FRONT_ADDRESS
    http_port: int = FRONT_HTTP_PORT
    tls_port: int = FRONT_TLS_PORT
    rate_limit_per_s: int = DEFAULT_RATE_LIMIT
    origins: tuple[str, ...] = ()
    # Proxies (addresses or CIDR ranges, e.g. an Ingress's) whose X-Forwarded-For names the client
    # the rate and connection limits count; none (the default): the TCP peer is the client.
    trusted_proxies: tuple[str, ...] = ()
    api_keys_file: Path | None = None   # one allowed client key a line; None: no client key asked
    tls_cert: Path | None = None        # None: a self-signed one is made at first start
    tls_key: Path | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://{self.address}:{self.tls_port}"


@dataclass(frozen=True)
class Fleet:
    run_dir: Path
    base_config: Path             # the text each replica's config starts from
    replicas: tuple[Replica, ...]
    config: ReplicaConfig         # base_config parsed, once
    front_door: FrontDoor = field(default_factory=FrontDoor)
    workers_per_replica: int = 1  # Replica.settings; plan: the machine's cores / replicas

    @classmethod
    def plan(cls, replicas: int = DEFAULT_REPLICAS, run_dir: str | os.PathLike = FLEET_DIR,
             base_config: str | os.PathLike = BASE_CONFIG, base_port: int = REPLICA_BASE_PORT,
             replica_ports: list[ReplicaPorts] | None = None, config: ReplicaConfig | None = None,
             workers: int | None = None, **front_door) -> Fleet:
        """replicas named replica-0..N-1 on ports derived from base_port (or replica_ports, one
        record each: tests take free ports); config: base_config parsed (parsed here when not
        given); workers per replica (None: workers_per_replica); front_door: FrontDoor's fields."""
        if replicas < 1:
            raise TopologyError(f"a fleet needs at least one replica, not {replicas}")
        if workers is not None and workers < 1:
            raise TopologyError(f"a replica needs at least one worker, not {workers}")
        if replica_ports is not None and len(replica_ports) != replicas:
            raise TopologyError(f"{len(replica_ports)} port sets for {replicas} replicas")
        run_dir = Path(run_dir).resolve()
        ports = replica_ports or [ReplicaPorts.derived(index, base_port) for index in range(replicas)]
        members = tuple(Replica(f"replica-{index}", ports[index], run_dir / f"replica-{index}")
                        for index in range(replicas))
        base_config = Path(base_config).resolve()
        config = config or replica_config(read_properties(base_config), base_config.parent)
        config = replace(config, token_auth=True)   # every replica runs token auth (Replica.settings)
        return cls(run_dir, base_config, members, config, FrontDoor(**front_door),
                   workers or workers_per_replica(replicas))

    @property
    def token_auth(self) -> bool:
        return self.config.token_auth

    @property
    def nginx_dir(self) -> Path:
        return self.run_dir / "nginx"

    @property
    def tls_dir(self) -> Path:
        return self.run_dir / "tls"

    def replica(self, name: str) -> Replica:
        for replica in self.replicas:
            if replica.name == name:
                return replica
        raise TopologyError(f"no replica {name!r} in this fleet ({', '.join(r.name for r in self.replicas)})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Fleet:
        data = json.loads(text)
        paths = lambda record, keys: {**record, **{key: Path(record[key]) if record[key] else None for key in keys}}
        replicas = tuple(Replica(r["name"], ReplicaPorts(**r["ports"]), Path(r["run_dir"])) for r in data["replicas"])
        door = paths(data["front_door"], ("api_keys_file", "tls_cert", "tls_key"))
        return cls(Path(data["run_dir"]), Path(data["base_config"]), replicas, ReplicaConfig(**data["config"]),
                   FrontDoor(**{**door, "origins": tuple(door["origins"]),
                                     "trusted_proxies": tuple(door.get("trusted_proxies", ()))}),
                   data.get("workers_per_replica", 1))
