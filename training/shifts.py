"""Everyday shifts of MNIST digits, never trained on (issue 26 point 2): MNIST-C's 15
corruptions and the captures people make, in an evaluation split (MNIST test digits, seed 0)
and a validation split (training digits, other seeds and parameters) for choosing
augmentations and thresholds.

MNIST-C's corruptions: training/corruptions.py (its code ported; what differs is said there).

Captures (training/captures.py, the one definition) are encoded files in the form a user sends
(larger images, dark ink on light paper, PNG or JPEG): evaluation passes them through serving's
preprocessing like any upload.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from training import captures
from training.captures import CaptureParams
from training.corruptions import CORRUPTIONS, MNIST_C, SEVERITY

CAPTURES = captures.SHIFTS
SPLITS = {"eval": 0, "val": 1}   # split -> seed offset; val also takes VAL_PARAMS


@dataclass(frozen=True)
class ShiftParams:
    """The parameters a split uses. eval: MNIST-C's dataset severities and captures.EVAL."""
    severity: dict = field(default_factory=lambda: dict(SEVERITY))
    captures: CaptureParams = captures.EVAL


# Validation: a neighbouring MNIST-C severity (one up or down, in range) and captures.VAL.
VAL_PARAMS = ShiftParams(
    severity={"shot_noise": 4, "impulse_noise": 3, "glass_blur": 2, "motion_blur": 2, "shear": 3, "scale": 2,
              "rotate": 3, "brightness": 4, "translate": 4, "fog": 4, "spatter": 3},
    captures=captures.VAL)


@dataclass(frozen=True)
class ShiftedSet:
    """One shift applied to digits. images: float32 [N, 28, 28] in [0, 1] (MNIST-C), or encoded:
    the files a user would send (captures). sources: indices of the digits in their MNIST file."""
    name: str
    split: str
    labels: np.ndarray
    sources: np.ndarray
    images: np.ndarray | None = None
    encoded: list[bytes] | None = None


def encode(pixels: np.ndarray) -> bytes:
    """Float [28, 28] pixels in [0, 1] as the PNG a client sends (MNIST-C's images)."""
    return captures.encode(Image.fromarray(np.clip(pixels * 255, 0, 255).astype(np.uint8)))


def shift_seed(name: str, split: str) -> int:
    """A fixed seed per (shift, split): eval and val never share a random stream."""
    return 1000 * SPLITS[split] + (list(MNIST_C) + list(CAPTURES)).index(name)


def apply_shift(name: str, images: np.ndarray, labels: np.ndarray, sources: np.ndarray, split: str) -> ShiftedSet:
    """One shift on uint8 [N, 28, 28] digits, deterministic for (name, split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: one of {sorted(SPLITS)}")
    if name not in CORRUPTIONS and name not in CAPTURES:
        raise ValueError(f"unknown shift {name!r}: one of {MNIST_C + CAPTURES}")
    params = VAL_PARAMS if split == "val" else ShiftParams()
    rng = np.random.default_rng(shift_seed(name, split))
    if name in CORRUPTIONS:
        severity = params.severity.get(name, 0)
        pixels = images.astype(np.float64) / 255
        shifted = np.stack([CORRUPTIONS[name](x, rng, severity) for x in pixels]).astype(np.float32)
        return ShiftedSet(name, split, labels, sources, images=shifted)
    encoded = captures.captured_with(name, np.asarray(images, dtype=np.uint8), rng, params.captures)
    return ShiftedSet(name, split, labels, sources, encoded=encoded)


def pick_digits(count: int, total: int, split: str, first: int = 0) -> np.ndarray:
    """count indices from [first, total), the same for a split every time."""
    rng = np.random.default_rng(10_000 + SPLITS[split])
    return np.sort(rng.choice(np.arange(first, total), size=min(count, total - first), replace=False))


def shift_sets(images: np.ndarray, labels: np.ndarray, split: str, count: int, first: int = 0,
               names: tuple[str, ...] = MNIST_C + CAPTURES) -> dict[str, ShiftedSet]:
    """Every shift on the same `count` digits of images[first:] (eval: MNIST test; val: training
    digits, the held-out tail by default of the caller)."""
    sources = pick_digits(count, len(images), split, first)
    chosen, chosen_labels = np.asarray(images)[sources], np.asarray(labels)[sources]
    return {name: apply_shift(name, chosen, chosen_labels, sources, split) for name in names}
