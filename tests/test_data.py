"""The MNIST copy is read with numpy, as torchvision reads it, without importing torchvision."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from repo import subprocess_env
from training.data import IDX_FILES, DataError, load_mnist


@pytest.mark.parametrize("train", [True, False])
def test_the_idx_files_read_as_torchvision_reads_them(data_dir, train):
    from torchvision.datasets import MNIST

    images, labels = load_mnist(data_dir, train)
    reference = MNIST(data_dir, train=train, download=False)
    assert torch.equal(images, reference.data) and torch.equal(labels, reference.targets.long())
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and images.shape[1:] == (28, 28)


def test_training_and_export_read_mnist_without_importing_torchvision(data_dir):
    script = ("import sys; from training.data import load_mnist; import export.run, training.cli; "
              f"load_mnist({data_dir!r}, False); print('torchvision' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True)
    assert run.stdout.strip() == "False", run.stderr


@pytest.mark.parametrize("damage,message", [
    (lambda data: data[:-1], "cut short"),
    (lambda data: b"\x00\x00\x08\x01" + data[4:], "not an MNIST IDX file"),   # a labels file's magic
])
def test_a_damaged_file_is_a_data_error_naming_it(tmp_path, data_dir, damage, message):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images_name, labels_name = IDX_FILES[False]
    shutil.copyfile(f"{data_dir}/MNIST/raw/{labels_name}", raw / labels_name)
    original = open(f"{data_dir}/MNIST/raw/{images_name}", "rb").read()
    (raw / images_name).write_bytes(damage(original))
    with pytest.raises(DataError, match=message) as raised:
        load_mnist(tmp_path, False)
    assert images_name in str(raised.value)
