"""Fashion-MNIST: real non-digits nobody on this project made, for evaluation only (never trained on).

Debian's `dataset-fashion-mnist` package (`make fashion`) puts Zalando's four gzipped IDX files in
/usr/share/datasets/fashion-mnist. Clothes are drawn light on a dark ground, like MNIST's digits;
a sender may as well photograph them dark on light, so both polarities are sent through the
server's own preprocessing (training/synthetic.served): the image as it is, and inverted. An
image preprocessing refuses as blank counts as refused (the server answers 422 before the model).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_DIR_ENV = "FASHION_MNIST_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
POLARITIES = ("as_is", "inverted")


class FashionMissing(Exception):
    """The Fashion-MNIST files are not where they were looked for."""


@dataclass(frozen=True)
class FashionSet:
    """Fashion-MNIST test images as the model receives them, per polarity; `blank`: how many of
    each polarity preprocessing refused before the model."""
    images: dict[str, np.ndarray]
    blank: dict[str, int]
    sent: int


def fashion_dir() -> Path:
    return Path(os.environ.get(FASHION_DIR_ENV) or DEBIAN_DIR)


def load_test_images(directory: Path | None = None) -> np.ndarray:
    """The 10,000 Fashion-MNIST test images, uint8 (N, 28, 28)."""
    from training.data import IMAGES_MAGIC, parse_idx

    path = (directory or fashion_dir()) / TEST_IMAGES
    if not path.is_file():
        raise FashionMissing(f"{path} not found: install Debian's dataset-fashion-mnist (make fashion) "
                             f"or set {FASHION_DIR_ENV}")
    return parse_idx(gzip.decompress(path.read_bytes()), IMAGES_MAGIC, path)


def served_sets(count: int, directory: Path | None = None) -> FashionSet:
    """The first `count` test images in both polarities, through the server's preprocessing."""
    from training.synthetic import served

    images = load_test_images(directory)[:count]
    kept, blank = {}, {}
    for polarity in POLARITIES:
        pixels = [served(Image.fromarray(image if polarity == "as_is" else 255 - image)) for image in images]
        blank[polarity] = sum(p is None for p in pixels)
        kept[polarity] = np.stack([p for p in pixels if p is not None]).astype(np.float32)
    return FashionSet(kept, blank, len(images))


def refused(fashion: FashionSet, is_digit) -> dict[str, float]:
    """Share refused per polarity and in all: `is_digit(images) -> bool array` is the trust record's."""
    shares, total = {}, 0
    for polarity in POLARITIES:
        refused_here = int((~is_digit(fashion.images[polarity])).sum()) + fashion.blank[polarity]
        shares[polarity] = refused_here / fashion.sent
        total += refused_here
    shares["all"] = total / (fashion.sent * len(POLARITIES))
    return shares
