"""Fashion-MNIST: real non-digits nobody on this project made, for evaluation only (never trained on).

Debian's `dataset-fashion-mnist` package (`make fashion`) puts Zalando's four gzipped IDX files in
/usr/share/datasets/fashion-mnist. Clothes are drawn light on a dark ground, like MNIST's digits;
a sender may as well photograph them dark on light, so both polarities are sent through the
server's own preprocessing (training/synthetic.served): the image as it is, and inverted. An
image preprocessing refuses as blank counts as refused (the server answers 422 before the model).
"""
from __future__ import annotations

import gzip
import json
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


def refused(fashion: FashionSet, accepted: dict[str, np.ndarray]) -> dict[str, float]:
    """Share refused per polarity and in all: `accepted[polarity]` is the trust record's is_digit
    of the kept images (blank ones were refused before the model)."""
    shares, total = {}, 0
    for polarity in POLARITIES:
        refused_here = int((~accepted[polarity]).sum()) + fashion.blank[polarity]
        shares[polarity] = refused_here / fashion.sent
        total += refused_here
    shares["all"] = total / (fashion.sent * len(POLARITIES))
    return shares


FASHION_COUNT = 2000          # test images per polarity the trust benchmark sends
TPR = 0.95                    # FPR at this share of MNIST test digits accepted: the OOD literature's
# The anchor (issue 26 point 5): outlier exposure's published MNIST results
# (hendrycks/outlier-exposure) give an FPR at 95% TPR of 0.65% on Fashion-MNIST, as the issue quotes it.
ANCHOR = "outlier exposure's published MNIST model, FPR at 95% TPR on Fashion-MNIST 0.65% (as issue 26 quotes it)"


@dataclass(frozen=True)
class FashionLogits:
    """The served Fashion-MNIST sets and the model's logits for them, per polarity."""
    fashion: FashionSet
    logits: dict[str, np.ndarray]

    def refused_before(self) -> int:
        return sum(self.fashion.blank.values())


def fashion_logits(model, count: int = FASHION_COUNT) -> FashionLogits:
    from training.trust import model_logits

    fashion = served_sets(count)
    return FashionLogits(fashion, {polarity: model_logits(model, images) for polarity, images in fashion.images.items()})


def measure_fashion(trust, scored: FashionLogits, mnist_test_logits: np.ndarray) -> dict:
    """Refused per polarity with the model's own trust record; AUROC and FPR at 95% TPR against
    MNIST test digits on its score. Blank images (refused before the model) count as refused."""
    from training.trust import auroc

    fashion = scored.fashion
    shares = refused(fashion, {polarity: trust.is_digit(values) for polarity, values in scored.logits.items()})
    digit_scores = trust.scores(mnist_test_logits)
    cut = float(np.quantile(digit_scores, 1 - TPR))
    fashion_scores = np.concatenate([trust.scores(values) for values in scored.logits.values()])
    sent = fashion.sent * len(POLARITIES)
    return {"sent_per_polarity": fashion.sent, "blank": fashion.blank, "refused": shares,
            "auroc": auroc(digit_scores, fashion_scores),
            "fpr_at_95_tpr": float((fashion_scores >= cut).sum()) / sent, "anchor": ANCHOR}


def markdown_lines(result: dict) -> list[str]:
    lines = ["## Fashion-MNIST: real non-digits nobody here made (never trained on)", ""]
    if "missing" in result:
        return lines + [f"Not measured: {result['missing']}", ""]
    refused_shares = result["refused"]
    return lines + [
        f"The first {result['sent_per_polarity']} Fashion-MNIST test images, as they are and inverted, through the "
        f"server's preprocessing (benchmarks/fashion.py); blank ones refused before the model: "
        f"{json.dumps(result['blank'])}.", "",
        "| polarity | refused |", "|---|---:|",
        *[f"| {polarity} | {share:.2%} |" for polarity, share in refused_shares.items()], "",
        f"Against MNIST test digits, on the model's score: AUROC {result['auroc']:.4f}, FPR at 95% TPR "
        f"{result['fpr_at_95_tpr']:.2%}. Anchor: {result['anchor']}.", ""]
