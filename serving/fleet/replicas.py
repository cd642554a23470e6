"""What each replica serves, through its management API: status, and rollouts (a version
registered beside the one served, made the default, checked; the old ones unregistered).
`python -m serving.fleet status|rollout` (serving/fleet/fleet.py) call these."""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

from serving.handler.artifact import MODEL_NAME
from serving.server.properties import set_properties
from serving.server.readiness import NotReady, check_ready, open_authorized, probe_once, reason, retry
from serving.fleet.rotation import (FleetError, FleetState, ServedArchive, archive_version, locked, read_state,
                                    write_state)
from serving.server import server
from serving.fleet.topology import Fleet, Replica

SWITCH_TIMEOUT_S = 120.0     # a new version's workers to load and answer


# --- status -------------------------------------------------------------------------------------
def management_call(replica: Replica, path: str, method: str = "GET", timeout_s: float = 10.0) -> object:
    """A call to the replica's management API (with its management key, when it has one)."""
    key_file = replica.key_file if replica.key_file.exists() else None
    request = urllib.request.Request(f"{replica.management_url}{path}", method=method)
    try:
        with open_authorized(request, key_file, "management", timeout_s) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:300]
        raise FleetError(f"{replica.name}: {method} {path}: HTTP {error.code} {detail}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, NotReady, ValueError) as error:
        raise FleetError(f"{replica.name}: {method} {path}: {reason(error)}") from None


def replica_status(replica: Replica) -> dict:
    java = server.java_process(replica.run_dir / server.PID_FILE)
    try:
        version = management_call(replica, f"/models/{MODEL_NAME}", timeout_s=5)[0]["modelVersion"]
    except (FleetError, IndexError, KeyError, TypeError):
        version = None
    try:
        check_ready(replica.config, replica.run_dir)
        ready = True
    except NotReady:
        ready = False
    return {"name": replica.name, "inference": replica.inference_url, "management": replica.management_url,
            "java_pid": java.pid if java else None, "model_version": version, "ready": ready}


# --- rollout ------------------------------------------------------------------------------------
def registered_versions(replica: Replica) -> set[str]:
    return {entry["modelVersion"] for entry in management_call(replica, f"/models/{MODEL_NAME}/all")}


def switch_replica(replica: Replica, target: ServedArchive) -> None:
    """Register target on this replica (unless it is already), make it the default, and wait
    until a probe image is answered by it."""
    if target.version not in registered_versions(replica):
        query = urllib.parse.urlencode({"url": target.file, "model_name": MODEL_NAME, "synchronous": "true"})
        management_call(replica, f"/models?{query}", method="POST", timeout_s=SWITCH_TIMEOUT_S)
    version = urllib.parse.quote(target.version, safe="")
    management_call(replica, f"/models/{MODEL_NAME}/{version}/set-default", method="PUT")
    key_file = replica.key_file if replica.key_file.exists() else None

    def answered_by_target() -> dict:
        answer = probe_once(replica.inference_url, MODEL_NAME, key_file)
        if answer.get("model_version") != target.version:
            raise NotReady(f"{replica.name} still answers {answer.get('model_version')}")
        return answer

    try:
        retry(answered_by_target, SWITCH_TIMEOUT_S)
        check_ready(replica.config, replica.run_dir)
    except NotReady as error:
        raise FleetError(f"{replica.name} does not answer with {target.version}: {error}") from None
    # A restart (supervisord, after a crash) must load the version now served, not the first one.
    replica.config.write_text(set_properties(replica.config.read_text(), {"load_models": f"{MODEL_NAME}={target.file}"}))


def rollout(fleet: Fleet, archive: str | Path | None, rollback: bool = False) -> FleetState:
    """Replica by replica: register the archive's version beside the one served (its workers
    start while the old ones answer), make it the default, wait until it answers. rollback:
    switch back to the version served before the last rollout (its archive is still in the
    stores); a rollback keeps nothing to roll back to, so a second one is refused.

    Every replica stays in rotation: nginx is never reloaded, since a reload closes its idle
    kept-alive client connections and a client whose next request crossed that close lost it."""
    state = read_state(fleet)
    if rollback:
        if state.previous is None:
            raise FleetError("nothing to roll back to: no rollout since the fleet started or since the last "
                             "rollback (roll out an archive to move on)")
        target, source = state.previous, None
    else:
        source = Path(archive)
        if not source.is_file():
            raise FleetError(f"no model archive at {source}")
        version = archive_version(source)
        target = ServedArchive(version, f"{MODEL_NAME}-{version}.mar")
    if target.version == state.serving.version:
        raise FleetError(f"version {target.version} is already the one served")
    for replica in fleet.replicas:
        if source is not None:
            shutil.copyfile(source, replica.model_store / target.file)
        switch_replica(replica, target)
    with locked(fleet):
        state = replace(read_state(fleet), serving=target, previous=None if rollback else state.serving)
        write_state(fleet, state)
    kept = {state.serving.version} | ({state.previous.version} if state.previous else set())
    for replica in fleet.replicas:   # only now: until every replica switched, a rollback needed them
        unregister_all_but(replica, kept)
    return state


def unregister_all_but(replica: Replica, kept: set[str]) -> None:
    """Unregister the versions a rollback can no longer return to: each one holds its workers."""
    for version in sorted(registered_versions(replica) - kept):
        segment = urllib.parse.quote(version, safe="")
        management_call(replica, f"/models/{MODEL_NAME}/{segment}", method="DELETE", timeout_s=SWITCH_TIMEOUT_S)
