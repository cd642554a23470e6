"""deploy/kubernetes: schema-valid for a pinned Kubernetes, what the generator writes, and one with
the fleet (serving/fleet/topology.py, serving/fleet/frontdoor.py) in every probe command, port and path; the
replicas run with token auth behind their pod's key hop (serving/fleet/keyhop.py), and no file holds a key.
All but one are fast: no cluster, no server, no image build (Docker has no daemon here: the
Dockerfile is read, not built). The one slow test runs the replica with the ConfigMap's config on a
read-only filesystem, as the pod would (root only: it needs a mount namespace)."""
from __future__ import annotations

import copy
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from deploy import layout
from deploy import objects as kube
from deploy import manifests as gen
from serving.server.archive import build_archive
from serving.handler.artifact import ARCHIVE_NAME, TORCHSCRIPT_NAME
from serving.fleet import keyhop
from serving.fleet.frontdoor import (CLIENT_KEYS_MAP, HOP_SECRET_FILE, RotationState, client_keys_map, hop_secret_text,
                                     make_certificate, read_hop_secret, render, write_config)
from serving.server.properties import PRODUCTION_OVERRIDES, free_ports, read_properties, set_properties, token_auth_enabled
from serving.fleet.topology import HOP_SECRET_HEADER, Fleet, FrontDoor, ReplicaPorts

import kserve_crd
from fleet_helpers import plan_on_free_ports
from repo import REPO_ROOT, subprocess_env

KUBERNETES_VERSION = "1.33.0"   # the one version the manifests are checked against (strict: no unknown fields)
MANIFEST_DIR = REPO_ROOT / "deploy" / "kubernetes"
DOC = REPO_ROOT / "docs" / "kubernetes.md"
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"


def load_all() -> dict[str, list[dict]]:
    return {path.name: list(yaml.safe_load_all(path.read_text())) for path in sorted(MANIFEST_DIR.glob("*.yaml"))}


def objects(files: dict[str, list[dict]]) -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, over every file."""
    return {(doc["kind"], doc["metadata"]["name"]): doc for docs in files.values() for doc in docs}


@pytest.fixture
def cluster() -> dict[tuple[str, str], dict]:
    return objects(load_all())


def pod_spec(cluster: dict, name: str) -> dict:
    return cluster[("Deployment", name)]["spec"]["template"]["spec"]


def container(cluster: dict, deployment: str, name: str | None = None) -> dict:
    """The pod's container called name; without a name, its first (TorchServe, nginx)."""
    boxes = pod_spec(cluster, deployment)["containers"]
    return boxes[0] if name is None else next(box for box in boxes if box["name"] == name)


def container_port(cluster: dict, deployment: str, name: str) -> int:
    """The pod's port called name, in whichever container declares it."""
    return next(port["containerPort"] for box in pod_spec(cluster, deployment)["containers"]
                for port in box.get("ports", []) if port["name"] == name)


def configmap_file(cluster: dict, deployment: str, volume_name: str) -> tuple[PurePosixPath, str]:
    """Where the deployment's container sees its ConfigMap volume's one file, and the file's text."""
    pod = pod_spec(cluster, deployment)
    volume = next(v for v in pod["volumes"] if v["name"] == volume_name)
    ((key, text),) = cluster[("ConfigMap", volume["configMap"]["name"])]["data"].items()
    mount = next(m for m in container(cluster, deployment)["volumeMounts"] if m["name"] == volume_name)
    path = PurePosixPath(mount["mountPath"])
    return (path if mount.get("subPath") == key else path / key), text


def properties_of(text: str, tmp_path: Path) -> dict:
    path = tmp_path / "config.properties"
    path.write_text(text)
    return read_properties(path)


def open_paths_line(nginx_text: str) -> str:
    """The front server's path allowlist (a key hop's block, before it, has its own)."""
    return re.search(r"# The prediction paths, and nothing else.*\n\s*location ~ (.+) \{$", nginx_text, re.M).group(1)


def fleet_mismatches(cluster: dict, tmp_path: Path) -> list[str]:
    """Every probe command, port and path of the manifests that differs from what the fleet uses.
    The expected values come from serving/fleet/topology.py and serving/fleet/frontdoor.py, never typed here."""
    found = []
    fleet = Fleet.plan(1, run_dir=tmp_path / "fleet")
    replica, door = fleet.replicas[0], FrontDoor()
    torchserve = container(cluster, layout.REPLICA)
    config_path, config_text = configmap_file(cluster, layout.REPLICA, "config")
    properties = properties_of(config_text, tmp_path)

    # The commands: the fleet's, with the pod's config and run dir in place of the fleet's.
    def as_fleet(command: list[str]) -> list[str]:
        swapped = {str(config_path): str(replica.config), torchserve.get("workingDir"): str(replica.run_dir)}
        return [swapped.get(part, part) for part in command[1:]]

    for probe in ("readinessProbe", "startupProbe"):
        command = torchserve[probe]["exec"]["command"]
        if as_fleet(command) != replica.probe_command()[1:]:
            found.append(f"{probe} runs {command}, the fleet probes with {replica.probe_command()[1:]}")
    if as_fleet(torchserve["command"]) != replica.run_command()[1:]:
        found.append(f"the replica runs {torchserve['command']}, the fleet {replica.run_command()[1:]}")

    # Ports: the fleet's replica-0 ports, in the container, the config it reads, the Service and the policy.
    for api in ("inference", "management", "metrics"):
        expected = getattr(ReplicaPorts.derived(0), api)
        if urlsplit(properties[f"{api}_address"]).port != expected:
            found.append(f"{api}_address in the ConfigMap is not on the fleet's port {expected}")
    if container_port(cluster, layout.REPLICA, "metrics") != replica.ports.metrics:
        found.append(f"containerPort metrics is not the fleet's {replica.ports.metrics}")
    if container_port(cluster, layout.REPLICA, "key-hop") != replica.ports.key_hop:
        found.append(f"containerPort key-hop is not the fleet's {replica.ports.key_hop}")
    service_ports = cluster[("Service", layout.INFERENCE_SERVICE)]["spec"]["ports"]
    if [(p["port"], p["targetPort"]) for p in service_ports] != [(replica.ports.key_hop, "key-hop")]:
        found.append(f"the inference Service's ports {service_ports} are not the key hop alone")
    liveness = torchserve["livenessProbe"]["httpGet"]["port"]
    if liveness != replica.ports.key_hop:
        found.append(f"the liveness probe's port {liveness} is not the key hop's (the kubelet cannot reach loopback)")

    # The key hop: the fleet's hop for this replica, on its config and run dir, at the fleet's hop port.
    hop = container(cluster, layout.REPLICA, "key-hop")["command"]
    expected_hop = {"--config": str(config_path), "--run-dir": torchserve.get("workingDir"),
                    "--port": str(replica.ports.key_hop)}
    if hop[1:3] != ["-m", "serving.fleet.keyhop"] or {flag: hop[hop.index(flag) + 1] for flag in expected_hop
                                               if flag in hop} != expected_hop:
        found.append(f"the key hop runs {hop}, not serving.fleet.keyhop with {expected_hop}")

    # The front door: the fleet's ports and open paths; its upstream is the inference Service.
    nginx = container(cluster, layout.FRONTDOOR)
    nginx_path, nginx_text = configmap_file(cluster, layout.FRONTDOOR, "config")
    ports = {port["name"]: port["containerPort"] for port in nginx["ports"]}
    if ports != {"http": door.http_port, "https": door.tls_port}:
        found.append(f"the front door's container ports {ports} are not the fleet's")
    listens = set(re.findall(r"^\s*listen [\d.]+:(\d+)", nginx_text, re.M))
    if listens != {str(door.http_port), str(door.tls_port)}:
        found.append(f"nginx listens on {listens}, the fleet's front door on {door.http_port}, {door.tls_port}")
    fleet_paths = open_paths_line(render(fleet, RotationState()))
    if open_paths_line(nginx_text) != fleet_paths:
        found.append(f"the front door opens {open_paths_line(nginx_text)}, the fleet {fleet_paths}")
    upstream = re.findall(r"^\s*server ([\w.-]+):(\d+)", nginx_text, re.M)
    if upstream != [(layout.INFERENCE_SERVICE, str(replica.ports.key_hop))]:
        found.append(f"nginx's upstream {upstream} is not the inference Service on the key hop's port")
    if nginx["command"][-4:-2] != ["-c", str(nginx_path)]:
        found.append(f"nginx reads {nginx['command'][-4:-2]}, its ConfigMap is at {nginx_path}")
    return found


# --- schemas -------------------------------------------------------------------------------------
def test_every_manifest_validates_against_the_pinned_kubernetes_strictly():
    files = load_all()
    assert {doc["kind"] for docs in files.values() for doc in docs} >= {
        "Deployment", "Service", "ConfigMap", "NetworkPolicy", "HorizontalPodAutoscaler"}
    for name, docs in files.items():
        for doc in docs:
            if doc["kind"] != "InferenceService":   # KServe's kind: checked against its CRD below
                assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == "1.33", name


def inference_service(cluster: dict) -> dict:
    return cluster[("InferenceService", layout.KSERVE_ISVC)]


def test_the_kserve_inference_service_validates_against_kserves_crd_strictly(cluster):
    kserve_crd.validate(inference_service(cluster))


@pytest.mark.parametrize("mutation", ["misspelt field", "wrong type", "field of another kind"])
def test_the_crd_check_refuses_what_kserve_would_drop_or_refuse(cluster, mutation):
    """Strict: the API server would prune an unknown field silently (a misspelt readinessProbe
    would vanish); the check refuses it, and a wrong type."""
    import jsonschema

    service = copy.deepcopy(inference_service(cluster))
    predictor = service["spec"]["predictor"]
    if mutation == "misspelt field":
        predictor["containers"][0]["readinesProbe"] = predictor["containers"][0].pop("readinessProbe")
    elif mutation == "wrong type":
        predictor["minReplicas"] = "1"
    else:
        predictor["replicas"] = 2   # a Deployment's field, not a predictor's
    with pytest.raises(jsonschema.ValidationError):
        kserve_crd.validate(service)


def test_the_kserve_predictor_runs_the_engine_as_make_serve_does_on_the_image(cluster):
    """The command `make serve ENGINE=kserve` runs (python -m serving.kserve), on the exported file the
    Dockerfile copies, with kserve installed as make install adds it; probed on its readiness route."""
    from serving.kserve.launcher import COMMAND_MARK

    (container,) = inference_service(cluster)["spec"]["predictor"]["containers"]
    command = container["command"]
    assert " ".join(command[:4]) == f"{layout.PYTHON} -m {COMMAND_MARK}"
    option = dict(zip(command[4::2], command[5::2]))
    steps = instructions(DOCKERFILE.read_text())
    artifact = PurePosixPath(option["--artifact"])
    assert artifact.name == TORCHSCRIPT_NAME
    assert ("COPY", f"artifacts/{TORCHSCRIPT_NAME} {artifact.relative_to(layout.APP_DIR)}") in steps
    assert ("RUN", "pip install --no-cache-dir --require-hashes --no-deps -r requirements-kserve.lock") in steps
    copied = {source for op, args in steps if op == "COPY" for source in args.split()[:-1]}
    assert str(PurePosixPath(option["--config"]).relative_to(layout.APP_DIR)) in copied
    assert [port["containerPort"] for port in container["ports"]] == [int(option["--port"])]
    assert container["readinessProbe"]["httpGet"]["port"] == int(option["--port"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_validator_really_refuses_an_unknown_field():
    """Strict means strict: a misspelt field (readinesProbe) is an error, not ignored."""
    deployment = copy.deepcopy(objects(load_all())[("Deployment", layout.REPLICA)])
    torchserve = deployment["spec"]["template"]["spec"]["containers"][0]
    torchserve["readinesProbe"] = torchserve.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# --- the generator -------------------------------------------------------------------------------
def test_committed_manifests_are_what_the_generator_writes():
    assert gen.differences() == [], "run `make manifests` (python -m deploy.manifests) and commit deploy/kubernetes"


def test_check_exits_non_zero_naming_a_file_that_drifted(tmp_path):
    copied = tmp_path / "kubernetes"
    shutil.copytree(MANIFEST_DIR, copied)
    assert CliRunner().invoke(gen.main, ["--check", "--out-dir", str(copied)]).exit_code == 0
    hpa = copied / "hpa.yaml"
    hpa.write_text(hpa.read_text().replace("maxReplicas: ", "maxReplicas: 1"))
    result = CliRunner().invoke(gen.main, ["--check", "--out-dir", str(copied)])
    assert result.exit_code == 1 and "hpa.yaml: differs" in result.output, result.output


def test_the_docs_figures_are_the_generators_and_check_names_a_drifted_one(tmp_path):
    """docs/kubernetes.md's memory and autoscaling figures are written by the generator from the
    measurements (footprint.json, results.json); a hand edit is drift that --check names."""
    text = DOC.read_text()
    block = text.split(gen.DOC_BEGIN, 1)[1].split(gen.DOC_END, 1)[0]
    memory, target = kube.measured_memory(), kube.measured_target()
    assert f"{memory.request_mib}Mi" in block and f"{memory.limit_mib}Mi" in block
    assert f"target is {target.per_pod} requests/s" in block
    doc = tmp_path / "kubernetes.md"
    doc.write_text(text.replace(f"{memory.request_mib}Mi", "1600Mi", 1))
    result = CliRunner().invoke(gen.main, ["--check", "--doc", str(doc)])
    assert result.exit_code == 1 and "kubernetes.md: its k8s block differs" in result.output, result.output


PINNED = "registry.example:5000/team/digitserve:0.1.0@sha256:" + "0123456789abcdef" * 4


def images(files: dict[str, list[dict]]) -> set[str]:
    """Every container's image, in every object of the files."""
    return set(re.findall(r'"image": "([^"]+)"', json.dumps(files)))


def test_a_production_rendering_runs_the_image_pinned_by_digest_and_refuses_a_tag(tmp_path):
    """Issue 27 point 14: the manifests named the image by a tag, which a push can move to other bytes.
    `--image` takes a reference pinned by digest, and every container of every object runs it; a bare tag
    is refused in one line, nothing written; deploy/kubernetes (the development rendering) is never its target."""
    out, doc = tmp_path / "production", tmp_path / "kubernetes.md"
    doc.write_text(DOC.read_text())
    result = CliRunner().invoke(gen.main, ["--image", PINNED, "--out-dir", str(out), "--doc", str(doc)])
    assert result.exit_code == 0, result.output
    files = {path.name: list(yaml.safe_load_all(path.read_text())) for path in sorted(out.glob("*.yaml"))}
    assert set(files) == set(load_all()) and images(files) == {PINNED}
    assert images(load_all()) == {layout.IMAGE}   # the committed ones: the development tag
    for tag in ("digitserve:0.1.0", "registry.example/digitserve", "digitserve@sha256:" + "0" * 63, "x@sha256:" + "G" * 64):
        refused = CliRunner().invoke(gen.main, ["--image", tag, "--out-dir", str(tmp_path / "tag")])
        assert refused.exit_code == 1 and "not pinned by digest" in refused.output, (tag, refused.output)
        assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "tag").exists()
    over = CliRunner().invoke(gen.main, ["--image", PINNED])   # the default out dir: deploy/kubernetes
    assert over.exit_code == 1 and "another --out-dir" in over.output, over.output
    assert gen.differences() == []


def test_the_autoscaling_target_is_a_share_of_the_measured_rate(tmp_path):
    results = json.loads(layout.BENCH_RESULTS.read_text())
    [row] = [name for name in results["serving"] if name.startswith(layout.BENCH_SERVING_ROW)]
    for run in results["serving"][row]["runs"]:
        run["requests_per_s"] = 1234.5 if run["connections"] == layout.TARGET_CLIENTS else 1.0
    changed = tmp_path / "results.json"
    changed.write_text(json.dumps(results))
    target = kube.measured_target(changed)
    assert (target.measured, target.per_pod) == (1234.5, int(1234.5 * layout.TARGET_SHARE) // 10 * 10)
    hpa = yaml.safe_load((MANIFEST_DIR / "hpa.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == str(kube.measured_target().per_pod)
    results["serving"].pop(row)
    changed.write_text(json.dumps(results))
    with pytest.raises(layout.ManifestError, match="run `make bench`"):
        kube.measured_target(changed)


# --- one topology ----------------------------------------------------------------------------------
def test_probe_commands_ports_and_paths_are_the_fleets(cluster, tmp_path):
    assert fleet_mismatches(cluster, tmp_path) == []


def swap(command: list[str], old: str, new: str) -> None:
    command[command.index(old)] = new


MUTATIONS = {
    "readiness probe runs another command": lambda c: swap(
        container(c, layout.REPLICA)["readinessProbe"]["exec"]["command"], "ready", "start"),
    "startup probe reads another config": lambda c: swap(
        container(c, layout.REPLICA)["startupProbe"]["exec"]["command"], str(layout.POD_REPLICA.config), "/etc/other.properties"),
    "run dir is not the working dir": lambda c: container(c, layout.REPLICA).update(workingDir="/srv/elsewhere"),
    "metrics containerPort": lambda c: container(c, layout.REPLICA)["ports"][0].update(containerPort=8082),
    "Service targets TorchServe's inference port": lambda c: c[("Service", layout.INFERENCE_SERVICE)]["spec"]["ports"][
        0].update(port=ReplicaPorts.derived(0).inference, targetPort=ReplicaPorts.derived(0).inference),
    "key hop reads another run dir": lambda c: swap(
        container(c, layout.REPLICA, "key-hop")["command"], str(layout.RUN_DIR), "/srv/elsewhere"),
    "metrics address in the ConfigMap": lambda c: c[("ConfigMap", f"{layout.REPLICA}-config")]["data"].update(
        {"config.properties": c[("ConfigMap", f"{layout.REPLICA}-config")]["data"]["config.properties"].replace(
            f":{ReplicaPorts.derived(0).metrics}", ":8082")}),
    "management port in the Service": lambda c: c[("Service", layout.INFERENCE_SERVICE)]["spec"]["ports"].append(
        {"name": "management", "port": 9081, "targetPort": "management"}),
    "front door listens elsewhere": lambda c: container(c, layout.FRONTDOOR)["ports"][0].update(containerPort=80),
    "front door opens /metrics": lambda c: c[("ConfigMap", f"{layout.FRONTDOOR}-config")]["data"].update(
        {"nginx.conf": c[("ConfigMap", f"{layout.FRONTDOOR}-config")]["data"]["nginx.conf"].replace(
            "/infer)$", "/infer|/metrics)$")}),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_a_value_that_parts_from_the_fleet_is_found(cluster, tmp_path, mutation):
    """The check above can fail: each value changed in a copy of the manifests is reported."""
    mutated = copy.deepcopy(cluster)
    MUTATIONS[mutation](mutated)
    assert fleet_mismatches(mutated, tmp_path) != []


# --- security ------------------------------------------------------------------------------------
@pytest.mark.parametrize("deployment", [layout.REPLICA, layout.FRONTDOOR])
def test_pods_run_non_root_on_a_read_only_root_with_writable_empty_dirs(cluster, deployment):
    pod = pod_spec(cluster, deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for each in pod["containers"]:
        context = each["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]} and context["runAsNonRoot"] is True
        writable = {mount["mountPath"] for mount in each["volumeMounts"]
                    if not mount.get("readOnly") and "emptyDir" in volumes[mount["name"]]}
        assert not {mount["mountPath"] for mount in each["volumeMounts"] if not mount.get("readOnly")} - writable
    box = pod["containers"][0]
    writable = {mount["mountPath"] for mount in box["volumeMounts"]
                if not mount.get("readOnly") and "emptyDir" in volumes[mount["name"]]}
    if deployment == layout.REPLICA:   # where TorchServe writes: its run dir (pid, logs, unpacked model), /tmp
        assert {box["workingDir"], str(layout.TMP_DIR)} <= writable
        properties_text = cluster[("ConfigMap", f"{layout.REPLICA}-config")]["data"]["config.properties"]
        assert f"workflow_store={layout.RUN_DIR}/" in properties_text
    else:                           # nginx: its run dir (pid, access log) and its temp files
        nginx_dir = box["command"][box["command"].index("-p") + 1]
        assert {nginx_dir, f"{nginx_dir}/tmp"} <= writable


def key_material(texts: dict[str, str]) -> list[str]:
    """Every key (or place for one) found in the manifests' texts: a Secret object, a PEM block, an
    Authorization header, a client key in nginx's map (only `default` and `include` may be there)."""
    found = []
    for name, text in texts.items():
        if re.search(r"^kind: Secret$", text, re.M) or "BEGIN" in text:
            found.append(f"{name}: a Secret or PEM block")
        if re.search(r"Bearer [\w=-]", text):   # a key after it (config.production.properties' header shows `$(jq ...)`)
            found.append(f"{name}: an Authorization header with a key")
        if re.search(rf'(\$hop_secret|{HOP_SECRET_HEADER})\s+"[^"]', text, re.I):   # the hop secret's value
            found.append(f"{name}: the key hops' secret")
        for block in re.findall(r"map \$http_x_api_key \$client_allowed \{\n(.*?)\n\s*\}", text, re.S):
            entries = [line.split("#")[0].strip() for line in block.splitlines()]
            found += [f"{name}: map entry {entry}" for entry in entries
                      if entry and not re.fullmatch(r"(default [01]|include \S+);", entry)]
    return found


def manifest_texts() -> dict[str, str]:
    return {path.name: path.read_text() for path in MANIFEST_DIR.glob("*.yaml")}


def test_no_manifest_holds_a_key(cluster):
    """Keys come from Secrets made in the cluster (docs/kubernetes.md) or from TorchServe inside
    each pod, never from these files: the front door includes its client keys from a mounted Secret."""
    texts = manifest_texts()
    assert key_material(texts) == []
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod_spec(cluster, layout.FRONTDOOR)["volumes"] if "secret" in v}
    assert secrets == {"tls": layout.TLS_SECRET, "api-keys": layout.API_KEYS_SECRET, "hop-secret": layout.HOP_SECRET_SECRET}
    mount = next(m for m in container(cluster, layout.FRONTDOOR)["volumeMounts"] if m["name"] == "api-keys")
    _, nginx_text = configmap_file(cluster, layout.FRONTDOOR, "config")
    assert f"include {mount['mountPath']}/{layout.API_KEYS_FILE};" in nginx_text and mount["readOnly"]
    assert re.search(r"map \$http_x_api_key \$client_allowed \{\n\s*default 0;", nginx_text)   # a key is required

    # The check can fail: a key in the map, or an added header, is found.
    leaked = {"frontdoor-config.yaml": texts["frontdoor-config.yaml"].replace(
        "default 0;", 'default 0;\n          "client-key-0123456789abcdef" 1;')}
    assert key_material(leaked) == ["frontdoor-config.yaml: map entry \"client-key-0123456789abcdef\" 1;"]
    assert key_material({"x.yaml": 'proxy_set_header Authorization "Bearer k";'}) != []
    assert key_material({"x.yaml": hop_secret_text("0" * 64)}) != []
    assert key_material({"x.yaml": f'proxy_set_header {HOP_SECRET_HEADER} "{"0" * 64}";'}) != []


def test_both_pods_mount_the_hop_secret_and_no_config_map_holds_it(cluster):
    """Issue 27 point 11: the pods' key hops (on the pod's address) require the front door's secret
    header. The secret is a Secret made in the cluster (docs/kubernetes.md), mounted read-only in the
    front door and in the replica's key hop (group-readable at most), included by both nginx configs:
    the front door sends it, the hop command names the file; no ConfigMap holds a value."""
    path = layout.HOP_SECRET_DIR / HOP_SECRET_FILE
    for deployment, box in ((layout.FRONTDOOR, "nginx"), (layout.REPLICA, "key-hop")):
        volumes = [v for v in pod_spec(cluster, deployment)["volumes"]
                   if v.get("secret", {}).get("secretName") == layout.HOP_SECRET_SECRET]
        assert len(volumes) == 1 and volumes[0]["secret"]["defaultMode"] & 0o337 == 0, (deployment, volumes)
        mounts = [m for m in container(cluster, deployment, box)["volumeMounts"] if m["name"] == volumes[0]["name"]]
        assert [(m["mountPath"], m["readOnly"]) for m in mounts] == [(str(layout.HOP_SECRET_DIR), True)], mounts
    assert not [m for m in container(cluster, layout.REPLICA)["volumeMounts"] if m["mountPath"] == str(layout.HOP_SECRET_DIR)]
    hop = container(cluster, layout.REPLICA, "key-hop")["command"]
    assert hop[hop.index("--secret-file") + 1] == str(path)
    _, nginx_text = configmap_file(cluster, layout.FRONTDOOR, "config")
    assert f"include {path};" in nginx_text and f"proxy_set_header {HOP_SECRET_HEADER} $hop_secret;" in nginx_text
    config_maps = {name: yaml.dump(obj["data"]) for (kind, name), obj in cluster.items() if kind == "ConfigMap"}
    assert config_maps and key_material(config_maps) == []


@pytest.mark.skipif(not Path("/usr/sbin/nginx").exists(), reason="needs nginx (make system)")
def test_the_fleets_nginx_config_includes_its_client_keys_as_the_cluster_does(tmp_path):
    """`make fleet` with FLEET_API_KEYS: nginx.conf names the map file, written beside it (private),
    and holds no key itself; `nginx -t` (in write_config) accepts both."""
    keys = tmp_path / "client-keys.txt"
    keys.write_text("# allowed clients\nclient-key-0123456789abcdef\n")
    fleet = plan_on_free_ports(tmp_path / "fleet", REPO_ROOT / "config.properties", replicas=1, api_keys_file=keys)
    make_certificate(fleet)
    text = write_config(fleet, RotationState()).read_text()
    included = fleet.nginx_dir / CLIENT_KEYS_MAP
    # (the replicas' hops hold their inference keys, private: every fleet runs token auth)
    assert f"include {included};" in text and "client-key-0123456789abcdef" not in text
    assert included.read_text() == '"client-key-0123456789abcdef" 1;\n' and included.stat().st_mode & 0o077 == 0


def test_the_front_door_pod_logs_to_stdout_and_never_the_query_string(cluster):
    """Issue 27 point 5: an access log file grows in the pod's emptyDir (8,000 keyless requests with
    long query strings wrote 61 MiB in 2.4 s) until the pod is evicted. It logs to stdout, the path
    ($uri) without the query."""
    _, text = configmap_file(cluster, layout.FRONTDOOR, "config")
    logs = re.findall(r"^\s*access_log\s+(\S+)", text, re.M)
    assert logs == ["/dev/stdout"], logs
    log_format = re.search(r"log_format fleet (.*?);", text, re.S).group(1)
    assert "$uri" in log_format and not re.search(r"\$(request|request_uri|args|query_string)\b", log_format), log_format


def test_the_front_door_pod_runs_one_nginx_worker_whatever_cores_the_node_has(cluster):
    """nginx's `auto` counts the node's cores, not the pod's tenth of one: a 64-core node would get 64
    workers. One, at the default priority (the pod runs as a user that may not raise it)."""
    _, text = configmap_file(cluster, layout.FRONTDOOR, "config")
    assert re.findall(r"^\s*worker_processes\s+(\S+);", text, re.M) == ["1"]
    assert "worker_priority" not in text


def test_the_replica_pods_torchserve_logs_to_stdout_and_no_file(cluster, tmp_path):
    """Issue 27 point 5: TorchServe 0.12's own log4j2.xml writes five rolling files of up to 100 MB
    (plus a compressed one per day, never deleted) under LOG_LOCATION, the run dir's emptyDir. The
    pod's config names a log4j2 file that has Console appenders alone, and the image has it. (Run
    by hand with a real TorchServe, that file wrote no file where the default wrote five.)"""
    import xml.etree.ElementTree as ElementTree

    text = cluster[("ConfigMap", f"{layout.REPLICA}-config")]["data"]["config.properties"]
    vmargs = properties_of(text, tmp_path)["vmargs"].split()
    assert f"-Dlog4j.configurationFile=file://{layout.APP_DIR / layout.POD_LOG_CONFIG}" in vmargs
    root = ElementTree.parse(REPO_ROOT / layout.POD_LOG_CONFIG).getroot()
    appenders = root.find("Appenders")
    assert [appender.tag for appender in appenders] == ["Console"]
    console = appenders[0].get("name")
    refs = {ref.get("ref") for ref in root.iter("AppenderRef")}
    assert refs == {console}
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^COPY serving/ serving/", dockerfile, re.M)


def test_every_empty_dir_is_bounded(cluster):
    """An emptyDir without a sizeLimit can fill the node's disk; with one, a runaway write evicts
    only its own pod."""
    for (kind, name), obj in cluster.items():
        if kind != "Deployment":
            continue
        for volume in obj["spec"]["template"]["spec"]["volumes"]:
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), (name, volume["name"])


def key_gaps(cluster: dict, tmp_path: Path) -> list[str]:
    """How the replica pods fall short of token auth behind their own key hop: the config's
    production overrides, TorchServe's APIs on loopback, the Service on the hop's port."""
    found = []
    _, config_text = configmap_file(cluster, layout.REPLICA, "config")
    properties = properties_of(config_text, tmp_path)
    if not token_auth_enabled(properties):
        found.append("the replicas run with token authorization off")
    found += [f"{key}={properties.get(key)!r}, production says {value!r}" for key, value in PRODUCTION_OVERRIDES.items()
              if properties.get(key) != value]
    for api in ("inference", "management"):
        if urlsplit(properties[f"{api}_address"]).hostname != "127.0.0.1":
            found.append(f"TorchServe's {api} API listens on {properties[f'{api}_address']}, not the pod's loopback")
    torchserve_ports = {urlsplit(properties[f"{api}_address"]).port for api in ("inference", "management", "metrics")}
    torchserve_ports |= {int(properties[key]) for key in ("grpc_inference_port", "grpc_management_port")}
    for port in cluster[("Service", layout.INFERENCE_SERVICE)]["spec"]["ports"]:
        target = port["targetPort"]
        number = target if isinstance(target, int) else container_port(cluster, layout.REPLICA, target)
        owner = next((box["name"] for box in pod_spec(cluster, layout.REPLICA)["containers"]
                      for declared in box.get("ports", []) if declared["containerPort"] == number), None)
        if number in torchserve_ports or owner != "key-hop":
            found.append(f"the Service targets port {target} ({owner or 'no container'}), not the key hop")
    return found


def test_replicas_run_with_token_auth_behind_their_key_hop(cluster, tmp_path):
    assert key_gaps(cluster, tmp_path) == []


KEY_MUTATIONS = {
    "token auth off": lambda c: c[("ConfigMap", f"{layout.REPLICA}-config")]["data"].update(
        {"config.properties": c[("ConfigMap", f"{layout.REPLICA}-config")]["data"]["config.properties"].replace(
            "disable_token_authorization=false", "disable_token_authorization=true")}),
    "inference on the pod's address": lambda c: c[("ConfigMap", f"{layout.REPLICA}-config")]["data"].update(
        {"config.properties": c[("ConfigMap", f"{layout.REPLICA}-config")]["data"]["config.properties"].replace(
            "inference_address=http://127.0.0.1", "inference_address=http://0.0.0.0")}),
    "Service on TorchServe's metrics port": lambda c: c[("Service", layout.INFERENCE_SERVICE)]["spec"]["ports"][0].update(
        targetPort="metrics"),
    "Service on TorchServe's inference port": lambda c: c[("Service", layout.INFERENCE_SERVICE)]["spec"]["ports"][0].update(
        targetPort=ReplicaPorts.derived(0).inference),
}


@pytest.mark.parametrize("mutation", KEY_MUTATIONS, ids=list(KEY_MUTATIONS))
def test_a_replica_pod_without_its_key_is_found(cluster, tmp_path, mutation):
    mutated = copy.deepcopy(cluster)
    KEY_MUTATIONS[mutation](mutated)
    assert key_gaps(mutated, tmp_path) != []


def ports_open_outside_namespace(policy: dict) -> set:
    """Ports of the policy's pods that a pod of another namespace (or any address) may reach."""
    opened = set()
    for rule in policy["spec"].get("ingress", []):
        peers = rule.get("from")
        outside = peers is None or any("namespaceSelector" in peer or "ipBlock" in peer for peer in peers)
        if outside:
            opened |= {port["port"] for port in rule.get("ports", [])} or {"every port"}
    return opened


def test_management_and_metrics_stay_inside_the_namespace(cluster):
    policy = cluster[("NetworkPolicy", layout.REPLICA)]
    labels = cluster[("Deployment", layout.REPLICA)]["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in policy["spec"]["policyTypes"]
    metrics = container_port(cluster, layout.REPLICA, "metrics")
    assert ports_open_outside_namespace(policy) == set()
    hop_rules = [rule for rule in policy["spec"]["ingress"]
                 if container_port(cluster, layout.REPLICA, "key-hop") in {p["port"] for p in rule["ports"]}]
    door_labels = cluster[("Deployment", layout.FRONTDOOR)]["spec"]["template"]["metadata"]["labels"]
    assert [rule["from"] for rule in hop_rules] == [[{"podSelector": {"matchLabels": door_labels}}]]
    in_namespace = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert metrics in in_namespace
    # Management is on the pod's loopback: no container declares it, no rule admits it.
    management = ReplicaPorts.derived(0).management
    assert management not in in_namespace and not [
        port for box in pod_spec(cluster, layout.REPLICA)["containers"] for port in box.get("ports", [])
        if port["containerPort"] == management]

    opened = copy.deepcopy(policy)   # the check can fail: one namespaceSelector opens them
    opened["spec"]["ingress"][1]["from"].append({"namespaceSelector": {}})
    assert metrics in ports_open_outside_namespace(opened)


# The cluster's DNS pods as a peer, written out here (not read from deploy/): what kubeadm, kind, GKE and EKS label them.
DNS_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}


def egress_beyond(cluster: dict, deployment: str, allowed: list[tuple[dict, dict]]) -> list[str]:
    """What the deployment's pods may reach beyond `allowed` (peer, port) pairs, by their policy."""
    labels = cluster[("Deployment", deployment)]["spec"]["template"]["metadata"]["labels"]
    policies = [policy for (kind, _), policy in cluster.items() if kind == "NetworkPolicy"
                and policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
                and "Egress" in policy["spec"]["policyTypes"]]
    if not policies:
        return [f"{deployment}: no egress policy selects it: it may reach anything"]
    found = []
    for rule in (rule for policy in policies for rule in policy["spec"].get("egress", [])):
        if "to" not in rule or "ports" not in rule:
            found.append(f"{deployment}: a rule without `to` or `ports` opens every peer or port: {rule}")
            continue
        found += [f"{deployment}: {peer} port {port}" for peer in rule["to"] for port in rule["ports"]
                  if (peer, port) not in allowed]
    return found


def allowed_egress(cluster: dict) -> dict[str, list[tuple[dict, dict]]]:
    """Issue 27 point 14: the front door reaches the replica pods' key hop port and DNS; the replicas nothing."""
    replica_pods = {"podSelector": {"matchLabels": cluster[("Deployment", layout.REPLICA)]["spec"]["selector"]["matchLabels"]}}
    hop = {"port": container_port(cluster, layout.REPLICA, "key-hop"), "protocol": "TCP"}
    dns = [(DNS_PEER, {"port": 53, "protocol": protocol}) for protocol in ("UDP", "TCP")]
    return {layout.FRONTDOOR: [(replica_pods, hop), *dns], layout.REPLICA: []}


def test_egress_the_front_door_reaches_the_key_hops_and_dns_the_replicas_nothing(cluster):
    """Issue 27 point 14: no egress policy let a compromised pod reach anything (the cloud's metadata
    service, the API server, the internet). The replicas fetch nothing (allowed_urls=^$; their key hop
    and workers talk over loopback and Unix sockets, which `test_the_replica_serves_from_a_read_only_root_as_the_pod_does`
    runs in a network namespace of loopback alone); the front door needs its upstream and the name of it."""
    allowed = allowed_egress(cluster)
    for deployment, pairs in allowed.items():
        assert egress_beyond(cluster, deployment, pairs) == []

    opened = copy.deepcopy(cluster)   # the check can fail: an open rule, a port more, a policy less
    opened[("NetworkPolicy", layout.REPLICA)]["spec"]["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
    assert egress_beyond(opened, layout.REPLICA, allowed[layout.REPLICA]) != []
    opened = copy.deepcopy(cluster)
    opened[("NetworkPolicy", layout.FRONTDOOR)]["spec"]["egress"][0]["ports"].append({"port": 9081, "protocol": "TCP"})
    assert egress_beyond(opened, layout.FRONTDOOR, allowed[layout.FRONTDOOR]) != []
    opened[("NetworkPolicy", layout.FRONTDOOR)]["spec"]["policyTypes"] = ["Ingress"]
    assert egress_beyond(opened, layout.FRONTDOOR, allowed[layout.FRONTDOOR]) != []


# --- scaling and resources -------------------------------------------------------------------------
def test_autoscaler_scales_on_a_request_rate_that_the_adapter_rule_serves(cluster):
    hpa = cluster[("HorizontalPodAutoscaler", layout.REPLICA)]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": layout.REPLICA}
    [metric] = [m for m in hpa["metrics"] if m["pods"]["metric"]["name"] == layout.RATE_METRIC]
    assert metric["type"] in ("Pods", "Object", "External") and metric["pods"]["target"]["type"] == "AverageValue"
    rule = kube.adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    counter = re.fullmatch(r"\^(\w+)\$", rule["name"]["matches"]).group(1)
    assert re.search(r"\brate\(<<\.Series>>\{<<\.LabelMatchers>>\}\[\d+m\]\)", rule["metricsQuery"])
    declared = yaml.safe_load((REPO_ROOT / "serving" / "server" / "metrics.yaml").read_text())["ts_metrics"]["counter"]
    assert counter in {entry["name"] for entry in declared}   # TorchServe exports it in prometheus mode


def test_autoscaler_scales_on_queued_work_too_from_declared_counters(cluster):
    """Issue 27 point 3: a request rate misses cost (explanations fill the queues at a low rate).
    The HPA also scales on the queue wait per request, which an adapter rule serves from
    TorchServe's queue-latency counter over its request counter, both declared."""
    hpa = cluster[("HorizontalPodAutoscaler", layout.REPLICA)]["spec"]
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["metrics"]}
    assert set(targets) == {layout.RATE_METRIC, layout.QUEUE_METRIC}, targets
    assert targets[layout.QUEUE_METRIC] == {"type": "AverageValue", "averageValue": layout.QUEUE_TARGET}
    rule = kube.queue_rule()
    assert rule["name"]["as"] == layout.QUEUE_METRIC
    counters = {rule["name"]["matches"].strip("^$"), *re.findall(r"\b(ts_\w+)\{", rule["metricsQuery"])}
    assert counters == {layout.QUEUE_COUNTER, layout.COUNTER}, rule["metricsQuery"]
    declared = yaml.safe_load((REPO_ROOT / "serving" / "server" / "metrics.yaml").read_text())["ts_metrics"]["counter"]
    assert counters <= {entry["name"] for entry in declared}


def test_the_docs_show_the_adapter_rule_the_autoscaler_needs():
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    rules = [yaml.safe_load(block) for block in blocks if "seriesQuery" in block]
    assert rules and rules[0]["rules"] == [kube.adapter_rule(), kube.queue_rule()]
    assert f"schema-checked against Kubernetes {KUBERNETES_VERSION.rsplit('.', 1)[0]}" in DOC.read_text()


def test_memory_is_the_measured_footprint_with_headroom(cluster):
    resources = container(cluster, layout.REPLICA)["resources"]
    memory = kube.measured_memory()
    request = int(resources["requests"]["memory"].removesuffix("Mi"))
    limit = int(resources["limits"]["memory"].removesuffix("Mi"))
    assert memory.measured_mib <= request < memory.measured_mib + layout.MEMORY_STEP_MIB
    assert request * layout.HEADROOM <= limit < request * layout.HEADROOM + layout.MEMORY_STEP_MIB


# --- the image -------------------------------------------------------------------------------------
def instructions(dockerfile: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    return [tuple(line.split(None, 1)) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_the_dockerfile_builds_what_the_manifests_run(cluster):
    """Read, not built: no Docker daemon here."""
    steps = instructions(DOCKERFILE.read_text())
    text = " ".join(f"{op} {args}" for op, args in steps)
    pins = {re.split(r"[=<>]", dep)[0]: dep for dep in tomllib.loads(
        (REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert pins["torch"] in text and pins["torchvision"] in text   # the pins of pyproject.toml, CPU wheels
    assert ("WORKDIR", str(layout.APP_DIR)) in steps
    archive = f"{layout.IMAGE_MODEL_STORE.relative_to(layout.APP_DIR)}/{ARCHIVE_NAME}"
    assert ("COPY", f"model_store/{ARCHIVE_NAME} {archive}") in steps   # what `make archive` wrote
    assert ("USER", f"{layout.USER_ID}:{layout.USER_ID}") in steps and f"--uid {layout.USER_ID}" in text
    assert pod_spec(cluster, layout.REPLICA)["securityContext"]["runAsUser"] == layout.USER_ID
    cmd = yaml.safe_load(dict(steps)["CMD"])
    assert cmd == container(cluster, layout.REPLICA)["command"]
    made = re.search(r"mkdir -p ([^&]*)&& chown -R \S+ ([^&]*)", text)   # the mount points, the user's
    assert {str(layout.RUN_DIR), str(layout.FRONTDOOR_DIR / "nginx" / "tmp")} <= set(made.group(1).split())
    assert {str(layout.RUN_DIR), str(layout.FRONTDOOR_DIR)} <= set(made.group(2).split())
    exposed = {int(port) for port in dict(steps)["EXPOSE"].split()}
    assert exposed == {port["containerPort"] for deployment in (layout.REPLICA, layout.FRONTDOOR)
                       for box in pod_spec(cluster, deployment)["containers"] for port in box.get("ports", [])}
    assert str(layout.HOP_DIR) in made.group(1).split() and str(layout.HOP_DIR) in made.group(2).split()


def test_the_base_image_is_a_build_argument_the_docs_pin_by_digest():
    """Issue 27 point 14: the base is a tag (no registry reachable here to read its digest, none invented);
    `--build-arg BASE=...@sha256:...` pins it without editing the file, as docs/kubernetes.md says."""
    steps = instructions(DOCKERFILE.read_text())
    base = next(args for op, args in steps if op == "ARG" and args.startswith("BASE="))
    assert steps.index(("FROM", "${BASE}")) > steps.index(("ARG", base)) and "@" not in base
    assert re.search(r"--build-arg BASE=\S+@sha256:", DOC.read_text())


NEEDS_NGINX = pytest.mark.skipif(shutil.which("openssl") is None or not Path("/usr/sbin/nginx").exists(),
                                 reason="needs nginx and openssl (make system)")


def pod_nginx_config(cluster: dict, tmp_path: Path, replace: dict[str, str] | None = None) -> Path:
    """The ConfigMap's nginx config with the pod's directories moved under tmp_path and the
    Service's name (which only the cluster resolves) replaced by loopback (then `replace`'s pairs)."""
    _, text = configmap_file(cluster, layout.FRONTDOOR, "config")
    tls = tmp_path / "tls"
    tls.mkdir()
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=t",
                           "-keyout", str(tls / "tls.key"), "-out", str(tls / "tls.crt")], capture_output=True)
    assert made.returncode == 0
    nginx_dir = tmp_path / "frontdoor" / "nginx"
    (nginx_dir / "tmp").mkdir(parents=True)   # the pod's two emptyDirs
    api_keys = tmp_path / "api-keys"          # the client keys Secret, as docs/kubernetes.md makes it
    api_keys.mkdir()
    (api_keys / layout.API_KEYS_FILE).write_text(client_keys_map(["client-key-0123456789abcdef"]))
    hop_secret = tmp_path / "hop-secret"      # the hop secret, as docs/kubernetes.md makes it
    hop_secret.mkdir()
    (hop_secret / HOP_SECRET_FILE).write_text(hop_secret_text("0123456789abcdef" * 4))
    for old, new in {str(layout.FRONTDOOR_DIR): str(tmp_path / "frontdoor"), str(layout.TLS_DIR): str(tls),
                     str(layout.API_KEYS_DIR): str(api_keys), str(layout.HOP_SECRET_DIR): str(hop_secret),
                     f"{layout.INFERENCE_SERVICE}:": "127.0.0.1:", str(layout.APP_DIR): str(REPO_ROOT),
                     **(replace or {})}.items():
        text = text.replace(old, new)
    (nginx_dir / "nginx.conf").write_text(text)
    return nginx_dir / "nginx.conf"


@NEEDS_NGINX
def test_nginx_accepts_the_front_doors_config_in_the_pods_layout(cluster, tmp_path):
    config = pod_nginx_config(cluster, tmp_path)
    checked = subprocess.run(["/usr/sbin/nginx", "-t", "-p", str(config.parent), "-c", str(config)],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert {path.name for path in (config.parent / "tmp").iterdir()} >= {"body", "proxy"}   # nginx made them itself


@NEEDS_NGINX
def test_the_cluster_front_door_refuses_plain_http_and_opens_only_tls(cluster, tmp_path):
    """Issue 27 point 7: in the cluster, client keys would cross plain HTTP (8088) in the clear.
    The real nginx on the ConfigMap's config answers it 426 JSON and proxies nothing (a listener
    in the upstream's place sees no connection); the Service and NetworkPolicy open TLS alone."""
    door = FrontDoor()
    http_port, tls_port, upstream_port = free_ports(3)
    upstream = socket.create_server(("127.0.0.1", upstream_port))
    upstream.settimeout(1)
    config = pod_nginx_config(cluster, tmp_path, {
        f"listen {layout.BIND_ALL}:{door.http_port};": f"listen 127.0.0.1:{http_port};",
        f"listen {layout.BIND_ALL}:{door.tls_port} ssl;": f"listen 127.0.0.1:{tls_port} ssl;",
        f"127.0.0.1:{ReplicaPorts.derived(0).key_hop};": f"127.0.0.1:{upstream_port};"})
    nginx = subprocess.Popen(["/usr/sbin/nginx", "-p", str(config.parent), "-c", str(config), "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        answer = None
        for _ in range(50):   # nginx listening within 5 s
            try:
                connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
                connection.request("POST", "/predictions/mnist", body=b"x",
                                   headers={"X-API-Key": "client-key-0123456789abcdef"})
                response = connection.getresponse()
                answer = (response.status, json.loads(response.read()))
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        assert answer and answer[0] == 426 and answer[1]["code"] == "https_required", answer
        with pytest.raises(TimeoutError):
            upstream.accept()   # nothing was proxied
    finally:
        nginx.terminate()
        nginx.wait(10)
        upstream.close()
    service = cluster[("Service", layout.FRONTDOOR)]["spec"]["ports"]
    policy = cluster[("NetworkPolicy", layout.FRONTDOOR)]["spec"]["ingress"]
    assert [port["port"] for port in service] == [door.tls_port], service
    assert [port["port"] for rule in policy for port in rule["ports"]] == [door.tls_port], policy


def hop_secret_file(tmp_path: Path) -> Path:
    """A hop secret file as the Secret mounts it (docs/kubernetes.md makes one)."""
    path = tmp_path / HOP_SECRET_FILE
    path.write_text(hop_secret_text("0123456789abcdef" * 4))
    return path


def hop_config(tmp_path: Path, cluster: dict, token_auth: bool = True) -> Path:
    """The ConfigMap's config with the image's run dir under tmp_path (and token auth as asked)."""
    _, text = configmap_file(cluster, layout.REPLICA, "config")
    config = tmp_path / "config.properties"
    config.write_text(set_properties(text, {"disable_token_authorization": str(not token_auth).lower()}))
    return config


@pytest.mark.skipif(not Path("/usr/sbin/nginx").exists(), reason="needs nginx (make system)")
def test_nginx_accepts_the_key_hop_the_pod_runs_and_it_adds_the_current_key(cluster, tmp_path):
    """serving/fleet/keyhop.py as the pod runs it: `nginx -t` (in write) accepts the rendered hop, on the
    pod's address and hop port, forwarding to TorchServe's loopback inference port with the key
    read from the run dir; no key yet: a placeholder TorchServe refuses."""
    hop_command = container(cluster, layout.REPLICA, "key-hop")["command"]
    address, port = (hop_command[hop_command.index(flag) + 1] for flag in ("--address", "--port"))
    run_dir = tmp_path / "replica"
    run_dir.mkdir()
    config = hop_config(tmp_path, cluster)
    hop = keyhop.plan(config, run_dir, tmp_path / "key-hop", int(port), hop_secret_file(tmp_path), address)
    text = keyhop.write(hop, None).read_text()
    assert f"listen {address}:{port};" in text and 'Authorization "Bearer no-key-yet"' in text
    assert f"include {hop.secret_file};" in text and "0123456789abcdef" not in text   # the secret stays in its file
    inference = ReplicaPorts.derived(0).inference   # through an upstream that keeps its connections alive
    assert f"server 127.0.0.1:{inference};" in text and f"proxy_pass http://replica_{port};" in text
    text = keyhop.write(hop, "renewed-key").read_text()
    assert text.count('proxy_set_header Authorization "Bearer renewed-key";') == 1
    assert (hop.nginx_dir / "nginx.conf").stat().st_mode & 0o077 == 0   # it holds the key
    assert f"client_max_body_size {read_properties(config)['max_request_size']};" in text


def test_the_key_hop_refuses_a_replica_without_token_auth_in_one_line(cluster, tmp_path):
    config = hop_config(tmp_path, cluster, token_auth=False)
    result = CliRunner().invoke(keyhop.main, ["--config", str(config), "--run-dir", str(tmp_path),
                                              "--hop-dir", str(tmp_path / "hop"), "--port", "9086",
                                              "--secret-file", str(hop_secret_file(tmp_path))])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "turns token authorization off" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["", 'set $hop_secret "";\n', "0123456789abcdef" * 4 + "\n", None])
def test_the_key_hop_refuses_an_empty_or_malformed_secret_in_one_line(cluster, tmp_path, text):
    """An empty $hop_secret would equal the empty header of a request without one: refused before nginx starts."""
    secret = tmp_path / HOP_SECRET_FILE
    if text is not None:
        secret.write_text(text)
    result = CliRunner().invoke(keyhop.main, ["--config", str(hop_config(tmp_path, cluster)), "--run-dir", str(tmp_path),
                                              "--hop-dir", str(tmp_path / "hop"), "--port", "9086",
                                              "--secret-file", str(secret)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "hop secret" in result.output or "set $hop_secret" in result.output, result.output
    assert not (tmp_path / "hop").exists()   # nothing rendered


def test_the_docs_make_a_hop_secret_the_hop_accepts(tmp_path):
    """docs/kubernetes.md's line that makes the Secret's file: run as written, one fresh 64-hex secret."""
    [line] = [line for line in DOC.read_text().splitlines() if "openssl rand" in line and HOP_SECRET_FILE in line]
    made = []
    for _ in range(2):
        (tmp_path / HOP_SECRET_FILE).unlink(missing_ok=True)
        subprocess.run(["bash", "-c", line], cwd=tmp_path, check=True)
        made.append(read_hop_secret(tmp_path / HOP_SECRET_FILE))
    assert made[0] != made[1] and (tmp_path / HOP_SECRET_FILE).stat().st_mode & 0o077 == 0, made


def test_without_a_footprint_the_generator_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(kube, "FOOTPRINT", tmp_path / "footprint.json")
    result = CliRunner().invoke(gen.main, ["--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "run `python -m benchmarks.footprint`" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())   # nothing half-written


# --- the pod's filesystem, for real ------------------------------------------------------------------
# Inside a mount namespace of its own, every top-level directory but /tmp (the pod's /tmp emptyDir),
# /dev, /proc and /sys is bound read-only onto itself: what a read-only root filesystem does to a writer.
# And a network namespace of its own with loopback alone: what the replica's egress policy (none) leaves it.
READ_ONLY_SETUP = r"""
set -e
ip link set lo up   # a network namespace of its own: loopback alone, as the replica's egress policy leaves it
for top in /*; do
  case "$top" in /tmp|/dev|/proc|/sys) continue;; esac
  [ -d "$top" ] && [ ! -L "$top" ] || continue
  mount --rbind "$top" "$top"
  findmnt -R -n -o TARGET "$top" | while read -r target; do mount -o remount,bind,ro "$target" 2>/dev/null || true; done
done
exec "$@"
"""
# Runs in there: the replica as the pod runs it, the pod's probe, its key hop (serving/fleet/keyhop.py, as
# the pod's second container runs it); a prediction through the hop, the inference key renewed (as
# `run` renews it), a prediction through the hop with the new key; then SIGTERM to both.
POD_DRIVER = r"""
import json, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path
from serving.fleet.frontdoor import read_hop_secret
from serving.server.keys import KeyRenewer
from serving.server.readiness import NotReady, check_ready, inference_key, probe_image, probe_once, retry
from serving.fleet.topology import HOP_SECRET_HEADER, Replica, ReplicaPorts
run_dir, inference, management, hop_dir, hop_port = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5]
written = Path(sys.argv[6])   # somewhere read-only: writing it must fail
secret_file = Path(sys.argv[7])   # the hop secret, where the Secret would mount it
secret = read_hop_secret(secret_file)
def through_hop(with_secret=True):   # the probe image to the hop, with the secret header or without
    headers = {"Content-Type": "application/octet-stream", **({HOP_SECRET_HEADER: secret} if with_secret else {})}
    sent = urllib.request.Request(f"http://127.0.0.1:{hop_port}/predictions/mnist", data=probe_image(), headers=headers)
    try:
        with urllib.request.urlopen(sent, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except (urllib.error.URLError, ConnectionError) as error:
        raise NotReady(str(error)) from None
def answered():
    status, answer = through_hop()
    if status != 200:
        raise NotReady(f"{status}: {answer}")   # a reload with the renewed key in progress
    return answer
try:
    written.write_text("x")
    read_only = False
except OSError:
    read_only = True
replica = Replica("pod", ReplicaPorts.derived(0), run_dir)
server = subprocess.Popen(replica.run_command(), cwd=run_dir, stdout=open(run_dir / "run.out", "wb"),
                          stderr=subprocess.STDOUT)
hop = None
try:
    ready = retry(lambda: check_ready(replica.config, run_dir), 240)
    probe = subprocess.run(replica.probe_command(), cwd=run_dir, capture_output=True, text=True)
    try:
        probe_once(inference)
        keyless = "answered"
    except NotReady as error:
        keyless = str(error)
    hop = subprocess.Popen([sys.executable, "-m", "serving.fleet.keyhop", "--config", str(replica.config), "--run-dir",
                            str(run_dir), "--hop-dir", str(hop_dir), "--address", "127.0.0.1", "--port", hop_port,
                            "--secret-file", str(secret_file)],
                           stdout=open(run_dir / "hop.out", "wb"), stderr=subprocess.STDOUT)
    first = retry(answered, 30)
    no_secret = through_hop(with_secret=False)
    old = inference_key(replica.key_file)
    KeyRenewer(replica.key_file, management, 3600, run_dir).renew("inference")
    new = inference_key(replica.key_file)
    def rendered():
        if f"Bearer {new}" not in (hop_dir / "nginx" / "nginx.conf").read_text():
            raise NotReady("the hop has not rendered the new key yet")
    retry(rendered, 10)
    renewed = retry(answered, 10)   # the old key is refused from the moment of renewal
finally:
    if hop:
        hop.terminate()
        hop_exit = hop.wait(30)
    server.terminate()
    status = server.wait(60)
print(json.dumps({"read_only": read_only, "ready": ready, "probe_rc": probe.returncode, "keyless": keyless,
                  "digit": first["digit"], "no_secret": no_secret, "renewed": old != new and new is not None,
                  "digit_renewed": renewed["digit"], "hop_exit": hop_exit, "exit": status}))
"""


def can_make_mount_namespaces() -> str | None:
    """Why the pod's filesystem cannot be imitated here, or None."""
    if None in (shutil.which("unshare"), shutil.which("ip"), shutil.which("java")):
        return "needs unshare, ip and Java"
    if subprocess.run(["unshare", "-m", "-n", "--propagation", "private", "true"], capture_output=True).returncode != 0:
        return "cannot make mount and network namespaces (needs root, as CI is)"
    return None


@pytest.mark.server
@pytest.mark.skipif(can_make_mount_namespaces() is not None, reason=str(can_make_mount_namespaces()))
def test_the_replica_serves_from_a_read_only_root_as_the_pod_does(cluster, exported, tmp_path):
    """The ConfigMap's config, run and probed with the pod's commands, with everything read-only but
    the run dir and /tmp: TorchServe, its workers, the probe and the key hop need no other place to
    write; the hop answers the front door's secret header with TorchServe's key (a request without it:
    403), and again once that key is renewed. In a network namespace of loopback alone: the replica pod
    needs no egress, not even DNS (issue 27 point 14).
    The only changes to the config: the image's paths, and free loopback ports for the pod's."""

    model_store = tmp_path / "model_store"
    build_archive(exported / TORCHSCRIPT_NAME, model_store, force=True)
    run_dir = tmp_path / "replica"
    run_dir.mkdir()
    _, text = configmap_file(cluster, layout.REPLICA, "config")
    for old, new in {str(layout.IMAGE_MODEL_STORE): str(model_store), str(layout.APP_DIR): str(REPO_ROOT),
                     str(layout.RUN_DIR): str(run_dir)}.items():
        text = text.replace(old, new)
    ports = free_ports(7)
    loopback = {f"{api}_address": f"http://127.0.0.1:{port}"
                for api, port in zip(("inference", "management", "metrics"), ports)}
    loopback |= dict(zip(("grpc_inference_port", "grpc_management_port", "initial_worker_port"), map(str, ports[3:6])))
    (run_dir / "config.properties").write_text(set_properties(text, loopback))
    # A place that must be read-only in there: outside /tmp (writable, as the pod's emptyDir is),
    # and outside the checkout, which may itself sit under /tmp (a CI clone does).
    read_only_check = Path("/var/tmp") / f"digitserve-read-only-check-{os.getpid()}"
    read_only_check.unlink(missing_ok=True)
    command = ["unshare", "-m", "-n", "--propagation", "private", "bash", "-c", READ_ONLY_SETUP, "bash",
               sys.executable, "-c", POD_DRIVER, str(run_dir), loopback["inference_address"],
               loopback["management_address"], str(tmp_path / "key-hop"), str(ports[6]),
               str(read_only_check), str(hop_secret_file(tmp_path))]
    # HOME on the writable side, as the image sets it to its /tmp emptyDir (ONNX Runtime writes ~/.cache).
    env = subprocess_env(HOME=str(tmp_path), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    hop_log = (run_dir / "hop.out").read_text() if (run_dir / "hop.out").exists() else ""
    assert result.returncode == 0, result.stderr[-2000:] + (run_dir / "run.out").read_text()[-2000:] + hop_log
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["read_only"] and not read_only_check.exists()
    assert outcome["ready"].startswith("ready: mnist") and outcome["probe_rc"] == 0
    assert outcome["keyless"] != "answered"   # token auth on: TorchServe refuses a request without the key
    assert outcome["digit"] == 1 and outcome["exit"] == 0   # the probe image is a drawn 1; SIGTERM: a clean stop
    assert outcome["no_secret"] == [403, {"error": "this key hop serves the front door alone", "code": "forbidden"}]
    assert outcome["renewed"] and outcome["digit_renewed"] == 1 and outcome["hop_exit"] == 0, hop_log
    # Issue 27 point 5: its logs went to stdout alone (serving/server/log4j2-console.xml), no file
    # grew in the run dir (TorchServe's own config writes five .log files there).
    assert not [path.name for path in run_dir.rglob("*.log*")], sorted(p.name for p in run_dir.rglob("*.log*"))
    assert "ACCESS_LOG" in (run_dir / "run.out").read_text()
