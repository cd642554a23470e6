"""`mnist-train` / `python -m training`: options map onto TrainConfig, then train() runs."""
from __future__ import annotations

import click

from .checkpoint import CheckpointError
from .data import DATA_DIR_ENV, DataError
from .train import ConfigError, TrainConfig, train

DEFAULTS = TrainConfig()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--epochs", type=click.IntRange(min=1), default=DEFAULTS.epochs, help="Passes over the training set.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size,
              help="Global batch size, split evenly over the torchrun ranks.")
@click.option("--lr", type=float, default=DEFAULTS.lr, help="Peak AdamW learning rate, reached after warmup.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=DEFAULTS.weight_decay,
              help="AdamW decoupled weight decay.")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=DEFAULTS.warmup_epochs,
              help="Linear warmup length (fractions allowed); cosine decay to zero follows.")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=DEFAULTS.label_smoothing,
              help="Cross-entropy label smoothing.")
@click.option("--amp/--no-amp", default=DEFAULTS.amp, help="Mixed precision with torch.autocast.")
@click.option("--amp-dtype", type=click.Choice(["auto", "bf16", "fp16"]), default=DEFAULTS.amp_dtype,
              help="auto: bf16 on CPU and CUDA cards with bf16, else fp16 (with GradScaler). fp16 needs CUDA.")
@click.option("--seed", type=int, default=DEFAULTS.seed, help="Seed for weights, shuffling and augmentation.")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar=DATA_DIR_ENV, default=None,
              help=f"Existing MNIST copy in torchvision layout (read-only). Unset: download into ./data. "
                   f"Env: {DATA_DIR_ENV}.")
@click.option("--out", type=click.Path(dir_okay=False), default=DEFAULTS.out,
              help="Checkpoint path; metrics.jsonl and test_report.json go beside it.")
@click.option("--pipeline", type=click.Choice(["tensor", "torchvision"]), default=DEFAULTS.pipeline,
              help="tensor: data in memory, augmentation on whole batches (fast). "
                   "torchvision: per-image transforms in a DataLoader (the textbook baseline).")
@click.option("--num-workers", type=click.IntRange(min=0), default=DEFAULTS.num_workers,
              help="DataLoader worker processes (torchvision pipeline only).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=DEFAULTS.device,
              help="auto: CUDA when available.")
@click.option("--threads-per-rank", type=click.IntRange(min=0), default=DEFAULTS.threads_per_rank,
              help="Torch threads per process; 0: cores divided by the processes on this machine.")
@click.option("--train-subset", type=click.IntRange(min=0), default=DEFAULTS.train_subset,
              help="Train on the first N training images only; 0: all 60,000.")
@click.option("--quick", is_flag=True, help="Smoke run: 1024 training and 512 test images, at most 2 epochs.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run whose checkpoint is at --out.")
def main(**options) -> None:
    """Train the digit CNN on MNIST and write a self-describing checkpoint.

    \b
    mnist-train --data-dir ../shared/mnist
    torchrun --standalone --nproc-per-node=2 -m training --data-dir ../shared/mnist
    """
    try:
        train(TrainConfig(**options))
    except (ConfigError, DataError, CheckpointError) as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; rerun the same command with --resume to continue") from None
