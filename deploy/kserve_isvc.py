"""The KServe engine as a KServe InferenceService (serving.kserve.io/v1beta1), from deploy/layout.py.

A custom predictor: KServe runs our container (`python -m serving.kserve run`, the command `make serve
ENGINE=kserve` starts) from the same image as the TorchServe replicas, with the same user, read-only
root and writable /tmp; KServe adds the routing, its queue-proxy and request-based autoscaling.
Checked against KServe's CRD schema in tests/test_manifests.py (tests/kserve_crd.py).
"""
from __future__ import annotations

from deploy.layout import (BIND_ALL, IMAGE, IMAGE_ARTIFACT, IMAGE_CONFIG, KSERVE_CONTAINER, KSERVE_GRPC_PORT,
                           KSERVE_HTTP_PORT, KSERVE_ISVC, KSERVE_READY_PATH, MAX_REPLICAS, PROBE_PERIOD_S, PYTHON,
                           TMP_DIR)
from deploy.objects import container_security, empty_dir, metadata, pod_security
from serving.handler.artifact import TORCHSCRIPT_NAME

API_VERSION = "serving.kserve.io/v1beta1"


def kserve_command() -> list[str]:
    """The engine on the pod's address: REST on the port KServe routes, gRPC beside it."""
    return [PYTHON, "-m", "serving.kserve", "run", "--artifact", str(IMAGE_ARTIFACT / TORCHSCRIPT_NAME),
            "--address", BIND_ALL, "--port", str(KSERVE_HTTP_PORT), "--grpc-port", str(KSERVE_GRPC_PORT),
            "--config", str(IMAGE_CONFIG)]


def kserve_inference_service(image: str = IMAGE) -> dict:
    container = {
        "name": KSERVE_CONTAINER, "image": image, "imagePullPolicy": "IfNotPresent", "command": kserve_command(),
        "ports": [{"name": "http1", "containerPort": KSERVE_HTTP_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": KSERVE_READY_PATH, "port": KSERVE_HTTP_PORT},
                           "periodSeconds": PROBE_PERIOD_S},
        "securityContext": container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": str(TMP_DIR)}],
    }
    # No memory figures and KServe's default scaling target: this engine's footprint and rate are
    # not measured yet (benchmarks/footprint.py and the HPA's target measure TorchServe's replica).
    predictor = {"minReplicas": 1, "maxReplicas": MAX_REPLICAS, "securityContext": pod_security(),
                 "containers": [container], "volumes": [empty_dir("tmp", "256Mi")]}
    return {"apiVersion": API_VERSION, "kind": "InferenceService", "metadata": metadata(KSERVE_ISVC, "kserve"),
            "spec": {"predictor": predictor}}
