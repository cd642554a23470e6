"""A disk cache for generated image sets, keyed by everything that makes them.

Every generated digit and non-digit goes through the server's own preprocessing
(training/synthetic.py), and with photo-aware preprocessing a set of ~10,000 images costs tens of
seconds of CPU in every process that trains: each DDP rank, each restart, each test that trains.
The images depend only on the request (split, counts), the code that draws and preprocesses them,
the fonts, and the NumPy and Pillow versions, so the key is a hash of all of those: a change to
any of them is a new key, never a stale set.

    DIGITSERVE_CACHE=<dir>   where sets are kept (default: $XDG_CACHE_HOME/digitserve, else
                             ~/.cache/digitserve); DIGITSERVE_CACHE=off generates every time.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import PIL

from .durable import write_atomic

CACHE_ENV = "DIGITSERVE_CACHE"
OFF = "off"
FORMAT = 1     # bump when what a cached file holds changes


def cache_dir() -> Path | None:
    """Where sets are kept; None when the cache is off."""
    chosen = os.environ.get(CACHE_ENV, "")
    if chosen == OFF:
        return None
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "digitserve"


def sources_digest(sources: Iterable[Path]) -> str:
    """sha256 of the code's files. Taken when the code is imported (synthetic.SOURCES_DIGEST), so
    a file edited while a process runs cannot key what the process's older code made."""
    digest = hashlib.sha256()
    for source in sorted(Path(s) for s in sources):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()


def set_key(request: dict, code_digest: str, fonts: Iterable[Path]) -> str:
    """sha256 over the request, the code's digest, the fonts' names and sizes, and the versions
    of the libraries that draw and resample."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "request": request, "code": code_digest,
                                        "numpy": np.__version__, "pillow": PIL.__version__}, sort_keys=True).encode())
    for font in sorted(Path(f) for f in fonts):
        digest.update(f"{font}:{font.stat().st_size}".encode())
    return digest.hexdigest()[:32]


def load(path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """The arrays and metadata stored at path, or None if it is missing or unreadable (a
    half-written file from a killed process is never read: writes are renamed into place)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files if name != "meta"}
            return arrays, json.loads(str(stored["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def store(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write atomically (durable.write_atomic): concurrent ranks may race to store the same set;
    each renames a complete file into place, and a failed write leaves no temp file behind. A
    cache that cannot be written (read-only home) is skipped."""
    try:
        write_atomic(path, lambda out: np.savez(out, meta=np.array(json.dumps(meta)), **arrays))
    except OSError:
        return


def cached(key: str, build: Callable[[], tuple[dict[str, np.ndarray], dict]]) -> tuple[dict[str, np.ndarray], dict]:
    """build()'s arrays and metadata, from the cache when a set of this key is there."""
    folder = cache_dir()
    if folder is None:
        return build()
    path = folder / f"set-{key}.npz"
    found = load(path)
    if found is not None:
        return found
    made = build()
    store(path, *made)
    return made
