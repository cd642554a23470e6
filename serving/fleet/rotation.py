"""What changes while a fleet runs, and nginx following it: the fleet's state (which archive
serves, which replicas are out of rotation) under a lock, nginx's config re-rendered and reloaded
for it, and, with token auth, each replica's inference key kept current in that config.

`python -m serving.fleet` (serving/fleet/fleet.py) starts, stops and rolls out; this module is what its
rollout and its supervised `follow-keys` program share.
"""
from __future__ import annotations

import fcntl
import json
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil   # a TorchServe dependency

from serving.fleet import frontdoor

from serving.server import server
from serving.server.archive import MANIFEST, VERSION_PATTERN
from serving.fleet.frontdoor import RotationState
from serving.server.keys import RENEW_AFTER_FRACTION, KeyRenewer
from serving.server.pids import our_process
from serving.server.properties import key_lifetime_s, read_properties
from serving.server.readiness import NotReady, inference_key, retry
from serving.fleet.topology import FLEET_FILE, Fleet, Replica

STATE_FILE = "state.json"
RENDERED_KEYS = "keys.json"   # in nginx's dir: the keys its running config sends
KEY_POLL_S = 0.2
# Of a key's lifetime: the front door renews inference keys before the replica's own renewer would.
# Half as long: a race with it would fail the requests sent to the replica in between.
FRONT_RENEW_FRACTION = RENEW_AFTER_FRACTION / 2


class FleetError(Exception):
    """The fleet cannot start, stop, report or roll out; the message says why, in one line."""


@dataclass(frozen=True)
class ServedArchive:
    version: str
    file: str     # its name in every replica's model store


@dataclass(frozen=True)
class FleetState:
    """What changes while the fleet runs, kept in its run dir: who is out of rotation, and
    which archive serves (and which served before, for --rollback)."""
    serving: ServedArchive
    previous: ServedArchive | None = None
    down: tuple[str, ...] = ()


def archive_version(archive: Path) -> str:
    """The version a .mar was built with (its manifest's modelVersion), checked as
    serving/server/archive.py checks the versions it writes: it becomes a file name and a path
    segment of the management API, so nothing else than VERSION_PATTERN passes."""
    try:
        with zipfile.ZipFile(archive) as mar:
            version = json.loads(mar.read(MANIFEST))["model"]["modelVersion"]
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as error:
        raise FleetError(f"{archive} is not a model archive with a version: {error}") from None
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise FleetError(f"{archive}: its version {str(version)[:80]!r} must be letters, digits, '.', '_' or '-' "
                         "(at most 64, as `python -m serving.server.archive --version` writes)")
    return version


# --- state, under a lock shared with follow-keys ----------------------------------------------
@contextmanager
def locked(fleet: Fleet):
    with open(fleet.run_dir / "fleet.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_state(fleet: Fleet) -> FleetState:
    data = json.loads((fleet.run_dir / STATE_FILE).read_text())
    previous = data.get("previous")
    return FleetState(ServedArchive(**data["serving"]), previous and ServedArchive(**previous), tuple(data["down"]))


def write_state(fleet: Fleet, state: FleetState) -> None:
    (fleet.run_dir / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))


def load_fleet(run_dir: str | Path) -> Fleet:
    path = Path(run_dir) / FLEET_FILE
    if not path.is_file():
        raise FleetError(f"no fleet started from {run_dir} (no {FLEET_FILE}): `make fleet` first")
    return Fleet.from_json(path.read_text())


def apply_front_door(fleet: Fleet, state: FleetState, reload: bool = True) -> None:
    """Render nginx's config for state (and the replicas' current keys) and reload it. With token
    auth, a replica without a key file (its `run` removes it when its Java dies) is out of
    rotation too: nginx would send it a key it no longer accepts."""
    keys = {replica.name: key for replica in fleet.replicas if (key := inference_key(replica.key_file))}
    if not fleet.token_auth:
        keys = {}
    keyless = {replica.name for replica in fleet.replicas if fleet.token_auth and replica.name not in keys}
    target = RotationState(frozenset(state.down) | keyless, keys)
    # While a reload takes over, workers of both configs accept: a new worker could send a request
    # to an old worker's hop, which still adds the replica's old key. So a replica whose key
    # changes first gets it while out of rotation, and rejoins in a second reload.
    rendered = rendered_keys(fleet)
    changed = {name for name, key in keys.items() if rendered.get(name) != key} - target.down
    if reload and changed:
        write_and_reload(fleet, RotationState(target.down | changed, keys))
    if reload:
        write_and_reload(fleet, target)
    else:
        frontdoor.write_config(fleet, target)


def rendered_keys(fleet: Fleet) -> dict[str, str]:
    try:
        return json.loads((fleet.nginx_dir / RENDERED_KEYS).read_text())
    except (OSError, ValueError):
        return {}


def write_and_reload(fleet: Fleet, rotation: RotationState) -> None:
    frontdoor.write_config(fleet, rotation)
    reloaded_workers(fleet.nginx_dir)
    record = fleet.nginx_dir / RENDERED_KEYS
    record.touch(mode=0o600)   # the keys themselves: private, as nginx.conf is
    record.write_text(json.dumps(rotation.inference_keys))


def nginx_master(nginx_dir: Path) -> psutil.Process | None:
    """The nginx master running from nginx_dir (the front door's, or a key hop's): the title nginx
    gives its master holds the command that started it (frontdoor.nginx_command: `-p nginx_dir`)."""
    return our_process(nginx_dir / "nginx.pid", "nginx: master process", f"-p {nginx_dir} -c")


def reloaded_workers(nginx_dir: Path, timeout_s: float = 10.0) -> None:
    """Reload nginx and wait until no worker with the old config takes requests: the reload is a
    signal, and for a moment the old workers still accept. Old workers finishing the requests in
    flight retitle themselves "worker process is shutting down"."""
    master = nginx_master(nginx_dir)
    before = {child.pid for child in master.children()} if master else set()
    frontdoor.reload(nginx_dir)
    deadline = time.monotonic() + timeout_s
    while master and not reloaded(master, before):
        if time.monotonic() > deadline:
            raise FleetError(f"nginx did not reload within {timeout_s:.0f} s: see nginx's error log")
        time.sleep(0.02)


def reloaded(master: psutil.Process, old_pids: set[int]) -> bool:
    """A new worker runs and every old one is shutting down or gone."""
    try:
        children = master.children()
        titles = {child.pid: " ".join(child.cmdline()) for child in children}
    except psutil.Error:
        return False
    new = [pid for pid in titles if pid not in old_pids]
    still_accepting = [pid for pid, title in titles.items() if pid in old_pids and "shutting down" not in title]
    return bool(new) and not still_accepting


def set_rotation(fleet: Fleet, replica: Replica, out: bool) -> None:
    with locked(fleet):
        state = read_state(fleet)
        down = (set(state.down) | {replica.name}) if out else (set(state.down) - {replica.name})
        state = replace(state, down=tuple(sorted(down)))
        write_state(fleet, state)
        apply_front_door(fleet, state)


# --- keys ---------------------------------------------------------------------------------------
def renew_out_of_rotation(fleet: Fleet, replica: Replica) -> str | None:
    """Renew a replica's inference key while nginx sends it nothing: TorchServe refuses the old
    key the moment it makes the new one, so requests in between would fail."""
    set_rotation(fleet, replica, out=True)
    old = inference_key(replica.key_file)
    try:
        properties = read_properties(replica.config)
        KeyRenewer(replica.key_file, replica.management_url, key_lifetime_s(properties), replica.run_dir).renew(
            "inference")
        key = retry(lambda: new_key(replica, old), 5)
        print(f"{time.strftime('%H:%M:%S')} renewed {replica.name}'s inference key out of rotation", flush=True)
        return key
    except NotReady as error:
        print(f"{time.strftime('%H:%M:%S')} {error}: trying again", flush=True)   # busy or restarting
        return old
    finally:
        set_rotation(fleet, replica, out=False)   # renders the new key


def new_key(replica: Replica, old: str | None) -> str:
    key = inference_key(replica.key_file)
    if key in (None, old):
        raise NotReady(f"{replica.name}'s inference key is not renewed yet")
    return key


def follow_keys(fleet: Fleet, poll_s: float = KEY_POLL_S) -> None:
    """Forever, with token auth: when a replica's inference key changes (a restart) or its key
    file goes (its Java died), re-render nginx's config and reload, so the front door always
    sends each replica its current key. The front door renews each inference key itself, out
    of rotation, at FRONT_RENEW_FRACTION of its lifetime: before the replica's own renewer (at
    half of it, serving/server/keys.py) would swap it under requests in flight."""
    rendered: dict[str, str | None] = {}
    first_seen: dict[str, tuple[str | None, float]] = {}
    while True:
        keys = {replica.name: inference_key(replica.key_file) for replica in fleet.replicas}
        now = time.monotonic()
        for replica in fleet.replicas:
            if first_seen.get(replica.name, (None, 0.0))[0] != keys[replica.name]:
                first_seen[replica.name] = (keys[replica.name], now)
            elif keys[replica.name] and now - first_seen[replica.name][1] >= \
                    key_lifetime_s(read_properties(replica.config)) * FRONT_RENEW_FRACTION and \
                    server.java_process(replica.run_dir / server.PID_FILE) is not None:   # not restarting
                keys[replica.name] = renew_out_of_rotation(fleet, replica)   # rendered already
                first_seen[replica.name] = (keys[replica.name], time.monotonic())
        if keys != rendered and nginx_master(fleet.nginx_dir) is not None:
            with locked(fleet):
                apply_front_door(fleet, read_state(fleet))
            rendered = keys
            print(f"{time.strftime('%H:%M:%S')} nginx reloaded with the keys of "
                  f"{', '.join(name for name, key in keys.items() if key) or 'no replica'}", flush=True)
        time.sleep(poll_s)
