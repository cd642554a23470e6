"""What a server loaded at start: its archives' digests, kept in its run dir, so that `start`
can tell a server that still serves the archives on disk from one that serves old ones (a
retrain, or `make archive SERVE_MODEL=...`, rewrites model_store/mnist.mar under a running server).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

SERVED_FILE = "served-archives.json"


@dataclass(frozen=True)
class Served:
    """The archives a config loads at start (load_models), each with the sha256 of its bytes."""
    archives: dict[str, str]       # path -> sha256 ("" when the file is missing)

    def changed(self, now: Served) -> list[str]:
        return sorted(path for path in {*self.archives, *now.archives}
                      if self.archives.get(path) != now.archives.get(path))


def sha256_of(path: Path) -> str:
    if not path.is_file():
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as archive:
        for block in iter(lambda: archive.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def archive_paths(properties: dict, cwd: str | os.PathLike | None) -> list[Path]:
    """The .mar files of load_models (`name=file.mar,...` or `file.mar`), under model_store."""
    store = Path(cwd or ".") / properties.get("model_store", "model_store")
    entries = [entry.strip() for entry in properties.get("load_models", "").split(",") if entry.strip()]
    names = [entry.split("=", 1)[-1] for entry in entries if entry not in ("ALL", "all")]
    return [(store / name).resolve() for name in names if name.endswith(".mar")]


def on_disk(properties: dict, cwd: str | os.PathLike | None) -> Served:
    return Served({str(path): sha256_of(path) for path in archive_paths(properties, cwd)})


def record(run_dir: Path, served: Served) -> None:
    (run_dir / SERVED_FILE).write_text(json.dumps(asdict(served), indent=1) + "\n")


def recorded(run_dir: Path) -> Served | None:
    """What the server of run_dir loaded at start; None when it left no record."""
    try:
        return Served(**json.loads((run_dir / SERVED_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None
