"""The front door: nginx's config rendered from serving/fleet/nginx.conf.template, its certificate, and
the calls that check and reload it. `python -m serving.fleet` uses these; the rendering itself is
a pure function of the fleet's topology and its state (who is out of rotation, the replicas' keys).
"""
from __future__ import annotations

import ipaddress
import os
import pwd
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from serving.handler.artifact import MODEL_NAME
from serving.fleet.topology import (CLIENT_TIMEOUT_S, CONNECTIONS_PER_ADDRESS, EXPENSIVE_PATHS, EXPLAIN_BURST,
                                     EXPLAIN_CONCURRENCY, EXPLAIN_RATE_PER_S, HEARTBEAT_PATH, HOP_SECRET_HEADER,
                                     KEEPALIVE_TIMEOUT_S, NGINX_PRIORITY, OPEN_PATHS, SPOOLED_BODIES_PER_ADDRESS,
                                     SPOOLED_BODY_BYTES, WORKER_CONNECTIONS, Fleet, Replica, nginx_workers)
from serving.web import WEB_DIR

TEMPLATE = Path(__file__).resolve().with_name("nginx.conf.template")
NGINX = "/usr/sbin/nginx"
# A client key becomes a quoted string in nginx's config: nothing that could end the quote.
CLIENT_KEY_PATTERN = re.compile(r"[A-Za-z0-9._~+/=-]{16,256}")
ORIGIN_PATTERN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?")
BLOCK = re.compile(r"\{\{#(\w+)\}\}\n(.*?)\{\{/\1\}\}\n", re.S)
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# TorchServe's own response timeout (config.properties), plus the margin a queued request waits.
READ_TIMEOUT_MARGIN_S = 30

# Kept-alive connections to the replicas or their key hops (one per request cost a third of the
# throughput). Safe across a key's renewal: rotation.py takes the replica out for one reload.
KEEPALIVE_ON = "        keepalive 32;           # reuse connections to the replicas (needs HTTP/1.1 below)"
# Kubernetes (deploy/manifests.py): kube-proxy balances connections, not requests; kept-alive
# connections would pin the front door to the pods it met first. A new connection each time.
KEEPALIVE_OFF = "        # no keepalive: kube-proxy spreads connections, so each request is one (deploy/manifests.py)"
# Plain HTTP: the fleet (loopback) serves it as TLS; a front door reached over a network refuses
# it (deploy/manifests.py): the client's key would cross in the clear. 426, nothing proxied.
PLAIN_HTTP_SERVED = "        # plain HTTP served as TLS is: loopback (the cluster's front door refuses it)"
PLAIN_HTTP_REFUSED = """        # Plain HTTP would carry client keys in the clear: answered 426 here, before any location,
        # so nothing is proxied ($https is "on" on the TLS port only).
        if ($https = "") {
            return 426;
        }"""
ACCESS_LOG, ACCESS_LOG_MODE = "access.log", 0o640   # in nginx's dir (the template's access_log)
CLIENT_KEYS_MAP = "client-keys.map"   # in nginx's dir: the allowed client keys as map entries, included
# The secret the front door sends its key hops (HOP_SECRET_HEADER) as the one line nginx includes:
# in the fleet a file of nginx's dir (0600, made afresh at each start), in a pod a Secret mounted in
# both the front door's and the replica's pods. Never in a rendered config, never logged.
HOP_SECRET_FILE = "hop-secret.conf"
HOP_SECRET_LINE = re.compile(r'set \$hop_secret "([0-9a-f]{64})";\n?')
HOP_SECRET_BYTES = 32   # 64 hex digits: 256 bits


class FrontDoorError(Exception):
    """The front door cannot be configured or reloaded; the message says why, in one line."""


@dataclass(frozen=True)
class RotationState:
    """What the rendered config depends on beyond the topology: the replicas out of rotation,
    and (token auth on) each replica's current inference key."""
    down: frozenset[str] = frozenset()
    inference_keys: dict[str, str] = field(default_factory=dict)


def fill(text: str, values: dict[str, object]) -> str:
    """Every {{NAME}} replaced; FrontDoorError naming any the values lack."""
    missing = sorted(set(PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise FrontDoorError(f"{TEMPLATE.name}: nothing to fill {', '.join(missing)} with")
    return PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), text)


def read_client_keys(path: Path) -> list[str]:
    """The allowed client keys, one a line (blank lines and # comments skipped)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise FrontDoorError(f"cannot read the client key file {path}: {error.strerror}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    bad = [index + 1 for index, key in enumerate(keys) if not CLIENT_KEY_PATTERN.fullmatch(key)]
    if bad or not keys:
        raise FrontDoorError(f"{path}: {'no keys' if not keys else f'key {bad[0]}'}: keys must be 16-256 of "
                             "A-Z a-z 0-9 . _ ~ + / = -")
    return keys


def client_keys_map(keys: list[str]) -> str:
    """The body nginx's `map $http_x_api_key` includes: one allowed key a line."""
    return "".join(f'"{key}" 1;\n' for key in keys)


def include_line(path: object) -> str:
    return f"        include {path};"


def hop_secret_text(secret: str) -> str:
    """The hop secret file's one line: nginx's `set` of $hop_secret."""
    return f'set $hop_secret "{secret}";\n'


def new_hop_secret(path: Path) -> None:
    """A fresh random secret into path (0600, replaced whole: a reload never reads half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    private_candidate(path, hop_secret_text(secrets.token_hex(HOP_SECRET_BYTES))).replace(path)


def read_hop_secret(path: Path) -> str:
    """The secret in a hop secret file; FrontDoorError when it is missing or not the one line
    hop_secret_text writes (an empty secret would let a request without the header through)."""
    try:
        text = path.read_text()
    except OSError as error:
        raise FrontDoorError(f"cannot read the hop secret file {path}: {error.strerror}") from None
    matched = HOP_SECRET_LINE.fullmatch(text)
    if not matched:
        raise FrontDoorError(f"{path} is not one line `set $hop_secret \"<64 hex digits>\";` "
                             "(docs/kubernetes.md makes it)")
    return matched.group(1)


def hop_secret_lines(path: object) -> str:
    """The front door's lines that send its hops the secret (in the location that proxies)."""
    return (f"            include {path};   # set $hop_secret: the key hops refuse a request without it\n"
            f"            proxy_set_header {HOP_SECRET_HEADER} $hop_secret;")


def header_variable(header: str) -> str:
    """nginx's variable for a request header: X-Hop-Secret -> $http_x_hop_secret."""
    return "$http_" + header.lower().replace("-", "_")


def check_origins(origins: tuple[str, ...]) -> None:
    for origin in origins:
        if not ORIGIN_PATTERN.fullmatch(origin):
            raise FrontDoorError(f"origin {origin!r} is not scheme://host[:port] (e.g. http://localhost:3000)")


def real_ip_lines(proxies: tuple[str, ...]) -> str:
    """nginx's realip settings: the client a trusted proxy names in X-Forwarded-For is the one
    the limits count (the last address not itself a trusted proxy); nothing without proxies."""
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise FrontDoorError(f"trusted proxy {proxy!r} is not an address or CIDR range (e.g. 10.0.0.0/8)") from None
    if not proxies:
        return "    # No trusted proxy (FLEET_TRUSTED_PROXIES): the limits count the TCP peer."
    return "\n".join([*(f"    set_real_ip_from {proxy};" for proxy in proxies),
                      "    real_ip_header X-Forwarded-For;", "    real_ip_recursive on;"])


def upstream_line(fleet: Fleet, replica: Replica, state: RotationState) -> str:
    port = replica.ports.key_hop if fleet.token_auth else replica.ports.inference
    target = f"127.0.0.1:{port}"
    down = " down" if replica.name in state.down else ""
    return f"        server {target} max_fails=1 fail_timeout=2s{down};   # {replica.name}"


@dataclass(frozen=True)
class HopSite:
    """One key hop's server block: where it listens, the replica's loopback port it reaches, the
    replica's current key (None: a placeholder TorchServe refuses), and the hop secret file it includes."""
    address: str
    port: int
    replica_port: int
    key: str | None
    secret_file: Path


def hop_server(site: HopSite, response_timeout_s: int) -> str:
    """The template's KEYED_REPLICA block filled for one hop: the fleet renders one per replica,
    a replica pod's own hop (serving/fleet/keyhop.py) renders one inside its minimal config."""
    block = BLOCK.search(TEMPLATE.read_text()).group(2)
    return fill(block, {"HOP_ADDRESS": site.address, "KEY_HOP_PORT": site.port,
                        "REPLICA_ADDRESS": f"127.0.0.1:{site.replica_port}", "INFERENCE_KEY": site.key or "no-key-yet",
                        "READ_TIMEOUT_S": response_timeout_s + READ_TIMEOUT_MARGIN_S,
                        "OPEN_PATHS": path_pattern(OPEN_PATHS), "HEARTBEAT_PATH": HEARTBEAT_PATH,
                        "HOP_SECRET_FILE": site.secret_file, "HOP_SECRET_HEADER": HOP_SECRET_HEADER,
                        "HOP_SECRET_VARIABLE": header_variable(HOP_SECRET_HEADER)})


def hop_secret_path(fleet: Fleet) -> Path:
    return fleet.nginx_dir / HOP_SECRET_FILE


def hop_sites(fleet: Fleet, state: RotationState) -> list[HopSite]:
    """The per-replica hop that adds its key: one per replica with token auth, none without."""
    if not fleet.token_auth:
        return []
    return [HopSite("127.0.0.1", replica.ports.key_hop, replica.ports.inference, state.inference_keys.get(replica.name),
                    hop_secret_path(fleet))
            for replica in fleet.replicas]


def path_pattern(paths: tuple[str, ...]) -> str:
    """An anchored nginx regex matching exactly these paths."""
    return "^(" + "|".join(re.escape(path) for path in paths) + ")$"


def workers_as() -> str:
    """As root: the workers as nobody (nginx's own default, named), at NGINX_PRIORITY (root alone may)."""
    return (f"user nobody nogroup;\nworker_priority {NGINX_PRIORITY};   # topology.py NGINX_PRIORITY"
            if os.geteuid() == 0 else "# (not root: the workers run as this user, at the default priority)")


def render(fleet: Fleet, state: RotationState, overrides: dict[str, object] | None = None) -> str:
    """nginx.conf for fleet in state. overrides: placeholders another deployment fills itself
    (deploy/manifests.py: a Kubernetes Service as the upstream, the image's paths and user)."""
    door = fleet.front_door
    check_origins(door.origins)
    client_keys = read_client_keys(door.api_keys_file) if door.api_keys_file else []
    timeout_s = fleet.config.response_timeout_s
    values = {
        "READ_TIMEOUT_S": timeout_s + READ_TIMEOUT_MARGIN_S, "WORKER_PROCESSES_AS": workers_as(), "NGINX_DIR": fleet.nginx_dir,
        "ACCESS_LOG": fleet.nginx_dir / ACCESS_LOG, "MAX_BODY_BYTES": fleet.config.max_body_bytes,
        "RATE_LIMIT": door.rate_limit_per_s, "MODEL": MODEL_NAME,
        "REAL_IP": real_ip_lines(door.trusted_proxies), "PLAIN_HTTP": PLAIN_HTTP_SERVED,
        "ORIGINS": "\n".join(f'        "{origin}" "{origin}";' for origin in door.origins),
        "VARY": "        add_header Vary Origin always;" if door.origins else "",
        "CLIENT_DEFAULT": 0 if client_keys else 1,
        "CLIENT_KEYS": include_line(fleet.nginx_dir / CLIENT_KEYS_MAP) if client_keys else "",   # write_config writes it
        # The upstreams are the key hops (token auth): they want the secret (write_config makes it).
        "HOP_SECRET": hop_secret_lines(hop_secret_path(fleet)) if fleet.token_auth else "",
        "UPSTREAM_SERVERS": "\n".join(upstream_line(fleet, replica, state) for replica in fleet.replicas),
        "ADDRESS": door.address, "HTTP_PORT": door.http_port, "TLS_PORT": door.tls_port,
        "TLS_CERT": door.tls_cert or fleet.tls_dir / "cert.pem", "TLS_KEY": door.tls_key or fleet.tls_dir / "key.pem",
        "WEB_DIR": WEB_DIR, "OPEN_PATHS": path_pattern(OPEN_PATHS), "EXPENSIVE_PATHS": path_pattern(EXPENSIVE_PATHS),
        "EXPLAIN_RATE_PER_S": EXPLAIN_RATE_PER_S, "EXPLAIN_BURST": EXPLAIN_BURST,
        "EXPLAIN_CONCURRENCY": EXPLAIN_CONCURRENCY,
        "KEEPALIVE": KEEPALIVE_ON,
        "NGINX_WORKERS": nginx_workers(),
        "WORKER_CONNECTIONS": WORKER_CONNECTIONS, "WORKER_FILES": 2 * WORKER_CONNECTIONS + 64,
        "CONNECTIONS_PER_ADDRESS": CONNECTIONS_PER_ADDRESS,
        "SPOOLED_BODIES_PER_ADDRESS": SPOOLED_BODIES_PER_ADDRESS, "SPOOLED_BODY_BYTES": SPOOLED_BODY_BYTES,
        "SPOOLED_BODIES": fleet.config.spooled_bodies,
        "CLIENT_TIMEOUT_S": CLIENT_TIMEOUT_S, "KEEPALIVE_TIMEOUT_S": KEEPALIVE_TIMEOUT_S,
        "TRIES": len(fleet.replicas) + 1, "NEXT_UPSTREAM_S": timeout_s + READ_TIMEOUT_MARGIN_S,
        **(overrides or {}),
    }
    text = BLOCK.sub(lambda block: "".join(hop_server(site, timeout_s) for site in hop_sites(fleet, state)),
                     TEMPLATE.read_text())
    return fill(text, values)


# --- nginx itself: one nginx's files live in its nginx_dir (the fleet's, or a key hop's) --------
def config_path(nginx_dir: Path) -> Path:
    return nginx_dir / "nginx.conf"


def nginx_command(nginx_dir: Path, *args: str) -> list[str]:
    return [NGINX, "-p", str(nginx_dir), "-c", str(config_path(nginx_dir)), *args]


def closed_parent(path: Path) -> Path | None:
    """The first directory above path that other users may not enter (no o+x), or None."""
    for parent in Path(path).resolve().parents:
        if not parent.stat().st_mode & 0o001:
            return parent
    return None


def prepare_dirs(nginx_dir: Path) -> None:
    """nginx's temp dirs, writable by its workers (nobody, when started as root)."""
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (nginx_dir / "tmp" / name).mkdir(parents=True, exist_ok=True)
    (nginx_dir / "logs").mkdir(exist_ok=True)   # nginx opens its default error log there first
    # The access log names clients and paths: nginx (root) would create it 0644; made here 0640,
    # nginx appends to it as it is.
    access_log = nginx_dir / ACCESS_LOG
    access_log.touch(mode=ACCESS_LOG_MODE)
    access_log.chmod(ACCESS_LOG_MODE)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for path in [nginx_dir / "tmp", *(nginx_dir / "tmp").iterdir()]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)


def write_private(path: Path, text: str) -> None:
    """text into path, readable by its owner alone (0600), whatever mode a file already there had."""
    path.touch(mode=0o600)
    path.chmod(0o600)   # touch keeps an existing file's mode
    path.write_text(text)


def private_candidate(path: Path, text: str) -> Path:
    """text in a new 0600 file beside path (path.new), for the caller to check and rename over
    path: a reader never sees half a file."""
    candidate = path.with_suffix(".new")
    write_private(candidate, text)
    return candidate


def install(nginx_dir: Path, text: str) -> Path:
    """Write text as nginx_dir's config (private: it may hold the replicas' keys) once `nginx -t`
    accepts it; the config in place stays when it does not."""
    if shutil.which(NGINX) is None:
        raise FrontDoorError(f"no nginx at {NGINX}: `make nginx` installs it (apt-get install nginx)")
    prepare_dirs(nginx_dir)
    path = config_path(nginx_dir)
    candidate = private_candidate(path, text)
    checked = subprocess.run([NGINX, "-t", "-q", "-p", str(nginx_dir), "-c", str(candidate)],
                             capture_output=True, text=True)
    if checked.returncode != 0:
        raise FrontDoorError(f"nginx refuses the rendered config {candidate}: {checked.stderr.strip()}")
    candidate.replace(path)
    return path


def write_config(fleet: Fleet, state: RotationState) -> Path:
    """The fleet's front door rendered and installed, with the client keys' map file it includes.
    Started as root, its workers run as nobody: under a directory nobody may not enter, every body
    past 16 KiB (spooled to nginx's temp dir) would be answered 500, so that is refused here."""
    nginx_tmp = fleet.nginx_dir / "tmp"
    nginx_tmp.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and (closed := closed_parent(nginx_tmp / "body")):
        raise FrontDoorError(f"nginx's workers run as nobody and cannot reach {nginx_tmp}, where they keep request "
                             f"bodies: {closed} is closed to other users (chmod o+x it, or run the fleet elsewhere)")
    text = render(fleet, state)
    if fleet.token_auth and not hop_secret_path(fleet).exists():   # start() makes a fresh one
        new_hop_secret(hop_secret_path(fleet))
    if fleet.front_door.api_keys_file:   # what render's `include` names
        fleet.nginx_dir.mkdir(parents=True, exist_ok=True)
        write_private(fleet.nginx_dir / CLIENT_KEYS_MAP, client_keys_map(read_client_keys(fleet.front_door.api_keys_file)))
    return install(fleet.nginx_dir, text)


def reload(nginx_dir: Path) -> None:
    """Graceful: new workers take the new config, the old ones finish the requests in flight."""
    reloaded = subprocess.run(nginx_command(nginx_dir, "-s", "reload"), capture_output=True, text=True)
    if reloaded.returncode != 0:
        raise FrontDoorError(f"nginx reload failed: {reloaded.stderr.strip()}")


def make_certificate(fleet: Fleet) -> None:
    """A self-signed certificate for 127.0.0.1 and localhost, once (kept across restarts)."""
    cert, key = fleet.tls_dir / "cert.pem", fleet.tls_dir / "key.pem"
    if fleet.front_door.tls_cert or (cert.is_file() and key.is_file()):
        return
    fleet.tls_dir.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
                           "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                           "-keyout", str(key), "-out", str(cert)], capture_output=True, text=True)
    if made.returncode != 0:
        raise FrontDoorError(f"openssl could not make a certificate: {made.stderr.strip().splitlines()[-1:]}")
    key.chmod(0o600)
