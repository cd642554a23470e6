"""Kubernetes manifests for the serving side, generated from the fleet's one topology.

    python -m deploy.manifests            # `make manifests`
    wrote 8 manifests to /path/to/repo/deploy/kubernetes
    python -m deploy.manifests --check    # exit 1 naming each file that differs from what this writes
    /path/to/repo/deploy/kubernetes matches serving/fleet/topology.py

Ports, paths and the probe command are serving/fleet/topology.py's (replica-0's ports: each pod has a
network of its own, so every pod is a replica-0), nginx's config is serving/fleet/frontdoor.py's
rendering of serving/fleet/nginx.conf.template with a Service as its upstream, the replica's config is
config.production.properties (token auth on) with the cluster's addresses, and the memory figures
are benchmarks/footprint.json's. Nothing is typed here that those files already say.

Keys: TorchServe makes its own at each start and reads none from outside, so each replica pod
runs `make fleet`'s key hop beside it (serving/fleet/keyhop.py: nginx adding the pod's current inference
key); the Service targets the hop. Client API keys and the TLS pair are Secrets made in the
cluster: no manifest holds a key.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import click
import yaml

from serving.server import server
from serving.handler.artifact import ARCHIVE_NAME, MODEL_NAME
from serving.fleet.frontdoor import KEEPALIVE_OFF, RotationState, include_line, nginx_command, render
from serving.server.properties import read_properties, set_properties, token_auth_enabled
from serving.fleet.topology import DEFAULT_REPLICAS, Fleet, Replica, ReplicaPorts

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "deploy" / "kubernetes"
BASE_CONFIG = REPO_ROOT / "config.production.properties"   # token auth on: `make config.production.properties`
MODEL_CONFIG = REPO_ROOT / "serving" / "handler" / "model-config.yaml"
FOOTPRINT = REPO_ROOT / "benchmarks" / "footprint.json"

# The image (deploy/Dockerfile): where it puts things, and whom it runs as.
IMAGE = "digitserve:0.1.0"
PYTHON = "python"                                   # the image's interpreter, on its PATH
APP_DIR = PurePosixPath("/app")                     # the repo's serving code, config and archive
IMAGE_MODEL_STORE = APP_DIR / "model_store"         # mnist.mar, read-only: a new model is a new image
USER_ID = 10001                                     # deploy/Dockerfile's model-server user
# Mounted at run time (the root filesystem is read-only).
RUN_DIR = PurePosixPath("/srv/replica")             # emptyDir: pid file, logs, unpacked model, worker sockets
TMP_DIR = PurePosixPath("/tmp")                     # emptyDir: HOME and anything else a library writes
FRONTDOOR_DIR = PurePosixPath("/srv/frontdoor")     # the front door's run dir; nginx's is FRONTDOOR_DIR/nginx
TLS_DIR = PurePosixPath("/etc/frontdoor/tls")       # the TLS Secret (kubernetes.io/tls: tls.crt, tls.key)
API_KEYS_DIR = PurePosixPath("/etc/frontdoor/api-keys")   # the client keys Secret: API_KEYS_FILE, nginx map entries
API_KEYS_FILE = "client-keys.map"
HOP_DIR = PurePosixPath("/srv/key-hop")             # emptyDir: the key hop's nginx config (it holds the key), pid, temp

NAME = "digitserve"
REPLICA = f"{NAME}-replica"
FRONTDOOR = f"{NAME}-frontdoor"
INFERENCE_SERVICE = f"{NAME}-inference"
TLS_SECRET = f"{FRONTDOOR}-tls"
API_KEYS_SECRET = f"{FRONTDOOR}-api-keys"
# One replica's ports: the fleet's replica-0. Every pod has its own network namespace.
PORTS = ReplicaPorts.derived(0)
# A pod is one of the fleet's replicas: the same ports, its run dir an emptyDir, its config (the
# ConfigMap's file) where the fleet keeps a replica's, so it runs and is probed as the fleet does.
POD_REPLICA = Replica(REPLICA, PORTS, Path(RUN_DIR))
BIND_ALL = "0.0.0.0"   # the key hop and metrics listen on the pod's address; the NetworkPolicy says who may connect
LOOPBACK = "127.0.0.1"  # TorchServe's inference and management: only the pod's own containers reach them

# The request-rate metric the HPA scales on, served by prometheus-adapter (adapter_rule).
RATE_METRIC = "digitserve_requests_per_second"
COUNTER = "ts_inference_requests_total"   # TorchServe 0.12's counter, declared in serving/server/metrics.yaml
RATE_WINDOW = "2m"
# Half of what one replica answered at 16 clients in `make bench` (benchmarks/results.json: 1,878
# requests/s on the 2-core EPYC): a pod asks for more company well before its queue fills.
TARGET_REQUESTS_PER_S_PER_POD = 900
MAX_REPLICAS = 10
SCALE_DOWN_WINDOW_S = 300   # a lull of five minutes before pods go: traffic comes in waves

# Memory: requests = what one replica was measured to use under load (benchmarks/footprint.json,
# its readiness probe's own Python included: an exec probe runs inside the pod), rounded up;
# limits = that x HEADROOM. Why 1.75: the measurement loaded small images, and Java stayed near
# 250 MiB; a flood of large bodies fills its queue (job_queue_size x max_request_size = 400 MiB)
# and may grow its heap to vmargs' -Xmx1g, about 0.9 GiB more with the JVM's own overhead. 1.75 x
# the ~1.6 GiB request covers that and leaves ~0.3 GiB for the workers' batches: an OOM kill would
# cost every request in flight.
MEMORY_STEP_MIB = 64
HEADROOM = 1.75
# Probes. `ready` makes two calls of up to 5 s each (its --timeout), after Python's start.
READY_TIMEOUT_S = 15
PROBE_PERIOD_S = 10
STARTUP_PERIOD_S = 5
LIVENESS_PATH = "/ping"   # TorchServe's frontend heartbeat: a hung Java fails it; the workers are TorchServe's own care


class ManifestError(Exception):
    """The manifests cannot be generated or checked; the message says why, in one line."""


@dataclass(frozen=True)
class Manifest:
    file: str            # under deploy/kubernetes/
    why: tuple[str, ...]  # the header's comment lines: the choices this file makes
    documents: tuple[dict, ...]


# --- the replica's config ----------------------------------------------------------------------
def replica_settings() -> dict[str, str]:
    """What the cluster's replica config changes in config.production.properties: its addresses
    and the image's paths. Token authorization stays on: inference and management listen on the
    pod's loopback, reached from outside only through the key hop beside them, which adds the key
    TorchServe wrote into the pod's run dir. Metrics (no key in TorchServe 0.12) stay on the pod's
    address for Prometheus."""
    return {"inference_address": f"http://{LOOPBACK}:{PORTS.inference}",
            "management_address": f"http://{LOOPBACK}:{PORTS.management}",
            "metrics_address": f"http://{BIND_ALL}:{PORTS.metrics}",
            "grpc_inference_port": str(PORTS.grpc_inference),
            "grpc_management_port": str(PORTS.grpc_management),
            "initial_worker_port": str(PORTS.initial_worker),
            "model_store": str(IMAGE_MODEL_STORE), "load_models": f"{MODEL_NAME}={ARCHIVE_NAME}",
            "workflow_store": str(POD_REPLICA.run_dir / "empty-workflow-store"),
            "metrics_config": str(APP_DIR / read_properties(BASE_CONFIG)["metrics_config"]),
            # nginx owns CORS, as in the fleet: TorchServe's single origin would be hidden anyway.
            "cors_allowed_origin": ""}


def replica_config() -> str:
    header = (f"# GENERATED by `python -m deploy.manifests` from {BASE_CONFIG.name} with the cluster's addresses\n"
              "# and the image's paths (deploy/manifests.py replica_settings). Token authorization is on:\n"
              "# inference and management listen on the pod's loopback; the pod's key hop (serving/fleet/keyhop.py)\n"
              "# adds the inference key TorchServe wrote into the run dir. Metrics listen on the pod's address.\n")
    return header + set_properties(BASE_CONFIG.read_text(), replica_settings())


# --- the front door's config -------------------------------------------------------------------
def frontdoor_fleet(config_path: Path) -> Fleet:
    """The fleet's front door as a pod sees it: on every address, its certificate from the Secret,
    its run dir in the pod; config_path: the replicas' config (body limit, timeouts, token auth).
    Token auth must be on: the Service reaches the pods' key hops, never TorchServe itself."""
    fleet = Fleet.plan(DEFAULT_REPLICAS, base_config=config_path, address=BIND_ALL,
                       tls_cert=Path(TLS_DIR / "tls.crt"), tls_key=Path(TLS_DIR / "tls.key"))
    if not fleet.token_auth:
        raise ManifestError(f"{BASE_CONFIG.name} turns token authorization off: the replica pods would "
                            "serve anyone who reaches them")
    return replace(fleet, run_dir=Path(FRONTDOOR_DIR))


def keyless(config_text: str) -> str:
    """The replicas' config as the front door sees them: it reaches their key hops, which add the
    key, so it renders no hops of its own (those run in the replica pods)."""
    return set_properties(config_text, {"disable_token_authorization": "true"})


def nginx_config(fleet: Fleet) -> str:
    """serving/fleet/nginx.conf.template rendered by serving/fleet/frontdoor.py, as `make fleet` renders it,
    with the inference Service as its one upstream and the image's paths."""
    overrides = {
        # kube-proxy spreads connections over the ready pods' key hops; nginx sees one server, so
        # its retries cannot reach another pod: a pod that fails its probe leaves the Service instead.
        "UPSTREAM_SERVERS": f"        server {INFERENCE_SERVICE}:{PORTS.key_hop};   # the Service: the pods' key hops",
        "TRIES": 1,
        # As in the fleet: a kept-alive connection could outlive a hop's reload with a renewed key;
        # and kube-proxy balances connections, not requests.
        "KEEPALIVE": KEEPALIVE_OFF,
        # The allowed client keys: the API keys Secret, mounted; a request without one gets 401.
        "CLIENT_DEFAULT": 0,
        "CLIENT_KEYS": include_line(API_KEYS_DIR / API_KEYS_FILE) + f"   # the {API_KEYS_SECRET} Secret",
        "USER": "# (runs as the image's model-server user: no `user` directive)",
        "WEB_DIR": APP_DIR / "serving" / "web",
    }
    return render(fleet, RotationState(), overrides=overrides)


# --- resources ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    request_mib: int
    limit_mib: int
    measured_mib: float
    source: str   # what was measured, where, when


def round_up(mib: float) -> int:
    return math.ceil(mib / MEMORY_STEP_MIB) * MEMORY_STEP_MIB


def measured_memory(footprint: Path | None = None) -> Memory:
    footprint = footprint or FOOTPRINT
    try:
        record = json.loads(footprint.read_text())
        measured = record["peak_rss_mib"]["pod"] + record["ready_probe_rss_mib"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ManifestError(f"no replica memory measurement in {footprint} ({error}): "
                            "run `python -m benchmarks.footprint`") from None
    request = round_up(measured)
    source = f"{record['command']} on {record['machine']['cpu']} ({record['machine']['cores']} cores), {record['date']}"
    return Memory(request, round_up(request * HEADROOM), measured, source)


def worker_cpus() -> int:
    """Cores the replica's workers use: workers x threads (serving/handler/model-config.yaml)."""
    model_config = yaml.safe_load(MODEL_CONFIG.read_text())
    return model_config["maxWorkers"] * model_config["handler"]["threads"]


# --- objects -----------------------------------------------------------------------------------
def labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": component}


def metadata(name: str, component: str) -> dict:
    return {"name": name, "labels": labels(component)}


def pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": USER_ID, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def checksum(text: str) -> str:
    """In the pod template: a changed ConfigMap rolls the pods (a mounted file alone would not)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_map(name: str, component: str, key: str, text: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(name, component), "data": {key: text}}


def empty_dir(name: str, size: str) -> dict:
    return {"name": name, "emptyDir": {"sizeLimit": size}}


def in_image(command: list[str]) -> list[str]:
    """A fleet command (run by the fleet's own interpreter) as the image runs it."""
    return [PYTHON, *command[1:]]


def key_hop_command() -> list[str]:
    """serving/fleet/keyhop.py in the pod: the replica's config and run dir (its key file), the hop on
    the pod's address at the fleet's hop port."""
    return [PYTHON, "-m", "serving.fleet.keyhop", "--config", str(POD_REPLICA.config), "--run-dir", str(POD_REPLICA.run_dir),
            "--hop-dir", str(HOP_DIR), "--address", BIND_ALL, "--port", str(PORTS.key_hop)]


def key_hop_container() -> dict:
    """nginx adding the pod's inference key (TorchServe writes it into the run dir, which this
    container mounts read-only), and the loop that renders a renewed key in."""
    heartbeat = {"httpGet": {"path": LIVENESS_PATH, "port": "key-hop"}}
    return {
        "name": "key-hop", "image": IMAGE, "imagePullPolicy": "IfNotPresent", "command": key_hop_command(),
        "ports": [{"name": "key-hop", "containerPort": PORTS.key_hop, "protocol": "TCP"}],
        # Ready once it forwards, with the key, to a TorchServe that answers its heartbeat.
        "readinessProbe": {**heartbeat, "periodSeconds": PROBE_PERIOD_S, "timeoutSeconds": 5},
        # Alive while nginx accepts (its exit ends the container: Kubernetes restarts it).
        "livenessProbe": {"tcpSocket": {"port": "key-hop"}, "periodSeconds": 20, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": container_security(),
        "volumeMounts": [{"name": "run", "mountPath": str(POD_REPLICA.run_dir), "readOnly": True},
                         {"name": "config", "mountPath": str(POD_REPLICA.config), "subPath": "config.properties",
                          "readOnly": True},
                         {"name": "hop", "mountPath": str(HOP_DIR)}],
    }


def replica_deployment(config_text: str, properties: dict, memory: Memory) -> dict:
    exec_ready = {"exec": {"command": in_image(POD_REPLICA.probe_command())}}
    startup_timeout_s = int(properties["default_startup_timeout"])
    container = {
        "name": "torchserve", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": in_image(POD_REPLICA.run_command()),
        # Its working dir is its run dir, as under the fleet: `ready` runs there too, and TorchServe
        # writes key_file.json there, where the key hop reads it.
        "workingDir": str(POD_REPLICA.run_dir),
        # Inference and management listen on the pod's loopback (no containerPort): the key hop's
        # port is the pod's way in.
        "ports": [{"name": "metrics", "containerPort": PORTS.metrics, "protocol": "TCP"}],
        # The command the fleet probes each replica with (serving/fleet/topology.py Replica.probe_command):
        # every worker READY and a probe image answered.
        "readinessProbe": {**exec_ready, "periodSeconds": PROBE_PERIOD_S, "timeoutSeconds": READY_TIMEOUT_S,
                           "failureThreshold": 3},
        # Loading the model may take TorchServe's default_startup_timeout; liveness waits for it.
        "startupProbe": {**exec_ready, "periodSeconds": STARTUP_PERIOD_S, "timeoutSeconds": READY_TIMEOUT_S,
                         "failureThreshold": math.ceil((startup_timeout_s + READY_TIMEOUT_S) / STARTUP_PERIOD_S)},
        # Through the hop (the kubelet reaches the pod's address only, and the hop adds the key).
        "livenessProbe": {"httpGet": {"path": LIVENESS_PATH, "port": PORTS.key_hop}, "periodSeconds": 20,
                          "timeoutSeconds": 5, "failureThreshold": 3},
        # No CPU limit: throttling a worker mid-batch only adds latency; the request reserves its cores.
        "resources": {"requests": {"cpu": str(worker_cpus()), "memory": f"{memory.request_mib}Mi"},
                      "limits": {"memory": f"{memory.limit_mib}Mi"}},
        "securityContext": container_security(),
        "volumeMounts": [{"name": "run", "mountPath": str(POD_REPLICA.run_dir)},
                         {"name": "config", "mountPath": str(POD_REPLICA.config), "subPath": "config.properties",
                          "readOnly": True},
                         {"name": "tmp", "mountPath": str(TMP_DIR)}],
    }
    pod = {"automountServiceAccountToken": False, "securityContext": pod_security(),
           # `run` gives Java STOP_TIMEOUT_S after SIGTERM, then kills it: Kubernetes waits a little longer.
           "terminationGracePeriodSeconds": int(server.STOP_TIMEOUT_S) + 10,
           "containers": [container, key_hop_container()],
           "volumes": [{"name": "config", "configMap": {"name": f"{REPLICA}-config"}},
                       empty_dir("run", "1Gi"), empty_dir("tmp", "256Mi"), empty_dir("hop", "64Mi")]}
    annotations = {"checksum/config": checksum(config_text),
                   # Prometheus' usual kubernetes-pods job scrapes these (in this namespace: the NetworkPolicy).
                   "prometheus.io/scrape": "true", "prometheus.io/port": str(PORTS.metrics),
                   "prometheus.io/path": "/metrics"}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(REPLICA, "replica"),
            "spec": {"replicas": DEFAULT_REPLICAS, "selector": {"matchLabels": labels("replica")},
                     # A new pod is ready before an old one goes: a rollout never lowers capacity.
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                     "template": {"metadata": {"labels": labels("replica"), "annotations": annotations},
                                  "spec": pod}}}


def inference_service() -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(INFERENCE_SERVICE, "replica"),
            "spec": {"selector": labels("replica"),
                     # The pods' key hops, never TorchServe itself: the hop adds the pod's own key.
                     "ports": [{"name": "key-hop", "port": PORTS.key_hop, "targetPort": "key-hop",
                                "protocol": "TCP"}]}}


def frontdoor_deployment(nginx_text: str, fleet: Fleet) -> dict:
    door = fleet.front_door
    nginx_dir = PurePosixPath(fleet.nginx_dir)
    container = {
        "name": "nginx", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": nginx_command(fleet, "-g", "daemon off;"),
        "ports": [{"name": "http", "containerPort": door.http_port, "protocol": "TCP"},
                  {"name": "https", "containerPort": door.tls_port, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 20, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": container_security(),
        # nginx writes its pid, access log and temp files under its run dir; its config is the ConfigMap's.
        "volumeMounts": [{"name": "nginx", "mountPath": str(nginx_dir)},
                         {"name": "nginx-tmp", "mountPath": str(nginx_dir / "tmp")},
                         {"name": "config", "mountPath": str(nginx_dir / "nginx.conf"), "subPath": "nginx.conf",
                          "readOnly": True},
                         {"name": "tls", "mountPath": str(TLS_DIR), "readOnly": True},
                         {"name": "api-keys", "mountPath": str(API_KEYS_DIR), "readOnly": True}],
    }
    pod = {"automountServiceAccountToken": False, "securityContext": pod_security(), "containers": [container],
           "volumes": [empty_dir("nginx", "64Mi"), empty_dir("nginx-tmp", "256Mi"),
                       {"name": "config", "configMap": {"name": f"{FRONTDOOR}-config"}},
                       {"name": "tls", "secret": {"secretName": TLS_SECRET}},
                       {"name": "api-keys", "secret": {"secretName": API_KEYS_SECRET}}]}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(FRONTDOOR, "frontdoor"),
            "spec": {"replicas": 2, "selector": {"matchLabels": labels("frontdoor")},
                     "template": {"metadata": {"labels": labels("frontdoor"),
                                               "annotations": {"checksum/config": checksum(nginx_text)}},
                                  "spec": pod}}}


def frontdoor_service(fleet: Fleet) -> dict:
    door = fleet.front_door
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(FRONTDOOR, "frontdoor"),
            "spec": {"selector": labels("frontdoor"),
                     "ports": [{"name": "http", "port": door.http_port, "targetPort": "http", "protocol": "TCP"},
                               {"name": "https", "port": door.tls_port, "targetPort": "https", "protocol": "TCP"}]}}


def tcp(port: int) -> dict:
    return {"port": port, "protocol": "TCP"}


def network_policies(fleet: Fleet) -> tuple[dict, dict]:
    """Replicas: the key hop from the front door's pods only, metrics from pods of this namespace
    only (a podSelector without a namespaceSelector means this namespace); inference and management
    listen on the pod's loopback. The front door: its two ports, from anywhere (it is the way in)."""
    replica = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata(REPLICA, "replica"),
               "spec": {"podSelector": {"matchLabels": labels("replica")}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{"podSelector": {"matchLabels": labels("frontdoor")}}],
                                     "ports": [tcp(PORTS.key_hop)]},
                                    {"from": [{"podSelector": {}}], "ports": [tcp(PORTS.metrics)]}]}}
    door = fleet.front_door
    frontdoor = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": metadata(FRONTDOOR, "frontdoor"),
                 "spec": {"podSelector": {"matchLabels": labels("frontdoor")}, "policyTypes": ["Ingress"],
                          "ingress": [{"ports": [tcp(door.http_port), tcp(door.tls_port)]}]}}
    return replica, frontdoor


def autoscaler() -> dict:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": metadata(REPLICA, "replica"),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": REPLICA},
                     "minReplicas": DEFAULT_REPLICAS, "maxReplicas": MAX_REPLICAS,
                     "metrics": [{"type": "Pods", "pods": {
                         "metric": {"name": RATE_METRIC},
                         "target": {"type": "AverageValue", "averageValue": str(TARGET_REQUESTS_PER_S_PER_POD)}}}],
                     "behavior": {"scaleDown": {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S}}}}


def adapter_rule() -> dict:
    """prometheus-adapter's rule (its config's `rules:`) that serves RATE_METRIC per pod: the rate
    of TorchServe's request counter over RATE_WINDOW. docs/kubernetes.md shows it; a test holds them equal."""
    return {"seriesQuery": f'{COUNTER}{{namespace!="",pod!=""}}',
            "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
            "name": {"matches": f"^{COUNTER}$", "as": RATE_METRIC},
            "metricsQuery": f"sum(rate(<<.Series>>{{<<.LabelMatchers>>}}[{RATE_WINDOW}])) by (<<.GroupBy>>)"}


# --- files -------------------------------------------------------------------------------------
def manifests() -> list[Manifest]:
    config_text = replica_config()
    with tempfile.TemporaryDirectory() as directory:   # the front door reads the replicas' config from a file
        config_path = Path(directory) / "config.properties"
        config_path.write_text(config_text)
        properties = read_properties(config_path)
        fleet = frontdoor_fleet(config_path)
        door_config = Path(directory) / "frontdoor.properties"
        door_config.write_text(keyless(config_text))
        nginx_text = nginx_config(replace(fleet, base_config=door_config))
    memory = measured_memory()
    resources_why = (f"Memory: requests {memory.request_mib}Mi = the {memory.measured_mib:.0f} MiB one replica took "
                     f"under load with its readiness probe, rounded up to {MEMORY_STEP_MIB} MiB",
                     f"(benchmarks/footprint.json: {memory.source});",
                     f"limits {memory.limit_mib}Mi = {HEADROOM:g}x that: a flood of large bodies may grow Java's heap "
                     "to its -Xmx1g (deploy/manifests.py HEADROOM).",
                     f"CPU: requests {worker_cpus()} = workers x threads (serving/handler/model-config.yaml); no CPU limit "
                     "(throttling adds latency).")
    return [
        Manifest("replica-config.yaml", ("config.properties with the cluster's addresses and the image's paths.",),
                 (config_map(f"{REPLICA}-config", "replica", "config.properties", config_text),)),
        Manifest("replica-deployment.yaml",
                 ("The TorchServe replicas: `python -m serving.server run`, probed with `python -m serving.server "
                  "ready`", "(serving/fleet/topology.py Replica.run_command and probe_command, as `make fleet` runs and "
                  "probes them),",
                  "on config.production.properties: token auth on, inference and management on the pod's loopback.",
                  "Beside it the key hop (`python -m serving.fleet.keyhop`, `make fleet`'s hop for one replica): nginx adding",
                  "the inference key TorchServe wrote into the shared run dir, a renewed key followed within 0.2 s.",
                  *resources_why),
                 (replica_deployment(config_text, properties, memory),)),
        Manifest("inference-service.yaml",
                 ("The pods' key hops only: TorchServe's own ports listen on each pod's loopback.",),
                 (inference_service(),)),
        Manifest("frontdoor-config.yaml",
                 ("serving/fleet/nginx.conf.template rendered by serving/fleet/frontdoor.py, as `make fleet` renders it,",
                  f"with the {INFERENCE_SERVICE} Service as its upstream."),
                 (config_map(f"{FRONTDOOR}-config", "frontdoor", "nginx.conf", nginx_text),)),
        Manifest("frontdoor-deployment.yaml",
                 ("nginx in front: the same image, its config from the ConfigMap, its TLS key pair from the",
                  f"{TLS_SECRET} Secret (kubectl create secret tls {TLS_SECRET} --cert=... --key=...), the allowed",
                  f"client keys from the {API_KEYS_SECRET} Secret ({API_KEYS_FILE}: docs/kubernetes.md)."),
                 (frontdoor_deployment(nginx_text, fleet),)),
        Manifest("frontdoor-service.yaml", ("The way in: HTTP and TLS, the fleet's front door ports.",),
                 (frontdoor_service(fleet),)),
        Manifest("networkpolicy.yaml",
                 ("Metrics stay inside the namespace; the key hops only from the front door.",),
                 network_policies(fleet)),
        Manifest("hpa.yaml",
                 (f"Scales on a request RATE ({RATE_METRIC}: rate({COUNTER}[{RATE_WINDOW}]) per pod, served by",
                  "prometheus-adapter; docs/kubernetes.md has its rule), not on the counter itself, which only grows.",
                  f"Target: {TARGET_REQUESTS_PER_S_PER_POD}/s a pod, half what one replica answered in `make bench`."),
                 (autoscaler(),)),
    ]


class LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (the configs) as literal blocks, readable in the file and in kubectl;
    no anchors for a probe used twice: each object reads on its own."""

    def ignore_aliases(self, data) -> bool:
        return True


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


LiteralDumper.add_representer(str, _string)


def render_file(manifest: Manifest) -> str:
    header = ["# GENERATED by `python -m deploy.manifests` (deploy/manifests.py): do not edit; `make manifests`.",
              *(f"# {line}" for line in manifest.why)]
    body = "---\n".join(yaml.dump(document, Dumper=LiteralDumper, sort_keys=False, width=120)
                        for document in manifest.documents)
    return "\n".join(header) + "\n" + body


def rendered() -> dict[str, str]:
    return {manifest.file: render_file(manifest) for manifest in manifests()}


def write(out_dir: Path = OUT_DIR) -> list[Path]:
    files = rendered()   # first: a failure writes nothing
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in set(path.name for path in out_dir.glob("*.yaml")) - set(files):
        (out_dir / stale).unlink()
    for name, text in files.items():
        (out_dir / name).write_text(text)
    return [out_dir / name for name in files]


def differences(out_dir: Path = OUT_DIR) -> list[str]:
    """The files in out_dir that differ from what the generator writes now (missing, stale, changed)."""
    files = rendered()
    present = {path.name for path in out_dir.glob("*.yaml")}
    found = [f"{name}: missing" for name in sorted(set(files) - present)]
    found += [f"{name}: not generated (stale)" for name in sorted(present - set(files))]
    found += [f"{name}: differs" for name in sorted(set(files) & present) if (out_dir / name).read_text() != files[name]]
    return found


@click.command()
@click.option("--check", is_flag=True, help="Write nothing; exit 1 when the committed files differ.")
@click.option("--out-dir", default=str(OUT_DIR), show_default=True, type=click.Path(file_okay=False))
def main(check: bool, out_dir: str) -> None:
    """Write deploy/kubernetes/*.yaml from serving/fleet/topology.py, the nginx template and the footprint."""
    try:
        if check:
            found = differences(Path(out_dir))
            if found:
                click.echo(f"{out_dir} differs from what `python -m deploy.manifests` writes: " + "; ".join(found),
                           err=True)
                sys.exit(1)
            click.echo(f"{out_dir} matches serving/fleet/topology.py")
            return
        written = write(Path(out_dir))
    except ManifestError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {len(written)} manifests to {out_dir}")


if __name__ == "__main__":
    main()
