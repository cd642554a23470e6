"""Helpers that turn real MNIST digits into the kinds of files people send."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def as_paper_photo(digit: np.ndarray, size=(300, 220), scale=7, offset=(40, 30), mode="RGB") -> Image.Image:
    """An MNIST digit (uint8 28x28, white on black) as dark ink on white paper, enlarged,
    off-centre on a larger canvas: what a phone photo or a scan looks like."""
    big = Image.fromarray(255 - digit).resize((28 * scale, 28 * scale), Image.BICUBIC)
    canvas = Image.new("L", size, 255)
    canvas.paste(big, offset)
    return canvas.convert(mode)
