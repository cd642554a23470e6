"""Build the TorchServe model archive (.mar) from an exported artifact (TorchScript, or ONNX
for ONNX Runtime, e.g. the int8 model).

    python -m serving.archive --serialized-file artifacts/mnist_cnn.torchscript.pt --export-path model_store

packs the model (its metadata inside), handler.py, preprocess.py, runtime.py and model-config.yaml
into model_store/mnist.mar. The archive version is the artifact's own model_version.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

SERVING_DIR = Path(__file__).resolve().parent
MODEL_NAME = "mnist"


def archive_command(serialized_file: str, export_path: str, version: str, model_config: str) -> list[str]:
    return [str(Path(sys.executable).with_name("torch-model-archiver")), "--force",
            "--model-name", MODEL_NAME, "--version", version,
            "--serialized-file", serialized_file,
            "--handler", str(SERVING_DIR / "handler.py"),
            "--extra-files", f"{SERVING_DIR / 'preprocess.py'},{SERVING_DIR / 'runtime.py'}",
            "--config-file", model_config,
            "--export-path", export_path]


def build_archive(serialized_file: str | Path, export_path: str | Path,
                  model_config: str | Path = SERVING_DIR / "model-config.yaml") -> Path:
    """Returns the path of the .mar; raises click.ClickException with the archiver's message."""
    import torch

    from .runtime import load_model

    serialized_file, export_path = Path(serialized_file), Path(export_path)
    if not serialized_file.is_file():
        raise click.ClickException(f"no exported model at {serialized_file}: run `make export` first")
    try:  # the handler will load it the same way: refuse a file that is not one of our artifacts now
        _, metadata = load_model(str(serialized_file), torch.device("cpu"), 1)
    except Exception as error:
        raise click.ClickException(f"{serialized_file} is not a digitserve model: {error}") from None
    export_path.mkdir(parents=True, exist_ok=True)
    command = archive_command(str(serialized_file), str(export_path), metadata["model_version"], str(model_config))
    run = subprocess.run(command,
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise click.ClickException(f"torch-model-archiver failed: {run.stderr.strip() or run.stdout.strip()}")
    return export_path / f"{MODEL_NAME}.mar"


@click.command()
@click.option("--serialized-file", default="artifacts/mnist_cnn.torchscript.pt", show_default=True)
@click.option("--export-path", default="model_store", show_default=True)
def main(serialized_file: str, export_path: str) -> None:
    """Pack the exported model, handler and preprocessing into a TorchServe archive."""
    click.echo(f"wrote {build_archive(serialized_file, export_path)}")


if __name__ == "__main__":
    main()
