"""Everyday shifts of MNIST digits, never trained on (issue 26 point 2): MNIST-C's 15
corruptions and the captures people make, in an evaluation split (MNIST test digits, seed 0)
and a validation split (training digits, other seeds and parameters) for choosing
augmentations and thresholds.

MNIST-C's corruptions: training/corruptions.py (its code ported; what differs is said there).

Captures are encoded files in the form a user sends (larger images, dark ink on light paper,
PNG or JPEG): evaluation passes them through serving's preprocessing like any upload.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from training.corruptions import CORRUPTIONS, MNIST_C, SEVERITY, SIZE

CAPTURES = ("photo_uneven_light_jpeg", "thin_pen", "thick_marker", "low_res_scaled_up", "grey_on_grey")
SPLITS = {"eval": 0, "val": 1}   # split -> seed offset; val also takes VAL_PARAMS


@dataclass(frozen=True)
class ShiftParams:
    """The parameters a split uses. eval: MNIST-C's dataset severities and our capture defaults."""
    severity: dict = field(default_factory=lambda: dict(SEVERITY))
    photo_light: float = 0.55       # darkest share of light across the page (1 = even)
    jpeg_quality: int = 60
    pen_size: int = 5               # Pillow MinFilter/MaxFilter size on the 4x-upscaled digit
    low_res_px: int = 14            # image side before the sender scaled it up (the digit: 20/28 of it, 10 px)
    grey_paper: float = 0.6
    grey_ink: float = 0.35


# Validation: a neighbouring MNIST-C severity (one up or down, in range) and other capture settings.
VAL_PARAMS = ShiftParams(
    severity={"shot_noise": 4, "impulse_noise": 3, "glass_blur": 2, "motion_blur": 2, "shear": 3, "scale": 2,
              "rotate": 3, "brightness": 4, "translate": 4, "fog": 4, "spatter": 3},
    photo_light=0.45, jpeg_quality=45, pen_size=3, low_res_px=12, grey_paper=0.55, grey_ink=0.3)


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


# --- captures people make: digit float [28, 28] (white on black) -> the file a user sends ---------
def paper(x: np.ndarray, upscale: int = 4) -> np.ndarray:
    """The digit drawn larger on a page: float [H, W], 1 where the ink is fully dark."""
    big = Image.fromarray((np.pad(x, 4) * 255).astype(np.uint8)).resize(((SIZE + 8) * upscale,) * 2, Image.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 255


def encode(pixels: np.ndarray, fmt: str = "PNG", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(np.clip(pixels * 255, 0, 255).astype(np.uint8))
    image.save(buffer, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def photo_uneven_light_jpeg(x, rng, params: ShiftParams) -> bytes:
    ink = paper(x)
    height, width = ink.shape
    angle = rng.uniform(0, 2 * np.pi)
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    ramp = np.cos(angle) * cols + np.sin(angle) * rows
    light = params.photo_light + (1 - params.photo_light) * (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
    page = (0.92 - 0.8 * ink) * light + rng.normal(0, 0.02, ink.shape)
    tint = np.array([1.0, 0.97, 0.9])   # warm indoor light
    return encode(np.clip(page[..., None] * tint, 0, 1), "JPEG", params.jpeg_quality)


def _pen(x, size: int, thicker: bool) -> bytes:
    big = Image.fromarray((paper(x) * 255).astype(np.uint8))
    big = big.filter(ImageFilter.MaxFilter(size) if thicker else ImageFilter.MinFilter(size))
    return encode(1 - np.asarray(big, dtype=np.float32) / 255)


def thin_pen(x, rng, params: ShiftParams) -> bytes:
    return _pen(x, params.pen_size, thicker=False)


def thick_marker(x, rng, params: ShiftParams) -> bytes:
    return _pen(x, params.pen_size + 2, thicker=True)


def low_res_scaled_up(x, rng, params: ShiftParams) -> bytes:
    small = Image.fromarray((1 - x) * 255).convert("L").resize((params.low_res_px,) * 2, Image.BOX)
    method = Image.NEAREST if rng.random() < 0.5 else Image.BILINEAR   # how the sender scaled it up
    return encode(np.asarray(small.resize((112, 112), method), dtype=np.float32) / 255)


def grey_on_grey(x, rng, params: ShiftParams) -> bytes:
    ink = paper(x)
    page = params.grey_paper - (params.grey_paper - params.grey_ink) * ink + rng.normal(0, 0.01, ink.shape)
    return encode(page)


CAPTURE_MAKERS: dict[str, Callable] = {name: globals()[name] for name in CAPTURES}


def shift_seed(name: str, split: str) -> int:
    """A fixed seed per (shift, split): eval and val never share a random stream."""
    return 1000 * SPLITS[split] + (list(MNIST_C) + list(CAPTURES)).index(name)


def apply_shift(name: str, images: np.ndarray, labels: np.ndarray, sources: np.ndarray, split: str) -> ShiftedSet:
    """One shift on uint8 [N, 28, 28] digits, deterministic for (name, split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: one of {sorted(SPLITS)}")
    if name not in CORRUPTIONS and name not in CAPTURE_MAKERS:
        raise ValueError(f"unknown shift {name!r}: one of {MNIST_C + CAPTURES}")
    params = VAL_PARAMS if split == "val" else ShiftParams()
    rng = np.random.default_rng(shift_seed(name, split))
    pixels = images.astype(np.float64) / 255
    if name in CORRUPTIONS:
        severity = params.severity.get(name, 0)
        shifted = np.stack([CORRUPTIONS[name](x, rng, severity) for x in pixels]).astype(np.float32)
        return ShiftedSet(name, split, labels, sources, images=shifted)
    return ShiftedSet(name, split, labels, sources, encoded=[CAPTURE_MAKERS[name](x, rng, params) for x in pixels])


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
