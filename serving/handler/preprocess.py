"""Turn the images people really send into MNIST-like model input.

Shared by the TorchServe handler and the mnist-predict CLI (one implementation). The
model archive ships this file beside the handler, so it imports only the standard
library, NumPy and Pillow. Mean and std are parameters: callers read them from the
artifact's metadata, never from a copy typed here.

MNIST digits are white ink on black, scaled to fit a 20x20 box and centred by centre of
mass in 28x28. A photo or drawing is brought to that form the same way:
decode -> grayscale (transparency composited) -> the ink map, uneven light divided out and the
paper's noise under a floor (photo.py) -> crop to the ink -> fit into 20x20 keeping the aspect
ratio (small or pixel-replicated digits resampled smoothly) -> centre of mass to the middle.
An image already in MNIST's form (28x28, dark background) passes untouched.

Every failure is an ImageError with a short machine-readable `code`; no other exception
escapes preprocess_bytes for any input bytes.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if __package__:  # imported from the source tree
    from .photo import (Blocks, banded_ink, border_level, find_blocks, ink_is_darker, ink_map, ink_span, ink_peak,
                        noise_floor, two_tone_border, unblock)
else:            # inside the model archive, beside the handler
    from photo import (Blocks, banded_ink, border_level, find_blocks, ink_is_darker, ink_map, ink_span, ink_peak,
                       noise_floor, two_tone_border, unblock)

MNIST_SIZE = 28
DIGIT_BOX = 20             # MNIST scaled each digit to fit 20x20 ...
MAX_PIXELS = 40_000_000    # ... larger images are refused from the header, before decoding
# All images of one request together: one full-size image's worth. A 4 MiB body holds ~80 blank
# 40-MP PNGs (50 KB each) and decoding one takes ~0.1 s on a 2-core Xeon: a budget of two or more
# let one client's 40-MP pairs at 15 requests/s hold the workers that everyone's predictions share
# (issue 27 point 3). Checked from each header, before decoding.
MAX_PIXELS_PER_REQUEST = MAX_PIXELS
# Bigger images are box-reduced, in their own 8/16-bit mode, to this longest side before any float
# copy: a 40-MP float32 copy is 160 MB (RGBA 640 MB). A digit photographed at any sensible size
# keeps well over the 20 px it ends at.
MAX_WORKING_SIDE = 1024
# The formats we promise (README, openapi.yaml); Pillow would otherwise try every plugin it has,
# EPS among them, which runs Ghostscript.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
# The border a 28x28 may have and still be MNIST's own form: every MNIST test digit's border
# median is exactly 0; a little headroom for a lossy copy of one.
MNIST_FORM_BORDER = 0.05
# ... and how far its centre of mass may lie from (14, 14): at most 0.71 px in all 70,000 MNIST
# digits (training and test); a digit moved further was sent off-centre, and is centred again.
MNIST_FORM_CENTRE_PX = 1.5
MIN_INK_CONTRAST = 0.15    # ink must differ from the background by this much (0..1 scale)
INK_THRESHOLD = 0.2        # after contrast stretch, pixels above this count as ink for cropping


class ImageError(ValueError):
    """The bytes are not an image we can read a digit from. `code` names the reason."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Frame:
    """Where the 28x28 model input lies on the image as it was sent (EXIF orientation applied),
    in that image's pixels: input pixel (row, col) covers the box from x = left + col * pixel_width,
    y = top + row * pixel_height, one pixel_width by pixel_height. An explanation's map is drawn
    over the sent image with it (the page overlays it on the drawing)."""
    left: float
    top: float
    pixel_width: float
    pixel_height: float

    def scaled(self, factor: float) -> Frame:
        return Frame(self.left * factor, self.top * factor, self.pixel_width * factor, self.pixel_height * factor)


UNIT_FRAME = Frame(0.0, 0.0, 1.0, 1.0)   # an MNIST-like 28x28 image is the model input itself


@dataclass(frozen=True)
class Framed:
    """Model input and where it came from: pixels [1, 28, 28] (or [28, 28] before normalizing)."""
    pixels: np.ndarray
    frame: Frame


@dataclass
class PixelBudget:
    """The pixels one request's images may still decode (MAX_PIXELS_PER_REQUEST): each image
    spends its header's width x height before it is decoded."""
    left: int = MAX_PIXELS_PER_REQUEST

    def spend(self, width: int, height: int) -> None:
        if width * height > self.left:
            raise ImageError("too_large", f"this request's images hold more than {MAX_PIXELS_PER_REQUEST:,} "
                                          f"pixels together: send fewer or smaller images")
        self.left -= width * height


def decode_image(data: bytes, budget: PixelBudget | None = None) -> Image.Image:
    """Bytes -> a decoded PIL image: first frame, EXIF orientation applied. Its pixels are
    taken from budget (the request's) before decoding, when one is given."""
    if not data:
        raise ImageError("empty", "empty body: send the image bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and raises past 2x) for big images; we apply our own limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError("too_large", f"image is {width}x{height} pixels; the limit is "
                                              f"{MAX_PIXELS:,} pixels")
            if width < 1 or height < 1:
                raise ImageError("not_an_image", "image has no pixels")
            if budget is not None:
                budget.spend(width, height)
            image.seek(0)  # first frame of an animation
            image.load()
            return ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except Image.DecompressionBombError:   # Image.open refuses sizes past twice Pillow's own limit
        raise ImageError("too_large", f"image declares more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels; "
                                      f"the limit is {MAX_PIXELS:,} pixels") from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "body is not an image in a format we read (PNG, JPEG, BMP, GIF, WebP, "
                                         "TIFF)") from None
    except MemoryError:
        raise ImageError("too_large", "image too large to decode") from None
    except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, struct.error, ... on bad data
        raise ImageError("corrupt_image", f"image data is truncated or corrupt ({type(error).__name__})") from None


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


# Modes Image.reduce works in; the others are converted first, keeping what to_grayscale reads.
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F")


def shrink_factor(image: Image.Image) -> int:
    """How many pixels of image a side of one shrunk pixel covers (1: not shrunk)."""
    return max(1, math.ceil(max(image.size) / MAX_WORKING_SIDE))


def shrink(image: Image.Image) -> Image.Image:
    """Box-reduce an image whose longer side passes MAX_WORKING_SIDE, before any float copy."""
    factor = shrink_factor(image)
    if factor <= 1:
        return image
    if image.mode.startswith("I;16"):   # reduced as 32-bit, back to 16-bit: to_grayscale's scale stays 65535
        return image.convert("I").reduce(factor).convert("I;16")
    if image.mode not in REDUCIBLE_MODES:   # 1, P, PA, ...: palette indices must not be averaged
        image = image.convert("RGBA" if has_alpha(image) else "L")
    return image.reduce(factor)


def to_grayscale(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> float32 [H, W] luminance in [0, 1].

    Transparency is composited onto a background that contrasts with the ink: dark
    strokes on a transparent canvas land on white, light strokes on black.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():   # a float TIFF can hold NaN/inf: the answer would be NaN
            raise ImageError("unsupported_image", "image has non-finite pixel values (NaN or infinity)")
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            top = max(1.0, float(values.max(initial=1.0)))
        return np.clip(values / top, 0, 1).astype(np.float32)
    if not has_alpha(image):
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    luma = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    alpha = rgba[..., 3]
    if alpha.sum() == 0:
        return np.zeros_like(luma)
    ink_luma = float((luma * alpha).sum() / alpha.sum())
    background = 1.0 if ink_luma < 0.5 else 0.0
    return luma * alpha + background * (1.0 - alpha)


def to_white_on_black(gray: np.ndarray) -> np.ndarray:
    """The ink map (photo.py: light divided out, light or dark paper; on a background in two
    tones, the distance from it), less the paper's noise floor, stretched so that paper is 0 and
    ink 1."""
    if two_tone_border(gray):
        ink = banded_ink(gray)
    else:
        ink = ink_map(gray, light_paper=ink_is_darker(gray))
    floor = noise_floor(ink)
    peak = ink_peak(ink, floor)
    if peak - floor < MIN_INK_CONTRAST:
        raise ImageError("no_digit", "no digit found: the image is blank or has almost no contrast")
    return np.clip((ink - floor) / (peak - floor), 0.0, 1.0)


def fit_digit(ink: np.ndarray) -> Framed:
    """fit_native on the ink's native pixels: a digit a sender enlarged by pixel replication is
    first taken back to its own small pixels (photo.find_blocks), so it is resampled smoothly."""
    blocks = find_blocks(ink)
    fitted = fit_native(unblock(ink, blocks))
    return Framed(fitted.pixels, in_blocks(fitted.frame, blocks))


def in_blocks(frame: Frame, blocks: Blocks) -> Frame:
    """A frame in unblocked pixels -> the same frame in the pixels of the image as sent."""
    f = blocks.factor
    return Frame(blocks.left + frame.left * f, blocks.top + frame.top * f,
                 frame.pixel_width * f, frame.pixel_height * f)


def fit_native(ink: np.ndarray) -> Framed:
    """Crop to the ink, scale the longer side to 20 px keeping the aspect ratio, and place
    it in 28x28 with its centre of mass in the middle, as MNIST was made; with the frame of
    that 28x28 in ink's pixels."""
    inked = np.where(ink > INK_THRESHOLD, ink, 0.0)
    if not inked.any():
        raise ImageError("no_digit", "no digit found: the image is blank or has almost no contrast")
    rows, cols = ink_span(inked.sum(axis=1)), ink_span(inked.sum(axis=0))
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height, width = crop.shape
    scale = DIGIT_BOX / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Mode "F" keeps full precision; LANCZOS antialiases big downscales like MNIST's own, BICUBIC
    # enlarges a small digit with soft edges (no ringing around its few pixels).
    resample = Image.LANCZOS if scale <= 1 else Image.BICUBIC
    digit = np.asarray(Image.fromarray(crop.astype(np.float32), mode="F").resize(new_size, resample))
    digit = np.clip(digit, 0.0, 1.0)
    if digit.sum() <= 0:
        raise ImageError("no_digit", "no digit found after scaling")
    row_centre, col_centre = centre_of_mass(digit)
    # MNIST's centres of mass sit at (14.0, 14.0) in pixel indices (mean over the test set,
    # std 0.3), not at the geometric middle 13.5: match the data the model learned from.
    centre = MNIST_SIZE / 2
    top = int(np.clip(round(centre - row_centre), 0, MNIST_SIZE - digit.shape[0]))
    left = int(np.clip(round(centre - col_centre), 0, MNIST_SIZE - digit.shape[1]))
    canvas = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    canvas[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    # Resizing maps pixel edges onto pixel edges: output pixel j covers crop pixels j / scale onwards.
    scale_x, scale_y = digit.shape[1] / width, digit.shape[0] / height
    frame = Frame(float(cols[0] - left / scale_x), float(rows[0] - top / scale_y), 1 / scale_x, 1 / scale_y)
    return Framed(canvas, frame)


def centre_of_mass(gray: np.ndarray) -> tuple[float, float]:
    """(row, col) of the ink's centre of mass; the middle for an empty image."""
    total = float(gray.sum())
    if total <= 0:
        return MNIST_SIZE / 2, MNIST_SIZE / 2
    return (float((gray.sum(axis=1) * np.arange(gray.shape[0])).sum()) / total,
            float((gray.sum(axis=0) * np.arange(gray.shape[1])).sum()) / total)


def is_mnist_like(gray: np.ndarray) -> bool:
    """In MNIST form: 28x28 on a black background. Such images pass through untouched (moved
    whole when off-centre: recentred), so a real MNIST digit gets exactly the tensor the model
    was tested on. A 28x28 on a grey background (brighter, fogged: MNIST-C's brightness and fog)
    is not: its background is taken out like a photo's (photo.py)."""
    return gray.shape == (MNIST_SIZE, MNIST_SIZE) and border_level(gray) <= MNIST_FORM_BORDER


def recentred(gray: np.ndarray) -> Framed:
    """The 28x28 as it is, or moved whole (whole pixels, nothing resampled) so that its centre
    of mass is MNIST's when it lies further than MNIST_FORM_CENTRE_PX from it (MNIST-C's
    translate). Not cropped and scaled: a blur or a stray line beside the digit would shrink it."""
    row, col = centre_of_mass(gray)
    if math.hypot(row - MNIST_SIZE / 2, col - MNIST_SIZE / 2) <= MNIST_FORM_CENTRE_PX:
        return Framed(gray.astype(np.float32), UNIT_FRAME)
    down, right = round(MNIST_SIZE / 2 - row), round(MNIST_SIZE / 2 - col)
    moved = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    moved[max(0, down):MNIST_SIZE + min(0, down), max(0, right):MNIST_SIZE + min(0, right)] = \
        gray[max(0, -down):MNIST_SIZE + min(0, -down), max(0, -right):MNIST_SIZE + min(0, -right)]
    return Framed(moved, Frame(float(-right), float(-down), 1.0, 1.0))


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Grayscale [H, W] in [0, 1] -> MNIST-like [28, 28] in [0, 1], white ink on black."""
    return to_mnist_framed(gray).pixels


def to_mnist_framed(gray: np.ndarray) -> Framed:
    """to_mnist, with the frame of the 28x28 in gray's pixels."""
    if is_mnist_like(gray):
        if float(gray.max()) - border_level(gray) < MIN_INK_CONTRAST:
            raise ImageError("no_digit", "no digit found: the image is blank or has almost no contrast")
        return recentred(gray)
    return fit_digit(to_white_on_black(gray))


def normalize_in_place(pixels, mean: float, std: float):
    """Pixels in [0, 1] -> model input, (pixels - mean) / std: the one normalization every
    stage uses (training's batches, export's parity images, this module's requests).

    `pixels` is a float NumPy array or torch tensor of any shape; it is overwritten and
    returned, keeping its dtype (a Python float never widens float32): training's hot path
    normalizes each batch without another copy. Callers that keep their pixels pass a copy.
    """
    pixels -= mean
    pixels /= std
    return pixels


def preprocess_bytes(data: bytes, mean: float, std: float, budget: PixelBudget | None = None) -> np.ndarray:
    """Encoded image bytes -> float32 [1, 28, 28], or ImageError. budget: the pixels the
    request may still decode (parsing.py passes one per request)."""
    return preprocess_framed(data, mean, std, budget).pixels


def preprocess_framed(data: bytes, mean: float, std: float, budget: PixelBudget | None = None) -> Framed:
    """preprocess_bytes, with where the model input lies on the decoded image (its Frame)."""
    image = decode_image(data, budget)
    try:
        fitted = to_mnist_framed(to_grayscale(shrink(image)))
        # to_mnist returns a new float32 array: normalizing it in place touches no caller's pixels.
        return Framed(normalize_in_place(fitted.pixels, mean, std)[None], fitted.frame.scaled(shrink_factor(image)))
    except ImageError:
        raise
    except Exception as error:  # e.g. an exotic mode Pillow cannot convert: still the image's fault
        raise ImageError("unsupported_image", f"cannot convert this image ({image.mode}): "
                                              f"{type(error).__name__}") from None
