"""What the model sees of each kind of capture (issue 26, point 1): a contact sheet of real MNIST
test digits captured the ways training/captures.py makes them, the image sent beside the 28x28
that preprocessing hands the model, and, with a checkpoint, how many of each kind are accepted
as digits and read right.

    python -m benchmarks.contact_sheet --data-dir ../shared/mnist --checkpoint artifacts/mnist_cnn.pt
    -> writes docs/preprocessing.png and the generated block of docs/preprocessing.md
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw

from training.captures import CAPTURES, captured
from benchmarks.report import replace_block
from benchmarks.host import cpu_name
from serving.handler.artifact import Trust
from serving.handler.preprocess import ImageError, decode_image, preprocess_bytes
from training.data import DATA_DIR_ENV, MNIST_MEAN, MNIST_STD, load_mnist

DOCS = Path(__file__).resolve().parents[1] / "docs"
SHEET = DOCS / "preprocessing.png"
PAGE = DOCS / "preprocessing.md"
BEGIN, END = "<!-- contact_sheet:begin -->", "<!-- contact_sheet:end -->"
SHEET_DIGITS = 4           # test digits per row of the picture
THUMB = 96                 # px per shown image
SEED = 2026


@dataclass(frozen=True)
class KindResult:
    """How one capture kind fared: shares of the digits sent."""
    name: str
    accepted: float        # answered is_digit
    correct: float         # argmax is the label
    accepted_correct: float
    refused_unreadable: float   # preprocessing refused the image (no_digit and the like)


def model_input(data: bytes) -> np.ndarray | None:
    try:
        return preprocess_bytes(data, MNIST_MEAN, MNIST_STD)
    except ImageError:
        return None


def measure_kind(name: str, model, trust: Trust, digits: np.ndarray, labels: np.ndarray, seed: int) -> KindResult:
    import torch

    inputs = [model_input(data) for data in captured(name, digits, seed)]
    read = np.array([pixels is not None for pixels in inputs])
    batch = np.stack([pixels if pixels is not None else np.zeros((1, 28, 28), np.float32) for pixels in inputs])
    with torch.no_grad():
        logits = model(torch.from_numpy(batch)).float().numpy()
    accepted = trust.is_digit(logits) & read
    correct = (logits.argmax(axis=1) == labels) & read
    return KindResult(name, float(accepted.mean()), float(correct.mean()), float((accepted & correct).mean()),
                      float(1 - read.mean()))


def measure(checkpoint: str, digits: np.ndarray, labels: np.ndarray, seed: int = SEED) -> list[KindResult]:
    from export.artifacts import load_model

    model, saved = load_model(checkpoint)
    trust = Trust.from_metadata(saved)
    return [measure_kind(capture.name, model, trust, digits, labels, seed) for capture in CAPTURES]


def thumbnail(image: Image.Image) -> Image.Image:
    image = image.convert("L")
    image.thumbnail((THUMB, THUMB), Image.BILINEAR)
    tile = Image.new("L", (THUMB, THUMB), 128)
    tile.paste(image, ((THUMB - image.width) // 2, (THUMB - image.height) // 2))
    return tile


def seen_tile(data: bytes) -> Image.Image:
    pixels = model_input(data)
    if pixels is None:
        return Image.new("L", (THUMB, THUMB), 60)
    unit = np.clip(pixels[0] * MNIST_STD + MNIST_MEAN, 0, 1)
    return Image.fromarray((unit * 255).round().astype(np.uint8)).resize((THUMB, THUMB), Image.NEAREST)


def draw_sheet(digits: np.ndarray, path: Path, seed: int = SEED) -> None:
    """One row per capture kind: (sent, seen) for each of the first SHEET_DIGITS digits."""
    label_width, gap = 150, 6
    width = label_width + SHEET_DIGITS * (2 * THUMB + 3 * gap)
    sheet = Image.new("L", (width, len(CAPTURES) * (THUMB + gap) + 24), 255)
    draw = ImageDraw.Draw(sheet)
    draw.text((label_width, 4), "each pair: the image sent | the 28x28 the model sees", fill=0)
    for row, capture in enumerate(CAPTURES):
        y = 24 + row * (THUMB + gap)
        draw.text((6, y + THUMB // 2 - 6), capture.name, fill=0)
        for column, data in enumerate(captured(capture.name, digits[:SHEET_DIGITS], seed)):
            x = label_width + column * (2 * THUMB + 3 * gap)
            sheet.paste(thumbnail(decode_image(data)), (x, y))
            sheet.paste(seen_tile(data), (x + THUMB + gap, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def markdown_block(results: list[KindResult], count: int, checkpoint: str, command: str) -> str:
    lines = [BEGIN, f"Written by `{command}` on {cpu_name()}: {count} MNIST test digits per kind, "
                    f"model `{checkpoint}`.", "",
             "| capture | accepted | read right | accepted and right | refused by preprocessing |",
             "|---|---:|---:|---:|---:|"]
    description = {capture.name: capture.description for capture in CAPTURES}
    for result in results:
        lines.append(f"| {result.name}: {description[result.name]} | {result.accepted:.1%} | {result.correct:.1%} | "
                     f"{result.accepted_correct:.1%} | {result.refused_unreadable:.1%} |")
    return "\n".join([*lines, END])


def write_block(block: str, page: Path = PAGE) -> None:
    replace_block(page, BEGIN, END, block)


@click.command()
@click.option("--data-dir", envvar=DATA_DIR_ENV, required=True, help=f"MNIST copy (env {DATA_DIR_ENV}).")
@click.option("--checkpoint", default=None, help="Also measure accepted / read right per kind with this model.")
@click.option("--count", type=click.IntRange(min=10), default=300, show_default=True,
              help="MNIST test digits per kind for the measurement.")
def main(data_dir, checkpoint, count) -> None:
    """Draw docs/preprocessing.png; with --checkpoint, also write docs/preprocessing.md's table."""
    images, labels = load_mnist(data_dir, train=False)
    digits = images.numpy().reshape(-1, 28, 28)
    draw_sheet(digits, SHEET)
    click.echo(f"wrote {SHEET}")
    if checkpoint:
        # The last `count` test digits: not the ones drawn on the sheet.
        results = measure(checkpoint, digits[-count:], labels.numpy()[-count:])
        command = f"python -m benchmarks.contact_sheet --checkpoint {checkpoint} --count {count}"
        write_block(markdown_block(results, count, checkpoint, command))
        for result in results:
            click.echo(f"{result.name:15s} accepted {result.accepted:6.1%}  right {result.correct:6.1%}  "
                       f"both {result.accepted_correct:6.1%}  unreadable {result.refused_unreadable:6.1%}")


if __name__ == "__main__":
    main()
