"""Photos and small images: the steps preprocess.py takes before it crops a digit that did not
come in MNIST's own form (issue 26, point 1).

- Uneven light is divided out: the paper's brightness is estimated at every pixel by a
  morphological closing (dark strokes narrower than the kernel vanish, the light that falls on
  the paper stays, a linear light gradient exactly), measured better than one border level and
  than a blurred copy divided out (docs/preprocessing.md).
- JPEG noise and paper texture stay paper: a noise floor measured on the image itself (median +
  a few robust deviations of the ink map, which is mostly paper) is subtracted before stretching.
- A background in two flat tones (MNIST-C's stripe, a shadow's edge across the paper: the border
  shows both tones, in a few runs) is interpolated from the border into the middle (a Coons
  patch), and ink is what differs from it, darker or lighter.
- Dark ink or light: the ink lies on the side (darker or lighter) the image reaches clearly
  further on from its border level; only when neither side does, the border's own tone decides
  (grey paper in dim light lies under mid-grey, a fogged black background over it).
- A digit the sender enlarged by pixel replication (a 10 px digit sent as 50 px of blocks) is
  taken back to its native pixels, so it is resampled smoothly like any small digit.

Imports only NumPy and Pillow: the model archive ships this file beside the handler.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# The paper is estimated on a copy whose longer side is at most this: light varies slowly, and a
# closing there costs microseconds whatever the photo's size.
BACKGROUND_SIDE = 96
# Closing kernel, as a share of that copy's shorter side: wider than any stroke (a digit's
# strokes are ~1/8 of its height, and a digit is at most the image), narrow enough to follow light.
CLOSING_SHARE = 0.25
# A pixel at least this share of the paper's envelope (the closing) is paper, not ink.
PAPER_SHARE = 0.85
# Ink must stand this many robust standard deviations above the paper's own noise.
NOISE_SIGMAS = 4.0
MAD_TO_SIGMA = 1.4826      # a normal distribution's sigma per median absolute deviation
PEAK_PERCENTILE = 99.0     # of the ink above the floor: one hot JPEG pixel must not set the scale
# Pixel replication is recognised when this share of the steps between neighbours falls on
# one phase of the block grid (1 / factor if the image were not blocky).
BLOCK_STEP_SHARE = 0.8
MAX_BLOCK = 12
# A patch of ink apart from the rest (empty rows or columns between) holding under this share of
# all the ink is a speck of grain or dirt, not part of the digit: the crop leaves it out.
SPECK_SHARE = 0.02
# A border in two tones: at least TWO_TONE_SHARE of it at or under TWO_TONE_DARK and as much at
# or over TWO_TONE_LIGHT, TWO_TONE_FLAT of it at one of the two, changing tone at most
# MAX_TONE_CHANGES times around the frame (bands, not grain or noise).
TWO_TONE_DARK, TWO_TONE_LIGHT = 0.25, 0.75
TWO_TONE_SHARE = 0.15
TWO_TONE_FLAT = 0.9
MAX_TONE_CHANGES = 8
EXTREME_PERCENTILE = 0.5  # the image's darkest and lightest, one hot JPEG pixel aside
TONE_MARGIN = 2.0         # how much further the ink's side must reach to overrule the border's tone
MIN_STEPS = 8              # rows and columns where a blocky image steps, together, before it is called blocky


@dataclass(frozen=True)
class Blocks:
    """A pixel-replicated image: every factor x factor block starting at (top, left) is one pixel."""
    factor: int
    top: int
    left: int


NO_BLOCKS = Blocks(1, 0, 0)


def running_extreme(values: np.ndarray, size: int, axis: int, pair) -> np.ndarray:
    """Max or min (pair: np.maximum or np.minimum) over a centred window of odd `size` along
    axis, edges repeated. By doubling: after k steps each place holds the extreme of the 2**k
    places from it, and two overlapping such spans cover any window, so a window costs
    log2(size) array operations whatever its size (a window per place cost size)."""
    half = size // 2
    rows = np.moveaxis(values, axis, 0)
    span = np.concatenate([np.repeat(rows[:1], half, 0), rows, np.repeat(rows[-1:], half, 0)])
    length = 1
    while 2 * length <= size:
        span = pair(span[:-length], span[length:])
        length *= 2
    count = rows.shape[0]
    return np.moveaxis(pair(span[:count], span[size - length:size - length + count]), 0, axis)


def closing(values: np.ndarray, size: int) -> np.ndarray:
    """Grey-level closing with a size x size square (max filter, then min filter): removes dark
    features narrower than size and keeps a linear ramp as it is."""
    dilated = running_extreme(running_extreme(values, size, 0, np.maximum), size, 1, np.maximum)
    return running_extreme(running_extreme(dilated, size, 0, np.minimum), size, 1, np.minimum)


def resized(values: np.ndarray, width: int, height: int, resample=Image.BILINEAR) -> np.ndarray:
    image = Image.fromarray(values.astype(np.float32), mode="F")
    return np.asarray(image.resize((width, height), resample), dtype=np.float32)


def paper_level(gray: np.ndarray) -> np.ndarray:
    """The paper's brightness at every pixel of a dark-ink-on-light-paper image: a closing finds
    the paper's upper envelope, which follows the light; the envelope rides on the grain's
    brightest specks, so it is scaled down by the median ratio of the paper pixels (those within
    PAPER_SHARE of it) to it. Without that, plain paper would be a few percent ink and a thin
    pen's strokes would sink under the noise floor."""
    height, width = gray.shape
    factor = max(1.0, max(height, width) / BACKGROUND_SIDE)
    small_w, small_h = max(1, round(width / factor)), max(1, round(height / factor))
    small = resized(gray, small_w, small_h, Image.BOX) if factor > 1 else gray
    envelope = closing(small, max(3, int(CLOSING_SHARE * min(small.shape)) | 1))
    envelope = resized(envelope, max(1, small_w // 4), max(1, small_h // 4), Image.BOX)  # smooth its steps
    envelope = np.maximum(resized(envelope, width, height), 1e-3)
    ratio = gray / envelope
    paper = ratio[ratio >= PAPER_SHARE]
    return envelope * (float(np.median(paper)) if paper.size else 1.0)


def ink_map(gray: np.ndarray, light_paper: bool) -> np.ndarray:
    """How much ink covers each pixel (0 paper .. 1 full ink), the light the paper got divided
    out. Light paper: ink = 1 - gray / paper. Dark background (white ink): the background's
    level, estimated the same way on the inverted image, subtracted. Not clipped at 0: paper
    brighter than its level is the noise that noise_floor measures."""
    if light_paper:
        return np.clip(1.0 - gray / np.maximum(paper_level(gray), 1e-3), -1.0, 1.0)
    inverted = 1.0 - gray
    return np.clip(paper_level(inverted) - inverted, -1.0, 1.0)


def border_level(gray: np.ndarray) -> float:
    """Median of the outermost pixels: the background, for any digit that leaves a margin."""
    frame = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return float(np.median(frame))


def ink_is_darker(gray: np.ndarray) -> bool:
    """Whether the ink is darker than the background (dark on light paper) rather than lighter.
    When the image reaches TONE_MARGIN times further from its border level on one side than on
    the other, that side is the ink's (grey paper in dim light lies under mid-grey, a fogged
    black background over it); else the border's own tone decides."""
    level = border_level(gray)
    darkest, lightest = np.percentile(gray, [EXTREME_PERCENTILE, 100 - EXTREME_PERCENTILE])
    darker, lighter = level - float(darkest), float(lightest) - level
    if darker > TONE_MARGIN * lighter or lighter > TONE_MARGIN * darker:
        return darker > lighter
    return level > 0.5


def frame_ring(gray: np.ndarray) -> np.ndarray:
    """The outermost pixels once around the image: top row, right column, bottom row and left
    column, each corner once."""
    return np.concatenate([gray[0, :-1], gray[:-1, -1], gray[-1, :0:-1], gray[:0:-1, 0]])


def two_tone_border(gray: np.ndarray) -> bool:
    """Whether the background comes in two flat tones: see TWO_TONE_SHARE."""
    if min(gray.shape) < 3:            # no middle to interpolate into
        return False
    ring = frame_ring(gray)
    dark, light = ring <= TWO_TONE_DARK, ring >= TWO_TONE_LIGHT
    tone_changes = int(np.count_nonzero(np.diff(np.append(ring, ring[0]) >= 0.5)))
    return (dark.mean() >= TWO_TONE_SHARE and light.mean() >= TWO_TONE_SHARE
            and (dark | light).mean() >= TWO_TONE_FLAT and tone_changes <= MAX_TONE_CHANGES)


def median3(values: np.ndarray) -> np.ndarray:
    """Running median of three, ends repeated: one odd pixel on the border is not a band."""
    padded = np.concatenate([values[:1], values, values[-1:]])
    return np.median(np.stack([padded[:-2], padded[1:-1], padded[2:]]), axis=0)


def border_background(gray: np.ndarray) -> np.ndarray:
    """The background inside, interpolated from the four sides (a Coons patch: each side's
    profile carried across, the corners' bilinear blend taken once). A background in bands
    that cross the image, or a linear light, is reproduced exactly."""
    height, width = gray.shape
    top, bottom, left, right = (median3(side) for side in (gray[0], gray[-1], gray[:, 0], gray[:, -1]))
    v = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    u = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    corners = ((1 - u) * (1 - v) * top[0] + u * (1 - v) * top[-1]
               + (1 - u) * v * bottom[0] + u * v * bottom[-1])
    return ((1 - v) * top[None, :] + v * bottom[None, :]
            + (1 - u) * left[:, None] + u * right[:, None] - corners)


def banded_ink(gray: np.ndarray) -> np.ndarray:
    """The ink map on a two-tone background: how far each pixel lies from the background, dark
    ink on the light tone and light ink on the dark one alike."""
    return np.abs(gray - border_background(gray)).astype(np.float32)


def noise_floor(ink: np.ndarray) -> float:
    """What paper, JPEG noise and texture reach on the ink map: most pixels are paper, so the
    median and median absolute deviation of the whole map describe it."""
    middle = float(np.median(ink))
    spread = float(np.median(np.abs(ink - middle))) * MAD_TO_SIGMA
    return middle + NOISE_SIGMAS * spread


def ink_peak(ink: np.ndarray, floor: float) -> float:
    above = ink[ink > floor]
    return float(np.percentile(above, PEAK_PERCENTILE)) if above.size else floor


def step_profile(values: np.ndarray, axis: int) -> np.ndarray:
    """How much the image changes between neighbours along axis, per place: [len - 1]."""
    return np.abs(np.diff(values, axis=axis)).sum(axis=1 - axis)


def step_share(steps: np.ndarray, factor: int) -> tuple[float, int]:
    """The largest share of the steps that falls on one phase of a factor-wide grid, and that
    phase (the first pixel of a block)."""
    usable = len(steps) // factor * factor
    if usable < 2 * factor or steps[:usable].sum() <= 0:
        return 0.0, 0
    per_phase = steps[:usable].reshape(-1, factor).sum(axis=0)
    phase = int(per_phase.argmax())
    return float(per_phase[phase] / per_phase.sum()), (phase + 1) % factor


def find_blocks(ink: np.ndarray) -> Blocks:
    """The pixel replication a sender scaled a small image up with, or NO_BLOCKS."""
    row_steps, col_steps = step_profile(ink, 0), step_profile(ink, 1)
    # A few sharp edges (a ruled bar's two sides) fall on one phase by chance: ask for many.
    places = sum(int(np.count_nonzero(steps > 0.05 * steps.max(initial=0))) for steps in (row_steps, col_steps))
    if places < MIN_STEPS:
        return NO_BLOCKS
    for factor in range(MAX_BLOCK, 1, -1):
        share_rows, top = step_share(row_steps, factor)
        share_cols, left = step_share(col_steps, factor)
        if min(share_rows, share_cols) >= BLOCK_STEP_SHARE:
            return Blocks(factor, top, left)
    return NO_BLOCKS


def unblock(ink: np.ndarray, blocks: Blocks) -> np.ndarray:
    """The image at its native pixels: each block averaged to one pixel."""
    if blocks.factor == 1:
        return ink
    f = blocks.factor
    part = ink[blocks.top:, blocks.left:]
    rows, cols = part.shape[0] // f, part.shape[1] // f
    return part[:rows * f, :cols * f].reshape(rows, f, cols, f).mean(axis=(1, 3))


def ink_span(mass: np.ndarray) -> tuple[int, int]:
    """First and last index of the ink along one axis (mass: ink per row or column), leaving out
    end patches, apart from the rest, that hold under SPECK_SHARE of the ink."""
    inked = np.flatnonzero(mass > 0)
    breaks = np.flatnonzero(np.diff(inked) > 1)
    patches = np.split(inked, breaks + 1)
    total = mass.sum()
    while len(patches) > 1 and mass[patches[0]].sum() < SPECK_SHARE * total:
        patches.pop(0)
    while len(patches) > 1 and mass[patches[-1]].sum() < SPECK_SHARE * total:
        patches.pop()
    return int(patches[0][0]), int(patches[-1][-1])
