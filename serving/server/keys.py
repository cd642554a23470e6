"""The token keys of a server with token authorization: renewing them before they expire, and
knowing which key_file.json a server wrote, so that stopping it removes that file only.

TorchServe 0.12 writes key_file.json into its working directory with three keys: "inference" and
"management", which expire after token_expiration_min, and "API", which never does and renews the
other two through the management API's /token endpoint.
"""
from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from serving.server.properties import address, key_lifetime_s
from serving.server.readiness import NotReady, key_file_of, open_authorized, read_keys

KEY_OWNER = "key_file.owner"   # in the run dir: which key_file.json this run dir's server wrote


def key_fingerprint(keys: dict | None) -> str | None:
    """A server's identity in its key file: its "API" key (which never changes while it runs), hashed."""
    try:
        return hashlib.sha256(keys["API"]["key"].encode()).hexdigest()
    except (KeyError, TypeError, AttributeError):
        return None


def record_key_file(run_dir: Path, key_file: Path) -> None:
    """Note in run_dir which key_file.json this server wrote, so that stop removes that one only."""
    record = {"path": str(key_file), "api_key_sha256": key_fingerprint(read_keys(key_file))}
    owner = run_dir / KEY_OWNER
    owner.touch(mode=0o600)   # a hash of the never-expiring API key: private, as key_file.json is
    owner.chmod(0o600)
    owner.write_text(json.dumps(record))


def remove_own_key_file(run_dir: Path) -> None:
    """Delete the key file recorded in run_dir if it is still this server's: another server
    started in the same directory since has rewritten it, and keeps it."""
    try:
        record = json.loads((run_dir / KEY_OWNER).read_text())
        key_file = Path(record["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if record.get("api_key_sha256") and key_fingerprint(read_keys(key_file)) == record["api_key_sha256"]:
        key_file.unlink(missing_ok=True)
    (run_dir / KEY_OWNER).unlink(missing_ok=True)


# A key is renewed once half its lifetime has passed since we first saw it: TorchServe wrote it a
# moment before, and the other half leaves room for a slow call or a busy machine.
RENEW_AFTER_FRACTION = 0.5
RENEWED_APIS = ("management", "inference")


@dataclass
class KeyRenewer:
    """Renews a token-authorized server's inference and management keys before they expire,
    through TorchServe's /token API and the key file's never-expiring "API" key: TorchServe 0.12
    renews nothing itself, and once a key has expired every call with it is refused."""
    key_file: Path
    management_address: str
    lifetime_s: float
    run_dir: Path
    seen: dict[str, tuple[str, float]] = field(default_factory=dict)   # api -> (key, when first seen)
    recorded: bool = False

    def tick(self) -> None:
        """Called often: renew what is due. A failed call is tried again at the next tick."""
        keys = read_keys(self.key_file)
        if keys is None:
            return
        now = time.monotonic()
        for api in RENEWED_APIS:
            key = (keys.get(api) or {}).get("key")
            if key != self.seen.get(api, (None, 0.0))[0]:
                self.seen[api] = (key, now)
            elif now - self.seen[api][1] >= self.lifetime_s * RENEW_AFTER_FRACTION:
                self.renew(api)

    def renew(self, api: str) -> None:
        request = urllib.request.Request(f"{self.management_address}/token?type={api}", method="POST")
        try:
            with open_authorized(request, self.key_file, "API", timeout_s=5):
                pass
        except (NotReady, urllib.error.URLError, ConnectionError, TimeoutError):
            return   # not listening yet, or busy: the next tick tries again
        if not self.recorded:   # the file's API key renewed a key here: the file is this server's
            record_key_file(self.run_dir, self.key_file)
            self.recorded = True


def key_renewer(properties: dict, run_dir: Path) -> KeyRenewer | None:
    """A renewer for a server started in this process's directory, when its keys expire."""
    key_file = key_file_of(properties, None)
    if key_file is None:
        return None
    return KeyRenewer(key_file, address(properties, "management_address"), key_lifetime_s(properties), run_dir)
