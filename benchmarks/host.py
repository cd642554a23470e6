"""The machine a figure was measured on, as every benchmark names it: `lscpu`'s model name."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo's, as lscpu prints it); Python's guess elsewhere."""
    named = (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name"))
    return next(named, None) or platform.processor() or "unknown CPU"
