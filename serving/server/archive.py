"""Build the TorchServe model archive (.mar) from an exported artifact (TorchScript, or ONNX
for ONNX Runtime, e.g. the int8 model).

    python -m serving.server.archive --serialized-file artifacts/mnist_cnn.torchscript.pt --export-path model_store

packs the model (its metadata inside) and ARCHIVE_SOURCES (handler.py, the modules it imports,
model-config.yaml) into model_store/mnist.mar. The archive version is the artifact's own
model_version unless --version names another; answers carry it as model_version, so a rolling
update shows in them:

    python -m serving.server.archive --version 2.0 --export-path .run/v2
    python -m serving.fleet rollout .run/v2/mnist.mar

A model whose test accuracy is below SERVE_ACCURACY_FLOOR is refused unless --force.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click

from serving.handler.artifact import (ARCHIVE_NAME, MODEL_NAME, SERVE_ACCURACY_FLOOR, TORCHSCRIPT_NAME, artifact_path,
                                      read_metadata)

# What ships in the archive is exactly serving/handler/ (tests/test_layout.py compares the two).
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "handler"
HANDLER = "handler.py"
# Shipped beside handler.py: the handler imports them as top-level modules inside the archive.
HANDLER_MODULES = ("preprocess.py", "photo.py", "artifact.py", "protocol.py", "parsing.py", "explain.py")
MODEL_CONFIG = "model-config.yaml"
# Every file of serving/handler/ that goes into the archive, named once; the archiver adds the model
# and its manifest (archive_contents).
ARCHIVE_SOURCES = (HANDLER, *HANDLER_MODULES, MODEL_CONFIG)
MANIFEST = "MAR-INF/MANIFEST.json"
# A version becomes a path segment of TorchServe's management API (/models/mnist/<version>).
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ArchiveError(Exception):
    """An archive that cannot be built; the message says why, in one line."""


def archive_contents(serialized_file: str | Path) -> set[str]:
    """The names inside a .mar built from serialized_file: exactly these, nothing else."""
    return {*ARCHIVE_SOURCES, Path(serialized_file).name, MANIFEST}


def archive_command(serialized_file: str, export_path: str, version: str, model_config: str) -> list[str]:
    return [str(Path(sys.executable).with_name("torch-model-archiver")), "--force",
            "--model-name", MODEL_NAME, "--version", version,
            "--serialized-file", serialized_file,
            "--handler", str(SHIPPED_DIR / HANDLER),
            "--extra-files", ",".join(str(SHIPPED_DIR / name) for name in HANDLER_MODULES),
            "--config-file", model_config,
            "--export-path", export_path]


def check_accuracy(metadata: dict, serialized_file: Path) -> None:
    """ArchiveError unless the model's recorded test accuracy reaches SERVE_ACCURACY_FLOOR:
    a smoke-test model must never silently replace a trained one in the model store."""
    accuracy = metadata.get("checkpoint_test_acc")
    if not isinstance(accuracy, (int, float)):
        raise ArchiveError(f"{serialized_file} records no test accuracy (checkpoint_test_acc); "
                           "serve it anyway with --force (make archive FORCE=1)")
    if accuracy < SERVE_ACCURACY_FLOOR:
        raise ArchiveError(f"{serialized_file} scored {accuracy:.2%} on the test set, below the "
                           f"{SERVE_ACCURACY_FLOOR:.0%} floor for serving (a smoke-test model?); train it fully "
                           "(`make train`) or serve it anyway with --force (make archive FORCE=1)")


def build_archive(serialized_file: str | Path, export_path: str | Path,
                  model_config: str | Path = SHIPPED_DIR / MODEL_CONFIG, force: bool = False,
                  version: str | None = None) -> Path:
    """Returns the path of the .mar; raises ArchiveError with the reason (the archiver's message).
    force: archive a model below SERVE_ACCURACY_FLOOR too. version: the archive's version, which
    answers carry as model_version (default: the artifact's own model_version)."""
    if version is not None and not VERSION_PATTERN.fullmatch(version):
        raise ArchiveError(f"version {version!r} must be letters, digits, '.', '_' or '-' (at most 64), "
                           "starting with a letter or digit: it becomes part of a URL")
    serialized_file, export_path = Path(serialized_file), Path(export_path)
    if not serialized_file.is_file():
        raise ArchiveError(f"no exported model at {serialized_file}: run `make export` first")
    try:  # the handler will load it the same way: refuse a file that is not one of our artifacts now
        metadata = read_metadata(serialized_file)
    except Exception as error:
        raise ArchiveError(f"{serialized_file} is not a digitserve model: {error}") from None
    if not force:
        check_accuracy(metadata, serialized_file)
    export_path.mkdir(parents=True, exist_ok=True)
    command = archive_command(str(serialized_file), str(export_path), version or metadata["model_version"],
                              str(model_config))
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise ArchiveError(f"torch-model-archiver failed: {run.stderr.strip() or run.stdout.strip()}")
    return export_path / ARCHIVE_NAME


@click.command()
@click.option("--serialized-file", default=artifact_path(TORCHSCRIPT_NAME), show_default=True)
@click.option("--export-path", default="model_store", show_default=True)
@click.option("--force", is_flag=True, help=f"Archive a model below the {SERVE_ACCURACY_FLOOR:.0%} accuracy floor too.")
@click.option("--version", default=None, help="The archive's version, answered as model_version "
              "[default: the artifact's own model_version].")
def main(serialized_file: str, export_path: str, force: bool, version: str | None) -> None:
    """Pack the exported model, handler and preprocessing into a TorchServe archive."""
    try:
        click.echo(f"wrote {build_archive(serialized_file, export_path, force=force, version=version)}")
    except ArchiveError as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
