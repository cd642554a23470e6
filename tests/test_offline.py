"""Offline, with no MNIST copy named: the commands say where to point them, in one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from training.data import DATA_DIR_ENV


def test_export_offline_without_a_data_dir_names_the_option_in_one_line(tmp_path, quick_checkpoint):
    # unshare --net: a network namespace with only a downed loopback, as on a machine offline.
    env = {name: value for name, value in os.environ.items() if name != DATA_DIR_ENV}
    export = Path(sys.executable).with_name("mnist-export")
    result = subprocess.run(["unshare", "--net", str(export), "--checkpoint", str(quick_checkpoint),
                             "--out-dir", str(tmp_path / "out"), "--force"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--data-dir" in lines[0] and f"${DATA_DIR_ENV}" in lines[0], result.stderr
    assert not any((tmp_path / "out").glob("*")), "nothing is written"
