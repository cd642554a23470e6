"""Helpers that turn real MNIST digits into the kinds of files people send."""
from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw


class MnistDigits(NamedTuple):
    """Real MNIST test digits (the `mnist_digits` fixture): images uint8 [N, 28, 28], white
    ink on black as MNIST stores them, and labels int64 [N]. Read-only: every test shares them."""
    images: np.ndarray
    labels: np.ndarray

    def png(self, index: int) -> bytes:
        """Digit `index` as a PNG file, what a client would send."""
        return encode(Image.fromarray(self.images[index]))

    def label(self, index: int) -> int:
        return int(self.labels[index])


class HostileCase(NamedTuple):
    """One input a public endpoint meets, and the answer it must get."""
    name: str
    body: bytes
    headers: dict[str, str]
    status: int
    code: str | None     # the error code, or None: the right digit


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


def png_bomb(side: int = 50_000) -> bytes:
    """A valid PNG header declaring side x side pixels, with almost no data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
            + chunk(b"IEND", b""))


def animated_gif(first: np.ndarray, second: np.ndarray) -> bytes:
    frames = [Image.fromarray(first).convert("P"), Image.fromarray(second).convert("P")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def upright_photo(digit: np.ndarray) -> Image.Image:
    return as_paper_photo(digit, size=(200, 200), scale=5, offset=(30, 30))


def exif_rotated_jpeg(digit: np.ndarray) -> bytes:
    """upright_photo stored sideways, with EXIF orientation 6 saying 'rotate 90 degrees clockwise to view'."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(upright_photo(digit).rotate(90, expand=True), "JPEG", exif=exif, quality=95)


def all_formats(image: np.ndarray) -> dict[str, bytes]:
    """One digit in every format and pixel mode the server accepts."""
    paper = as_paper_photo(image, size=(120, 100), scale=3, offset=(20, 10))
    ink = Image.fromarray(image)
    black = Image.new("L", ink.size, 0)
    dark_ink_on_transparent = Image.merge("RGBA", [black, black, black, ink])   # a canvas drawing
    light_ink_on_transparent = Image.merge("RGBA", [Image.new("L", ink.size, 255)] * 3 + [ink])
    palette_transparent = paper.convert("P")
    sixteen_bit = Image.fromarray((np.asarray(paper.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    return {
        "png_gray_28x28": encode(ink),
        "png_rgb_paper": encode(paper),
        "png_rgba_dark_ink_on_transparent": encode(dark_ink_on_transparent),
        "png_rgba_light_ink_on_transparent": encode(light_ink_on_transparent),
        "png_la": encode(dark_ink_on_transparent.convert("LA")),
        "png_palette": encode(paper.convert("P")),
        "png_palette_with_transparency": encode(palette_transparent, transparency=palette_transparent.getpixel((0, 0))),
        "png_16bit": encode(sixteen_bit),
        "png_1bit": encode(paper.convert("L").point(lambda v: 255 if v > 128 else 0).convert("1")),
        "jpeg_rgb": encode(paper, "JPEG", quality=90),
        "jpeg_gray": encode(paper.convert("L"), "JPEG", quality=90),
        "jpeg_cmyk": encode(paper.convert("CMYK"), "JPEG", quality=90),
        "bmp": encode(paper, "BMP"),
        "gif": encode(paper.convert("P"), "GIF"),
        "tiff": encode(paper, "TIFF"),
        "webp": encode(paper, "WEBP", quality=95),
    }


def hostile_corpus(digit: np.ndarray, other: np.ndarray) -> list[HostileCase]:
    """The inputs a public endpoint meets, made around one real MNIST digit `digit`.

    Not here: binary bodies labelled application/x-www-form-urlencoded. TorchServe's Java
    frontend decodes those itself and, for many images, answers 500 ErrorDataDecoderException
    before the handler runs (see docs/security.md); the handler's hint for the rest is unit-tested."""
    png, jpeg = encode(as_paper_photo(digit)), encode(as_paper_photo(digit), "JPEG")
    octet = {"Content-Type": "application/octet-stream"}
    sixteen = Image.fromarray((np.asarray(as_paper_photo(digit).convert("L"), dtype=np.uint16) * 257))
    cases = [
        ("empty body", b"", octet, 400, "empty"),
        ("text", b"hello, I am not an image", {"Content-Type": "text/plain"}, 415, "not_an_image"),
        ("json without image", b'{"foo": 1}', {"Content-Type": "application/json"}, 400, "no_image_field"),
        ("truncated png", png[: len(png) // 2], octet, 400, "corrupt_image"),
        ("truncated jpeg", jpeg[: len(jpeg) // 2], octet, 400, "corrupt_image"),
        ("1x1 image", encode(Image.new("L", (1, 1), 128)), octet, 422, "no_digit"),
        ("all white", encode(Image.new("RGB", (200, 200), "white")), octet, 422, "no_digit"),
        ("all black", encode(Image.new("L", (28, 28), 0)), octet, 422, "no_digit"),
        ("decompression bomb", png_bomb(), octet, 413, "too_large"),
        ("invalid base64", b'{"image": "%%% not base64"}', {"Content-Type": "application/json"}, 400,
         "invalid_base64"),
        ("broken json", b'{"image": ', {"Content-Type": "application/json"}, 400, "invalid_json"),
        ("unknown content type, image", png, {"Content-Type": "application/x-unknown"}, 200, None),
        ("unknown content type, garbage", b"\x00\x01\x02" * 50, {"Content-Type": "application/x-unknown"}, 415,
         "not_an_image"),
        ("animated gif", animated_gif(digit, other), octet, 200, None),
        ("cmyk jpeg", encode(as_paper_photo(digit).convert("CMYK"), "JPEG", quality=92), octet, 200, None),
        ("16-bit png", encode(sixteen), octet, 200, None),
        ("exif rotated jpeg", exif_rotated_jpeg(digit), octet, 200, None),
    ]
    return [HostileCase(*case) for case in cases]


# Shapes that are no digit, as a person draws them: strokes of (x, y) points, 0-1 across a
# square. The test recipe's model refuses both with a margin (max softmax 0.39-0.58 for the K,
# 0.47-0.55 for the star, in two training runs, under thresholds of 0.80-0.81; 2026-11-29). Not
# here: an X (0.65-0.78, too close to the threshold between runs) and an A, H, M, N, T, V, Z, #,
# + or box, which it takes for digits at 0.85-1.0.
NOT_DIGITS = {
    "K": [[(0.3, 0.15), (0.3, 0.85)], [(0.72, 0.15), (0.3, 0.55), (0.72, 0.85)]],
    "star": [[(0.5, 0.15), (0.5, 0.85)], [(0.2, 0.3), (0.8, 0.7)], [(0.8, 0.3), (0.2, 0.7)]],
}


def drawn_strokes(strokes, side: int = 280, pen: int = 24) -> bytes:
    """Strokes drawn dark on white, round-ended, as the draw-a-digit page draws them: a PNG."""
    image = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        points = [(x * side, y * side) for x, y in stroke]
        draw.line(points, fill=17, width=pen, joint="curve")
        for x, y in (points[0], points[-1]):
            draw.ellipse([x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2], fill=17)
    return encode(image)
