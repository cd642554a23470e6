"""Build the TorchServe model archive (.mar) from an exported artifact (TorchScript, or ONNX
for ONNX Runtime, e.g. the int8 model).

    python -m serving.archive --serialized-file artifacts/mnist_cnn.torchscript.pt --export-path model_store

packs the model (its metadata inside), handler.py, preprocess.py, artifact.py, protocol.py and model-config.yaml
into model_store/mnist.mar. The archive version is the artifact's own model_version.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from .artifact import ARCHIVE_NAME, MODEL_NAME, TORCHSCRIPT_NAME, artifact_path, read_metadata

SERVING_DIR = Path(__file__).resolve().parent
# Shipped beside handler.py: the handler imports them as top-level modules inside the archive.
HANDLER_MODULES = ("preprocess.py", "artifact.py", "protocol.py", "parsing.py")


def archive_command(serialized_file: str, export_path: str, version: str, model_config: str) -> list[str]:
    return [str(Path(sys.executable).with_name("torch-model-archiver")), "--force",
            "--model-name", MODEL_NAME, "--version", version,
            "--serialized-file", serialized_file,
            "--handler", str(SERVING_DIR / "handler.py"),
            "--extra-files", ",".join(str(SERVING_DIR / name) for name in HANDLER_MODULES),
            "--config-file", model_config,
            "--export-path", export_path]


def build_archive(serialized_file: str | Path, export_path: str | Path,
                  model_config: str | Path = SERVING_DIR / "model-config.yaml") -> Path:
    """Returns the path of the .mar; raises click.ClickException with the archiver's message."""
    serialized_file, export_path = Path(serialized_file), Path(export_path)
    if not serialized_file.is_file():
        raise click.ClickException(f"no exported model at {serialized_file}: run `make export` first")
    try:  # the handler will load it the same way: refuse a file that is not one of our artifacts now
        metadata = read_metadata(serialized_file)
    except Exception as error:
        raise click.ClickException(f"{serialized_file} is not a digitserve model: {error}") from None
    export_path.mkdir(parents=True, exist_ok=True)
    command = archive_command(str(serialized_file), str(export_path), metadata["model_version"], str(model_config))
    run = subprocess.run(command,
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise click.ClickException(f"torch-model-archiver failed: {run.stderr.strip() or run.stdout.strip()}")
    return export_path / ARCHIVE_NAME


@click.command()
@click.option("--serialized-file", default=artifact_path(TORCHSCRIPT_NAME), show_default=True)
@click.option("--export-path", default="model_store", show_default=True)
def main(serialized_file: str, export_path: str) -> None:
    """Pack the exported model, handler and preprocessing into a TorchServe archive."""
    click.echo(f"wrote {build_archive(serialized_file, export_path)}")


if __name__ == "__main__":
    main()
