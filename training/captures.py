"""Real MNIST digits as people capture them (issue 26, points 1 and 2): a phone photo of paper
under uneven light saved as JPEG, thin pen, thick marker, a small digit the sender scaled up, blur,
grey ink on grey paper. Each kind turns a real digit (uint8 28x28, white on black as MNIST stores
it), a random generator and the split's parameters into the bytes a client would send.

The one definition of captures: the everyday shifts (training/shifts.py: the evaluation split with
EVAL, the validation split with VAL), the preprocessing tests (tests/test_wild_preprocess.py) and
the contact sheet (benchmarks/contact_sheet.py) all draw them here.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

SCALE = 8                  # a written digit's 28x28 box becomes 224 px: a phone photo's size
CANVAS = (360, 300)        # the sheet of paper in the picture (width, height)


@dataclass(frozen=True)
class CaptureParams:
    """What a split's captures draw from: ranges are (low, high) of a uniform draw per image."""
    photo_dark: tuple[float, float] = (0.35, 0.5)       # the light at the photo's darkest corner
    photo_quality: tuple[int, int] = (55, 80)           # JPEG quality of the photo
    thin_stroke: int = -9                               # min filter size on the 224 px trace
    thick_stroke: int = 13                              # max filter size on the 224 px trace
    low_res_side: tuple[int, int] = (10, 16)            # the 28x28 box's side on the small scan
    low_res_factor: tuple[int, int] = (4, 9)            # the sender's pixel-replication factor
    blur_radius: tuple[float, float] = (5.0, 8.0)       # Gaussian radius, px of 224
    grey_paper: tuple[float, float] = (0.55, 0.65)
    grey_contrast: tuple[float, float] = (0.17, 0.24)   # paper minus ink


EVAL = CaptureParams()
# Validation (choosing augmentations and thresholds): darker light, harsher JPEG, other pens,
# smaller scans, less blur, less contrast.
VAL = CaptureParams(photo_dark=(0.25, 0.4), photo_quality=(40, 60), thin_stroke=-7, thick_stroke=11,
                    low_res_side=(9, 14), low_res_factor=(3, 7), blur_radius=(3.5, 6.0), grey_paper=(0.45, 0.55),
                    grey_contrast=(0.14, 0.2))


def differences(first: CaptureParams, second: CaptureParams) -> list[str]:
    """'field first -> second' for each parameter the two differ in."""
    return [f"{item.name} {getattr(first, item.name)} -> {getattr(second, item.name)}" for item in fields(first)
            if getattr(first, item.name) != getattr(second, item.name)]


@dataclass(frozen=True)
class Capture:
    """One way a digit reaches us: name, one line for people, and digit, rng, params -> image bytes."""
    name: str
    description: str
    make: Callable[[np.ndarray, np.random.Generator, CaptureParams], bytes]


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def ink_coverage(digit: np.ndarray, scale: int = SCALE, stroke: int = 0) -> np.ndarray:
    """The digit enlarged smoothly to a pen's trace, 0 (paper) .. 1 (ink), float [28s, 28s];
    stroke > 0 thickens it by a max filter of that size, < 0 thins it by a min filter."""
    big = Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.BICUBIC)
    if stroke > 0:
        big = big.filter(ImageFilter.MaxFilter(stroke))
    elif stroke < 0:
        big = big.filter(ImageFilter.MinFilter(-stroke))
    return np.asarray(big, dtype=np.float32) / 255.0


def on_paper(coverage: np.ndarray, rng: np.random.Generator, paper: np.ndarray | float = 0.95,
             ink: float = 0.1, canvas=CANVAS) -> np.ndarray:
    """Ink coverage laid at a random place on paper: gray float [H, W] in [0, 1]."""
    width, height = canvas
    sheet = np.broadcast_to(np.asarray(paper, dtype=np.float32), (height, width)).copy()
    top = int(rng.integers(0, height - coverage.shape[0] + 1))
    left = int(rng.integers(0, width - coverage.shape[1] + 1))
    window = sheet[top:top + coverage.shape[0], left:left + coverage.shape[1]]
    window[:] = window * (1 - coverage) + ink * window * coverage / max(float(np.max(paper)), 1e-3)
    return sheet


def light_gradient(rng: np.random.Generator, canvas=CANVAS, bright=0.97, dark=(0.35, 0.5)) -> np.ndarray:
    """Light falling unevenly: a linear ramp in a random direction from bright to a dark corner,
    times a soft vignette."""
    width, height = canvas
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xs / width - 0.5) + np.sin(angle) * (ys / height - 0.5)) / np.sqrt(0.5) + 0.5
    low = rng.uniform(*dark)
    field = bright - (bright - low) * np.clip(ramp, 0, 1)
    vignette = 1 - 0.15 * (((xs / width - 0.5) ** 2 + (ys / height - 0.5) ** 2) / 0.5)
    return field * vignette


def paper_texture(rng: np.random.Generator, canvas=CANVAS, strength=0.04) -> np.ndarray:
    """Paper fibre and sensor grain: fine noise plus a blotchy low-frequency part, ~1 +- strength."""
    width, height = canvas
    fine = rng.normal(0, strength, (height, width))
    coarse = Image.fromarray(rng.normal(0, 1, (height // 16 + 1, width // 16 + 1)).astype(np.float32), mode="F")
    blotches = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32) * strength
    return (1 + fine + blotches).astype(np.float32)


def to_jpeg(gray: np.ndarray, quality: int, blur: float = 0.0) -> bytes:
    image = Image.fromarray((np.clip(gray, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    return encode(image, "JPEG", quality=quality)


def clean(digit: np.ndarray, rng: np.random.Generator, params: CaptureParams) -> bytes:
    return encode(Image.fromarray(digit))


def photo(digit: np.ndarray, rng: np.random.Generator, params: CaptureParams) -> bytes:
    light = light_gradient(rng, dark=params.photo_dark)
    sheet = on_paper(ink_coverage(digit), rng, paper=light, ink=rng.uniform(0.08, 0.2))
    return to_jpeg(sheet * paper_texture(rng), quality=int(rng.integers(*params.photo_quality)), blur=0.8)


def thin_pen(digit: np.ndarray, rng: np.random.Generator, params: CaptureParams) -> bytes:
    sheet = on_paper(ink_coverage(digit, stroke=params.thin_stroke), rng, paper=0.93, ink=0.15)
    return to_jpeg(sheet * paper_texture(rng, strength=0.02), quality=85)


def thick_marker(digit: np.ndarray, rng: np.random.Generator, params: CaptureParams) -> bytes:
    sheet = on_paper(ink_coverage(digit, stroke=params.thick_stroke), rng, paper=0.95, ink=0.05)
    return to_jpeg(sheet * paper_texture(rng, strength=0.02), quality=85)


def low_resolution(digit: np.ndarray, rng: np.random.Generator, params: CaptureParams) -> bytes:
    """A digit 8-12 px tall on a small scan (EVAL), scaled up by the sender with pixel replication."""
    side = int(rng.integers(*params.low_res_side))     # the 28x28 box at this size: the digit 20/28 of it
    small = 255 - np.asarray(Image.fromarray(digit).resize((side, side), Image.BOX), dtype=np.uint8)
    canvas = Image.new("L", (side + 12, side + 10), 255)
    canvas.paste(Image.fromarray(small), (int(rng.integers(2, 10)), int(rng.integers(2, 8))))
    factor = int(rng.integers(*params.low_res_factor))
    return encode(canvas.resize((canvas.width * factor, canvas.height * factor), Image.NEAREST))


def blurred(digit: np.ndarray, rng: np.random.Generator, params: CaptureParams) -> bytes:
    sheet = on_paper(ink_coverage(digit), rng, paper=0.94, ink=0.1)
    return to_jpeg(sheet, quality=90, blur=float(rng.uniform(*params.blur_radius)))


def grey_on_grey(digit: np.ndarray, rng: np.random.Generator, params: CaptureParams) -> bytes:
    paper = rng.uniform(*params.grey_paper)
    sheet = on_paper(ink_coverage(digit), rng, paper=paper, ink=paper - rng.uniform(*params.grey_contrast))
    return to_jpeg(sheet * paper_texture(rng, strength=0.02), quality=75)


CAPTURES = (
    Capture("clean", "an MNIST test digit as it is (28x28 PNG): the exact path", clean),
    Capture("photo", "dark ink on paper under uneven light, paper grain, JPEG", photo),
    Capture("thin_pen", "a fine pen: strokes a third as wide, JPEG", thin_pen),
    Capture("thick_marker", "a felt marker: strokes twice as wide, JPEG", thick_marker),
    Capture("low_resolution", "8-12 px tall, scaled up 4-8x by the sender (blocky PNG)", low_resolution),
    Capture("blurred", "out of focus (Gaussian blur, radius 5-8 px of 224), JPEG", blurred),
    Capture("grey_on_grey", "grey ink on grey paper (contrast ~0.2), JPEG", grey_on_grey),
)
BY_NAME = {capture.name: capture for capture in CAPTURES}
SHIFTS = tuple(capture.name for capture in CAPTURES if capture.name != "clean")   # the everyday shifts' captures


def captured(name: str, digits: np.ndarray, seed: int = 0, params: CaptureParams = EVAL) -> list[bytes]:
    """Each digit (uint8 [28, 28]) captured the named way; the same seed gives the same bytes."""
    return captured_with(name, digits, np.random.default_rng(seed), params)


def captured_with(name: str, digits: np.ndarray, rng: np.random.Generator, params: CaptureParams) -> list[bytes]:
    if name not in BY_NAME:
        raise ValueError(f"unknown capture {name!r}: one of {sorted(BY_NAME)}")
    return [BY_NAME[name].make(digit, rng, params) for digit in digits]
