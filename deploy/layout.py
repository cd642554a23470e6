"""The pod layout the Kubernetes manifests describe, named once: the image and its paths, the
objects' names, the ports (serving/fleet/topology.py's replica-0), the autoscaler's metric, the
memory rounding and the probes' timings (deploy/objects.py builds the objects from these)."""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from serving.fleet.topology import HEARTBEAT_PATH, Replica, ReplicaPorts

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "deploy" / "kubernetes"
BASE_CONFIG = REPO_ROOT / "config.production.properties"   # token auth on: `make config.production.properties`
MODEL_CONFIG = REPO_ROOT / "serving" / "handler" / "model-config.yaml"
FOOTPRINT = REPO_ROOT / "benchmarks" / "footprint.json"
DOC = REPO_ROOT / "docs" / "kubernetes.md"   # its k8s block: the figures below, written by the generator

# The image (deploy/Dockerfile): where it puts things, and whom it runs as. The committed manifests name
# it by the local tag `docker build` gives it (a development rendering: `kind load docker-image`); a
# production rendering names it by digest (`python -m deploy.manifests --image repo/digitserve@sha256:...`,
# pinned_image): a tag may be moved to other bytes after the manifests were reviewed, a digest cannot.
IMAGE = "digitserve:0.1.0"
# name[:tag]@sha256:<64 hex>: docker's reference grammar, lowercase path components, an optional registry host[:port].
PINNED_IMAGE = re.compile(r"(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
                          r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?@sha256:[0-9a-f]{64}")
PYTHON = "python"                                   # the image's interpreter, on its PATH
APP_DIR = PurePosixPath("/app")                     # the repo's serving code, config and archive
IMAGE_MODEL_STORE = APP_DIR / "model_store"         # mnist.mar, read-only: a new model is a new image
# TorchServe's logging in a pod: stdout only, no file in the run dir's emptyDir (the file says why).
POD_LOG_CONFIG = PurePosixPath("serving/server/log4j2-console.xml")
USER_ID = 10001                                     # deploy/Dockerfile's model-server user
# Mounted at run time (the root filesystem is read-only).
RUN_DIR = PurePosixPath("/srv/replica")             # emptyDir: pid file, logs, unpacked model, worker sockets
TMP_DIR = PurePosixPath("/tmp")                     # emptyDir: HOME and anything else a library writes
FRONTDOOR_DIR = PurePosixPath("/srv/frontdoor")     # the front door's run dir; nginx's is FRONTDOOR_DIR/nginx
TLS_DIR = PurePosixPath("/etc/frontdoor/tls")       # the TLS Secret (kubernetes.io/tls: tls.crt, tls.key)
API_KEYS_DIR = PurePosixPath("/etc/frontdoor/api-keys")   # the client keys Secret: API_KEYS_FILE, nginx map entries
API_KEYS_FILE = "client-keys.map"
HOP_DIR = PurePosixPath("/srv/key-hop")             # emptyDir: the key hop's nginx config (it holds the key), pid, temp
# The front door's secret for the key hops (serving/fleet/frontdoor.py HOP_SECRET_FILE): a Secret made in the
# cluster (docs/kubernetes.md), mounted in both pods, included by both nginx configs; readable by the
# pods' group alone (HOP_SECRET_MODE; the kubelet makes the files the fsGroup's).
HOP_SECRET_DIR = PurePosixPath("/etc/digitserve/hop-secret")
HOP_SECRET_MODE = 0o440

NAME = "digitserve"
REPLICA = f"{NAME}-replica"
FRONTDOOR = f"{NAME}-frontdoor"
INFERENCE_SERVICE = f"{NAME}-inference"
TLS_SECRET = f"{FRONTDOOR}-tls"
API_KEYS_SECRET = f"{FRONTDOOR}-api-keys"
HOP_SECRET_SECRET = f"{NAME}-hop-secret"
# One replica's ports: the fleet's replica-0. Every pod has its own network namespace.
PORTS = ReplicaPorts.derived(0)
# A pod is one of the fleet's replicas: the same ports, its run dir an emptyDir, its config (the
# ConfigMap's file) where the fleet keeps a replica's, so it runs and is probed as the fleet does.
POD_REPLICA = Replica(REPLICA, PORTS, Path(RUN_DIR))
# The cluster's DNS, the one place the front door reaches besides the key hops (its egress NetworkPolicy).
DNS_NAMESPACE = "kube-system"
DNS_LABELS = {"k8s-app": "kube-dns"}
DNS_PORT = 53
BIND_ALL = "0.0.0.0"   # the key hop and metrics listen on the pod's address; the NetworkPolicy says who may connect
LOOPBACK = "127.0.0.1"  # TorchServe's inference and management: only the pod's own containers reach them

# The request-rate metric the HPA scales on, served by prometheus-adapter (adapter_rule).
RATE_METRIC = "digitserve_requests_per_second"
COUNTER = "ts_inference_requests_total"   # TorchServe 0.12's counter, declared in serving/server/metrics.yaml
RATE_WINDOW = "2m"
# The HPA scales on queued work as well (queue_rule): the seconds a request waited in a pod's queue,
# on average over RATE_WINDOW (TorchServe's queue-latency counter over its request counter). A rate
# misses cost: a few explanations a second, each hundreds of predictions' work, fill the queues at
# a rate far under the target (issue 27 point 3); the wait shows them. The HPA takes whichever
# metric asks for more pods. QUEUE_TARGET: a Kubernetes quantity, 50 milliseconds of waiting.
QUEUE_METRIC = "digitserve_queue_seconds"
QUEUE_COUNTER = "ts_queue_latency_microseconds"   # declared in serving/server/metrics.yaml
QUEUE_TARGET = "50m"
# The HPA's target: TARGET_SHARE of what one replica answered at TARGET_CLIENTS clients in `make bench`
# (benchmarks/results.json, its "ours" serving row): a pod asks for more company well before its
# queue fills. Rounded down to tens; the figure and its source are written into hpa.yaml and docs.
BENCH_RESULTS = REPO_ROOT / "benchmarks" / "results.json"
BENCH_SERVING_ROW = "ours:"   # the row of results.json's serving table that runs our model-config.yaml
TARGET_CLIENTS = 16
TARGET_SHARE = 0.5
MAX_REPLICAS = 10
SCALE_DOWN_WINDOW_S = 300   # a lull of five minutes before pods go: traffic comes in waves

# Memory: requests = what one replica was measured to use under load (benchmarks/footprint.json,
# its readiness probe's own Python included: an exec probe runs inside the pod), rounded up;
# limits = that x HEADROOM. Why 1.75: the measurement loaded small images, so Java's heap stayed
# small; a flood of large bodies fills its queue (job_queue_size x max_request_size) and may grow
# the heap up to vmargs' -Xmx1g, plus the JVM's own overhead. 1.75 x the request covers that with
# room left for the workers' batches: an OOM kill would cost every request in flight.
MEMORY_STEP_MIB = 64
HEADROOM = 1.75
# Probes. `ready` makes two calls of up to 5 s each (its --timeout), after Python's start.
READY_TIMEOUT_S = 15
PROBE_PERIOD_S = 10
STARTUP_PERIOD_S = 5
LIVENESS_PATH = HEARTBEAT_PATH   # TorchServe's frontend heartbeat: a hung Java fails it; the workers are TorchServe's own care

# The second engine (docs/engines.md) as a KServe InferenceService: a custom predictor container
# running `python -m serving.kserve run` on the same image, the exported file baked in beside the archive.
KSERVE_ISVC = f"{NAME}-kserve"
KSERVE_CONTAINER = "kserve-container"          # the name KServe gives a custom predictor's container
KSERVE_HTTP_PORT = 8080                        # KServe routes to the container's one declared port
KSERVE_GRPC_PORT = 8081                        # served in the pod; Knative routes one port (docs/engines.md)
IMAGE_ARTIFACT = APP_DIR / "artifacts"         # what `make export` wrote, the TorchScript file
IMAGE_CONFIG = APP_DIR / "config.properties"   # its request limits are the engine's too
KSERVE_READY_PATH = "/v2/health/ready"         # KServe's readiness: the model loaded


class ManifestError(Exception):
    """The manifests cannot be generated or checked; the message says why, in one line."""


def pinned_image(reference: str) -> str:
    """reference when it names the image by digest; ManifestError otherwise (a bare tag is refused)."""
    if not PINNED_IMAGE.fullmatch(reference):
        raise ManifestError(f"--image {reference!r} is not pinned by digest (name@sha256:<64 hex digits>): after the push, "
                            "`docker buildx imagetools inspect <name:tag>` (or `docker inspect --format "
                            "'{{index .RepoDigests 0}}' <name:tag>`) prints it")
    return reference
