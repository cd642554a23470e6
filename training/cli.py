"""`mnist-train` / `python -m training`: options map onto TrainConfig, then train() runs."""
from __future__ import annotations

import os
import sys

import click

from .checkpoint import CheckpointError
from .config import (AMP_DTYPES, CUDA_GRAPH_CHOICES, DEFAULT_OUT, DEFAULT_OUTLIER_IMAGES, DEFAULT_OUTLIER_WEIGHT,
                     DEFAULT_SYNTHETIC_DIGITS, DEFAULT_VAL_IMAGES, DEVICES, MEMORY_FORMATS, PIPELINES, QUICK,
                     SELECT_BY, ConfigError, TrainConfig)
from .data import DATA_DIR_ENV, DataError
from .dist import PeerLostError
from .synthetic import FontsMissing
from .train import train

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
@click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), default=DEFAULTS.ema_decay,
              help="Keep and evaluate an exponential moving average of the weights (e.g. 0.999); 0: off.")
@click.option("--amp/--no-amp", default=DEFAULTS.amp, help="Mixed precision with torch.autocast.")
@click.option("--amp-dtype", type=click.Choice(AMP_DTYPES), default=DEFAULTS.amp_dtype,
              help="auto: on the CPU bf16 or plain fp32, whichever measures faster at start; on CUDA bf16 "
                   "where the card has it, else fp16 (with GradScaler). fp16 needs CUDA.")
@click.option("--memory-format", type=click.Choice(MEMORY_FORMATS), default=DEFAULTS.memory_format,
              help="auto: channels_last or contiguous, whichever measures faster at start.")
@click.option("--cuda-graph", type=click.Choice(CUDA_GRAPH_CHOICES), default=DEFAULTS.cuda_graph,
              help="auto: replay each step as one CUDA graph where possible (one GPU process, bf16/fp32).")
@click.option("--seed", type=int, default=DEFAULTS.seed, help="Seed for weights, shuffling and augmentation.")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar=DATA_DIR_ENV, default=None,
              help=f"Existing MNIST copy in torchvision layout (read-only). Unset: download into ./data. "
                   f"Env: {DATA_DIR_ENV}.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help=f"Checkpoint path; metrics.jsonl and test_report.json go beside it. "
                   f"[default: {DEFAULT_OUT}; with --quick: {QUICK.out}]")
@click.option("--pipeline", type=click.Choice(PIPELINES), default=DEFAULTS.pipeline,
              help="tensor: data in memory, augmentation on whole batches (fast). "
                   "torchvision: per-image transforms in a DataLoader (the textbook baseline).")
@click.option("--num-workers", type=click.IntRange(min=0), default=DEFAULTS.num_workers,
              help="DataLoader worker processes (torchvision pipeline only).")
@click.option("--device", type=click.Choice(DEVICES), default=DEFAULTS.device,
              help="auto: CUDA when available.")
@click.option("--threads-per-rank", type=click.IntRange(min=0), default=DEFAULTS.threads_per_rank,
              help="Torch threads per process; 0: cores divided by the processes on this machine.")
@click.option("--train-subset", type=click.IntRange(min=0), default=DEFAULTS.train_subset,
              help="Train on the first N training images only; 0: all 60,000.")
@click.option("--val-images", type=click.IntRange(min=1), default=None,
              help=f"Hold out the last N training images: the not-a-digit threshold is chosen on them (never on "
                   f"the test set), and --select-by val_acc picks the epoch by them. "
                   f"[default: {DEFAULT_VAL_IMAGES}; with --quick: {QUICK.val_images}]")
@click.option("--select-by", type=click.Choice(SELECT_BY), default=DEFAULTS.select_by,
              help="final: keep the last weights (EMA-averaged unless --ema-decay 0); val_acc: the epoch with the "
                   "best accuracy on the held-out images. Test accuracy is reported once, for the kept weights.")
@click.option("--max-stroke-change", type=click.FloatRange(0, 1), default=DEFAULTS.max_stroke_change,
              help="Augmentation: thicken or thin each image's strokes by up to this share of a 3x3 "
                   "dilation/erosion (bold and light typefaces, markers and fine pens); 0: off.")
@click.option("--shift-share", type=click.FloatRange(0, 1), default=DEFAULTS.shift_share,
              help="Augmentation: this share of each batch gets one everyday shift (noise, blur, a line across, "
                   "outlines only, fog, scale and shear; training/shift_augment.py); 0: off.")
@click.option("--synthetic-digits", type=click.IntRange(min=0), default=None,
              help=f"Add this many generated typed and drawn digits (training/synthetic.py, their own fonts and "
                   f"seeds) to the training set; 0: MNIST only. [default: {DEFAULT_SYNTHETIC_DIGITS}; with --quick: "
                   f"{QUICK.synthetic_digits}]")
@click.option("--outlier-weight", type=click.FloatRange(min=0), default=None,
              help=f"Outlier exposure: every batch also holds generated non-digits (letters, words, scribbles, "
                   f"textures, noise; training/synthetic.py), and the loss pushes their probabilities towards "
                   f"uniform with this weight, so that 'not a digit' can be told. 0: off. "
                   f"[default: {DEFAULT_OUTLIER_WEIGHT}; with --quick: {QUICK.outlier_weight}]")
@click.option("--outlier-images", type=click.IntRange(min=1), default=None,
              help=f"Generated non-digits to draw them from. [default: {DEFAULT_OUTLIER_IMAGES}; with --quick: "
                   f"{QUICK.outlier_images}]")
@click.option("--tensorboard", type=click.Path(file_okay=False), default=None,
              help="Write loss, accuracy, learning rate and images/s as TensorBoard events into this folder.")
@click.option("--peer-timeout-s", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.peer_timeout_s,
              help="Multi-rank runs: how long a rank waits for the others in one step before it fails, naming "
                   "them (a lost machine sends nothing: without this bound the job would hang).")
@click.option("--quick", is_flag=True, help=f"Smoke run: {QUICK.describe()}; writes {QUICK.out} unless --out.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run whose checkpoint is at --out.")
@click.option("--force", is_flag=True, help="Let a fresh run replace the checkpoint of a finished run at --out.")
def main(**options) -> None:
    """Train the digit CNN on MNIST and write a self-describing checkpoint that keeps the final
    EMA-averaged weights by default.

    \b
    mnist-train --data-dir ../shared/mnist
    torchrun --standalone --nproc-per-node=2 -m training --data-dir ../shared/mnist

    Several machines (torchrun --nnodes 2 ... --rdzv-backend c10d): see docs/multihost.md.
    A run that torchrun restarts (--max-restarts) resumes from its last epoch by itself.
    """
    try:
        train(TrainConfig(**options))
    except (ConfigError, DataError, CheckpointError, PeerLostError, FontsMissing) as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        interrupted()


def interrupted() -> None:
    """Ctrl-C: one line from rank 0, a quiet exit from the other ranks (under torchrun each gets
    the signal), status 130. os._exit skips the process group's teardown, which aborts the
    interpreter ("Fatal Python error: Aborted", status 134) when the signal cut a collective;
    every checkpoint write is already complete or removed by then (write_atomic)."""
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo("interrupted; rerun the same command with --resume to continue", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
