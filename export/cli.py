"""`mnist-export` / `python -m export`: options map onto ExportConfig, then run_export() runs."""
from __future__ import annotations

import click

from serving.handler.artifact import INT8_NAME, SERVE_ACCURACY_FLOOR
from training.checkpoint import CheckpointError
from training.durable import sigterm_raises
from training.data import DATA_DIR_ENV, DataError

from .parity import ParityError, format_report
from .quantize import format_int8
from .run import ExportConfig, ExportError, run_export

DEFAULTS = ExportConfig()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=DEFAULTS.checkpoint,
              help="Training checkpoint (from mnist-train).")
@click.option("--out-dir", type=click.Path(file_okay=False), default=DEFAULTS.out_dir,
              help="Where the TorchScript, ONNX and parity report files go.")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar=DATA_DIR_ENV, default=None,
              help=f"MNIST copy for the parity check on the 10,000 test images. Env: {DATA_DIR_ENV}.")
@click.option("--model-version", default=None,
              help="Version string stored in the artifacts. [default: w- and the first 12 hex digits of the "
                   "weights' SHA-256, so each model has its own]")
@click.option("--opset", type=click.IntRange(13, 21), default=DEFAULTS.opset, help="ONNX opset.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=DEFAULTS.tolerance,
              help="Largest allowed |logit difference| against eager PyTorch.")
@click.option("--parity-images", type=click.IntRange(min=1), default=None,
              help="Check parity and measure accuracy on the first N test images only (default: all "
                   "10,000; the artifacts record how many). For quick checks and tests.")
@click.option("--quantize", is_flag=True,
              help=f"Also write {INT8_NAME}: static int8, calibrated on 2,048 training images, "
                   "with its accuracy and speed next to fp32.")
@click.option("--force", is_flag=True,
              help=f"Export even a checkpoint below the {SERVE_ACCURACY_FLOOR:.0%} test accuracy floor for serving.")
def main(**options) -> None:
    """Export the checkpoint to TorchScript and ONNX and prove parity with eager PyTorch.

    \b
    mnist-export --data-dir ../shared/mnist
    """
    try:
        with sigterm_raises():   # SIGTERM still removes the temp files and never splits the pair
            report = run_export(ExportConfig(**options))
    except (CheckpointError, DataError, ExportError) as error:
        raise click.ClickException(str(error)) from None
    except ParityError as error:
        raise click.ClickException(f"parity check failed, no artifact written:\n{error}") from None
    click.echo(format_report(report))
    if "int8" in report:
        click.echo(format_int8(report["int8"]))
    for kind, path in report["artifacts"].items():
        click.echo(f"wrote {path} ({kind})")
