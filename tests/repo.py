"""Where the repository is, and how tests start its commands as real processes."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"


def subprocess_env(**extra: str) -> dict:
    """The environment for a child Python: the repo importable, one OpenMP thread per process
    (two ranks on two cores), unbuffered output so tests can read it line by line."""
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def torchrun_command(*args: str, nproc: int = 2) -> list[str]:
    """A real torchrun on this machine with nproc processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
