"""Write real MNIST test digits as PNG files, for curl and mnist-predict examples.

    python -m training.samples --data-dir ../shared/mnist --out samples
writes samples/digit_0.png ... samples/digit_9.png (the first test image of each digit) and
samples/letter_k.png, a typed K drawn as MNIST draws digits (white on black, 28x28): something
the server should answer with is_digit false.
"""
from __future__ import annotations

from pathlib import Path

import click
from PIL import Image, ImageDraw, ImageFont

from .data import DATA_DIR_ENV, DataError, load_mnist
from .model import NUM_CLASSES


def write_samples(data_dir: str | None, out: str | Path, per_digit: int = 1) -> list[Path]:
    images, labels = load_mnist(data_dir, train=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, counts = [], [0] * NUM_CLASSES
    for image, label in zip(images, labels.tolist()):
        if counts[label] < per_digit:
            suffix = "" if per_digit == 1 else f"_{counts[label]}"
            path = out / f"digit_{label}{suffix}.png"
            Image.fromarray(image.numpy(), mode="L").save(path)
            written.append(path)
            counts[label] += 1
        if min(counts) >= per_digit:
            break
    written.append(write_letter(out / "letter_k.png", "K"))
    return written


def write_letter(path: Path, letter: str) -> Path:
    """A letter in Pillow's built-in font, centred on 28x28 black: needs no system fonts."""
    image = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(image).text((14, 14), letter, fill=255, anchor="mm", font=ImageFont.load_default(size=22))
    image.save(path)
    return path


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False), envvar=DATA_DIR_ENV, default=None)
@click.option("--out", default="samples", show_default=True)
@click.option("--per-digit", type=click.IntRange(min=1), default=1, show_default=True)
def main(data_dir, out, per_digit) -> None:
    """Save the first test image(s) of each digit as PNG."""
    try:
        paths = write_samples(data_dir, out, per_digit)
    except DataError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {len(paths)} PNG files to {out}/")


if __name__ == "__main__":
    main()
