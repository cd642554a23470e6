"""The Kubernetes objects of deploy/manifests.py: memory and CPU from the measurements, the
replica and front door Deployments with their key hop, Services, NetworkPolicies, the autoscaler."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from deploy.layout import (API_KEYS_DIR, API_KEYS_SECRET, BENCH_RESULTS, BENCH_SERVING_ROW, BIND_ALL, COUNTER,
                           BASE_CONFIG, DNS_LABELS, DNS_NAMESPACE, DNS_PORT,
                           FOOTPRINT, FRONTDOOR, HEADROOM, HOP_DIR, HOP_SECRET_DIR, HOP_SECRET_MODE, HOP_SECRET_SECRET, IMAGE, INFERENCE_SERVICE, LIVENESS_PATH,
                           MAX_REPLICAS, MEMORY_STEP_MIB, MODEL_CONFIG, NAME, POD_REPLICA, PORTS, PROBE_PERIOD_S,
                           PYTHON, QUEUE_COUNTER, QUEUE_METRIC, QUEUE_TARGET, RATE_METRIC, RATE_WINDOW, READY_TIMEOUT_S, REPLICA, SCALE_DOWN_WINDOW_S,
                           STARTUP_PERIOD_S, TARGET_CLIENTS, TARGET_SHARE, TLS_DIR, TLS_SECRET, TMP_DIR, USER_ID,
                           ManifestError)
from serving.fleet.frontdoor import HOP_SECRET_FILE, nginx_command
from serving.fleet.topology import BODY_SPOOL_BYTES, DEFAULT_REPLICAS, Fleet
from serving.server import server
from serving.server.properties import read_properties, workers_per_model


# --- resources ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    request_mib: int
    limit_mib: int
    measured_mib: float
    source: str   # what was measured, where, when
    parts: str    # the processes it was measured in


def round_up(mib: float) -> int:
    return math.ceil(mib / MEMORY_STEP_MIB) * MEMORY_STEP_MIB


def measured_memory(footprint: Path | None = None) -> Memory:
    footprint = footprint or FOOTPRINT
    try:
        record = json.loads(footprint.read_text())
        measured = record["peak_rss_mib"]["pod"] + record["ready_probe_rss_mib"]
        peak = record["peak_rss_mib"]
        parts = (f"Java frontend {peak['frontend']:.0f}, {len(peak['workers'])} workers "
                 f"{' + '.join(f'{worker:.0f}' for worker in peak['workers'])}, `run` {peak['run']:.0f}, "
                 f"torchserve's launcher {peak['launcher']:.0f}, the probe {record['ready_probe_rss_mib']:.0f}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ManifestError(f"no replica memory measurement in {footprint} ({error}): "
                            "run `python -m benchmarks.footprint`") from None
    request = round_up(measured)
    source = f"{record['command']} on {record['machine']['cpu']} ({record['machine']['cores']} cores), {record['date']}"
    return Memory(request, round_up(request * HEADROOM), measured, source, parts)


@dataclass(frozen=True)
class Target:
    per_pod: int          # requests/s a pod, the HPA's averageValue
    measured: float       # what one replica answered at TARGET_CLIENTS clients
    source: str           # which run, where, when


def measured_target(results: Path | None = None) -> Target:
    """TARGET_SHARE of what one replica answered at TARGET_CLIENTS clients in `make bench`."""
    results = results or BENCH_RESULTS
    try:
        record = json.loads(results.read_text())
        [row] = [runs for name, runs in record["serving"].items() if name.startswith(BENCH_SERVING_ROW)]
        [run] = [run for run in row["runs"] if run["connections"] == TARGET_CLIENTS]
        measured = float(run["requests_per_s"])
        source = f"{record['command']} on {record['machine']['cpu']} ({record['machine']['cores']} cores), {record['date']}"
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ManifestError(f"no {TARGET_CLIENTS}-client serving measurement in {results} ({error!r}): "
                            "run `make bench`") from None
    return Target(int(measured * TARGET_SHARE) // 10 * 10, measured, source)


def worker_cpus() -> int:
    """Cores the replica's workers use: workers (the base config's default_workers_per_model: the
    archive names none) x threads (serving/handler/model-config.yaml)."""
    workers = workers_per_model(read_properties(BASE_CONFIG))
    return workers * yaml.safe_load(MODEL_CONFIG.read_text())["handler"]["threads"]


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
    the pod's address at the fleet's hop port, the front door's secret from the mounted Secret."""
    return [PYTHON, "-m", "serving.fleet.keyhop", "--config", str(POD_REPLICA.config), "--run-dir", str(POD_REPLICA.run_dir),
            "--hop-dir", str(HOP_DIR), "--address", BIND_ALL, "--port", str(PORTS.key_hop),
            "--secret-file", str(HOP_SECRET_DIR / HOP_SECRET_FILE)]


def hop_secret_volume() -> dict:
    """The front door's secret for the key hops: made in the cluster (docs/kubernetes.md), no value here."""
    return {"name": "hop-secret", "secret": {"secretName": HOP_SECRET_SECRET, "defaultMode": HOP_SECRET_MODE}}


def hop_secret_mount() -> dict:
    return {"name": "hop-secret", "mountPath": str(HOP_SECRET_DIR), "readOnly": True}


def key_hop_container(image: str) -> dict:
    """nginx adding the pod's inference key (TorchServe writes it into the run dir, which this
    container mounts read-only), and the loop that renders a renewed key in."""
    heartbeat = {"httpGet": {"path": LIVENESS_PATH, "port": "key-hop"}}
    return {
        "name": "key-hop", "image": image, "imagePullPolicy": "IfNotPresent", "command": key_hop_command(),
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
                         {"name": "hop", "mountPath": str(HOP_DIR)}, hop_secret_mount()],
    }


def replica_deployment(config_text: str, properties: dict, memory: Memory, image: str = IMAGE) -> dict:
    exec_ready = {"exec": {"command": in_image(POD_REPLICA.probe_command())}}
    startup_timeout_s = int(properties["default_startup_timeout"])
    container = {
        "name": "torchserve", "image": image, "imagePullPolicy": "IfNotPresent",
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
           "containers": [container, key_hop_container(image)],
           "volumes": [{"name": "config", "configMap": {"name": f"{REPLICA}-config"}},
                       empty_dir("run", "1Gi"), empty_dir("tmp", "256Mi"), empty_dir("hop", "64Mi"),
                       hop_secret_volume()]}
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


def frontdoor_deployment(nginx_text: str, fleet: Fleet, image: str = IMAGE) -> dict:
    door = fleet.front_door
    nginx_dir = PurePosixPath(fleet.nginx_dir)
    container = {
        "name": "nginx", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": nginx_command(fleet.nginx_dir, "-g", "daemon off;"),
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
                         {"name": "api-keys", "mountPath": str(API_KEYS_DIR), "readOnly": True},
                         hop_secret_mount()],
    }
    pod = {"automountServiceAccountToken": False, "securityContext": pod_security(), "containers": [container],
           "volumes": [empty_dir("nginx", "64Mi"), empty_dir("nginx-tmp", f"{BODY_SPOOL_BYTES // 2 ** 20}Mi"),
                       {"name": "config", "configMap": {"name": f"{FRONTDOOR}-config"}},
                       {"name": "tls", "secret": {"secretName": TLS_SECRET}},
                       {"name": "api-keys", "secret": {"secretName": API_KEYS_SECRET}}, hop_secret_volume()]}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(FRONTDOOR, "frontdoor"),
            "spec": {"replicas": 2, "selector": {"matchLabels": labels("frontdoor")},
                     "template": {"metadata": {"labels": labels("frontdoor"),
                                               "annotations": {"checksum/config": checksum(nginx_text)}},
                                  "spec": pod}}}


def frontdoor_service(fleet: Fleet) -> dict:
    door = fleet.front_door
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(FRONTDOOR, "frontdoor"),
            "spec": {"selector": labels("frontdoor"),
                     # TLS alone: plain HTTP would carry client keys in the clear (nginx answers it 426).
                     "ports": [{"name": "https", "port": door.tls_port, "targetPort": "https", "protocol": "TCP"}]}}


def tcp(port: int) -> dict:
    return {"port": port, "protocol": "TCP"}


def dns_peer() -> dict:
    """The cluster's DNS pods: kube-system's, labelled k8s-app=kube-dns (CoreDNS keeps kube-dns's label in
    kubeadm, kind, GKE and EKS; kubernetes.io/metadata.name is set on every namespace since 1.21)."""
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": DNS_NAMESPACE}},
            "podSelector": {"matchLabels": DNS_LABELS}}


def network_policies(fleet: Fleet) -> tuple[dict, dict]:
    """Ingress. Replicas: the key hop from the front door's pods only, metrics from pods of this
    namespace only (a podSelector without a namespaceSelector means this namespace); inference and
    management listen on the pod's loopback. The front door: its TLS port, from anywhere (it is the
    way in); its plain HTTP port answers only 426 and the kubelet's probes.
    Egress. Replicas: nothing (no rule): TorchServe fetches nothing (allowed_urls=^$, no per-model pip),
    its workers and the key hop reach it over loopback and Unix sockets, which no policy sees. The
    front door: the replica pods' key hop port (the Service's ClusterIP is translated to a pod's address
    before the policy applies, in Calico and Cilium alike) and DNS (nginx resolves the Service's name
    at start and reload)."""
    replica = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata(REPLICA, "replica"),
               "spec": {"podSelector": {"matchLabels": labels("replica")}, "policyTypes": ["Ingress", "Egress"],
                        "ingress": [{"from": [{"podSelector": {"matchLabels": labels("frontdoor")}}],
                                     "ports": [tcp(PORTS.key_hop)]},
                                    {"from": [{"podSelector": {}}], "ports": [tcp(PORTS.metrics)]}],
                        "egress": []}}
    door = fleet.front_door
    frontdoor = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": metadata(FRONTDOOR, "frontdoor"),
                 "spec": {"podSelector": {"matchLabels": labels("frontdoor")}, "policyTypes": ["Ingress", "Egress"],
                          "ingress": [{"ports": [tcp(door.tls_port)]}],
                          "egress": [{"to": [{"podSelector": {"matchLabels": labels("replica")}}],
                                      "ports": [tcp(PORTS.key_hop)]},
                                     {"to": [dns_peer()],
                                      "ports": [{"port": DNS_PORT, "protocol": "UDP"}, tcp(DNS_PORT)]}]}}
    return replica, frontdoor


def autoscaler(target: Target) -> dict:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": metadata(REPLICA, "replica"),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": REPLICA},
                     "minReplicas": DEFAULT_REPLICAS, "maxReplicas": MAX_REPLICAS,
                     "metrics": [{"type": "Pods", "pods": {
                                      "metric": {"name": RATE_METRIC},
                                      "target": {"type": "AverageValue", "averageValue": str(target.per_pod)}}},
                                 {"type": "Pods", "pods": {
                                      "metric": {"name": QUEUE_METRIC},
                                      "target": {"type": "AverageValue", "averageValue": QUEUE_TARGET}}}],
                     "behavior": {"scaleDown": {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S}}}}


def adapter_rule() -> dict:
    """prometheus-adapter's rule (its config's `rules:`) that serves RATE_METRIC per pod: the rate
    of TorchServe's request counter over RATE_WINDOW. docs/kubernetes.md shows it; a test holds them equal."""
    return {"seriesQuery": f'{COUNTER}{{namespace!="",pod!=""}}',
            "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
            "name": {"matches": f"^{COUNTER}$", "as": RATE_METRIC},
            "metricsQuery": f"sum(rate(<<.Series>>{{<<.LabelMatchers>>}}[{RATE_WINDOW}])) by (<<.GroupBy>>)"}


def queue_rule() -> dict:
    """prometheus-adapter's rule that serves QUEUE_METRIC per pod: seconds of queue wait per
    request over RATE_WINDOW (no request in the window: a wait of 0, not a division by zero)."""
    per_second = f"sum(rate(<<.Series>>{{<<.LabelMatchers>>}}[{RATE_WINDOW}])) by (<<.GroupBy>>)"
    requests = f"sum(rate({COUNTER}{{<<.LabelMatchers>>}}[{RATE_WINDOW}])) by (<<.GroupBy>>)"
    return {"seriesQuery": f'{QUEUE_COUNTER}{{namespace!="",pod!=""}}',
            "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
            "name": {"matches": f"^{QUEUE_COUNTER}$", "as": QUEUE_METRIC},
            "metricsQuery": f"{per_second} / clamp_min({requests}, 0.001) / 1000000"}
