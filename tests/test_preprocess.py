import numpy as np
import pytest
from PIL import Image

from imaging import all_formats, animated_gif, as_paper_photo, encode, exif_rotated_jpeg, png_bomb, upright_photo
from serving.handler.preprocess import (FORMATS, MAX_PIXELS, MAX_WORKING_SIDE, UNIT_FRAME, ImageError, PixelBudget,
                                        preprocess_bytes, preprocess_framed, to_mnist)
from training.data import MNIST_MEAN, MNIST_STD

MEAN, STD = MNIST_MEAN, MNIST_STD


def model_input(pixels: np.ndarray) -> np.ndarray:
    return ((pixels.astype(np.float32) / 255.0 - MEAN) / STD)[None]


def test_plain_mnist_png_passes_through_unchanged(mnist_digits):
    images, _ = mnist_digits
    for image in images[:10]:
        tensor = preprocess_bytes(encode(Image.fromarray(image)), MEAN, STD)
        assert tensor.shape == (1, 28, 28) and tensor.dtype == np.float32
        np.testing.assert_allclose(tensor, model_input(image), atol=1e-6)


def test_paper_photo_becomes_mnist_like(mnist_digits):
    """Dark ink on white, 7x larger, off-centre: after preprocessing it looks like the original
    digit again (inverted back, fitted to the 20x20 box, centred by mass)."""
    correlations = []
    for image in mnist_digits.images[:40]:
        pixels = to_mnist(np.asarray(as_paper_photo(image).convert("L"), dtype=np.float32) / 255)
        assert pixels.shape == (28, 28)
        assert pixels[0].max() < 0.05 and pixels[:, 0].max() < 0.05        # background black again
        rows, cols = np.nonzero(pixels > 0.2)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 <= 21                    # fits the 20x20 box
        total = pixels.sum()
        centre = ((pixels.sum(1) * np.arange(28)).sum() / total, (pixels.sum(0) * np.arange(28)).sum() / total)
        assert abs(centre[0] - 14) <= 0.5 and abs(centre[1] - 14) <= 0.5   # MNIST's own centring
        correlations.append(np.corrcoef(pixels.ravel(), image.ravel().astype(np.float32))[0, 1])
    # Resampling twice blurs strokes a little; a wrong inversion, crop or centring would drop these far lower.
    assert np.median(correlations) > 0.95 and min(correlations) > 0.6


def test_every_format_and_mode_gives_a_digit_like_the_original(mnist_digits):
    images, _ = mnist_digits
    reference = preprocess_bytes(encode(as_paper_photo(images[0], size=(120, 100), scale=3, offset=(20, 10))),
                                 MEAN, STD)
    for name, data in all_formats(images[0]).items():
        tensor = preprocess_bytes(data, MEAN, STD)
        assert tensor.shape == (1, 28, 28), name
        assert np.isfinite(tensor).all(), name
        correlation = np.corrcoef(tensor.ravel(), reference.ravel())[0, 1]
        assert correlation > 0.7, (name, correlation)  # 1-bit and JPEG differ a little; labels: test_handler


def test_animated_gif_uses_the_first_frame(mnist_digits):
    images, _ = mnist_digits
    tensor = preprocess_bytes(animated_gif(images[0], images[1]), MEAN, STD)
    first = preprocess_bytes(encode(Image.fromarray(images[0]).convert("P").convert("L")), MEAN, STD)
    np.testing.assert_allclose(tensor, first, atol=1e-6)


def test_exif_rotation_is_honoured(mnist_digits):
    images, _ = mnist_digits
    rotated = preprocess_bytes(exif_rotated_jpeg(images[0]), MEAN, STD)   # stored sideways, EXIF says turn
    expected = preprocess_bytes(encode(upright_photo(images[0]), "JPEG", quality=95), MEAN, STD)
    assert np.corrcoef(rotated.ravel(), expected.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("data,code", [
    (b"", "empty"),
    (b"hello, this is text", "not_an_image"),
    (b'{"image": 1}', "not_an_image"),
])
def test_bad_bytes_raise_image_error(data, code):
    with pytest.raises(ImageError) as raised:
        preprocess_bytes(data, MEAN, STD)
    assert raised.value.code == code


def test_truncated_files_raise_image_error(mnist_digits):
    images, _ = mnist_digits
    for fmt in ("PNG", "JPEG"):
        data = encode(as_paper_photo(images[0]), fmt)
        with pytest.raises(ImageError) as raised:
            preprocess_bytes(data[: len(data) // 2], MEAN, STD)
        assert raised.value.code in ("corrupt_image", "not_an_image")


@pytest.mark.parametrize("color", [0, 255])
def test_blank_images_are_no_digit(color):
    for size in ((28, 28), (1, 1), (300, 200)):
        with pytest.raises(ImageError) as raised:
            preprocess_bytes(encode(Image.new("L", size, color)), MEAN, STD)
        assert raised.value.code == "no_digit"


def test_decompression_bomb_is_refused_before_decoding():
    # A real PNG header declaring side x side pixels, with almost no data: refused from the header.
    with pytest.raises(ImageError) as raised:
        preprocess_bytes(png_bomb(side=int(MAX_PIXELS ** 0.5) + 1000), MEAN, STD)
    assert raised.value.code == "too_large"


@pytest.mark.parametrize("side", [20_000, 50_000])
def test_a_huge_declared_size_is_called_too_large_not_unreadable(side):
    # Past twice Pillow's own limit, Image.open itself refuses: the answer must still speak of size.
    with pytest.raises(ImageError) as raised:
        preprocess_bytes(png_bomb(side=side), MEAN, STD)
    assert raised.value.code == "too_large"
    assert "not an image" not in str(raised.value) and f"{MAX_PIXELS:,}" in str(raised.value)


@pytest.mark.parametrize("fmt,data", [
    ("EPS", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n"),   # Pillow would run Ghostscript
    ("PPM", encode(Image.new("L", (28, 28), 0).point(lambda v: 255), "PPM")),
    ("ICO", encode(Image.new("L", (32, 32), 0), "ICO")),
    ("TGA", encode(Image.new("L", (28, 28), 0), "TGA")),
])
def test_only_the_promised_formats_are_read(fmt, data):
    with pytest.raises(ImageError) as raised:
        preprocess_bytes(data, MEAN, STD)
    assert raised.value.code == "not_an_image" and "PNG, JPEG, BMP, GIF, WebP, TIFF" in str(raised.value)
    assert FORMATS == ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")


def float_tiff(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels.astype(np.float32), mode="F"), "TIFF")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_unsupported(mnist_digits, bad):
    pixels = mnist_digits.images[0].astype(np.float32) / 255
    assert preprocess_bytes(float_tiff(pixels), MEAN, STD).shape == (1, 28, 28)   # finite: read
    pixels[3, 4] = bad
    with pytest.raises(ImageError) as raised:
        preprocess_bytes(float_tiff(pixels), MEAN, STD)
    assert raised.value.code == "unsupported_image"


def test_the_pixel_budget_refuses_before_decoding(monkeypatch):
    import serving.handler.preprocess as preprocess

    from PIL import ImageFile

    data = encode(Image.new("L", (40, 30), 255))   # 1,200 pixels
    budget = PixelBudget(left=1000)
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: loads.append(image))
    with pytest.raises(ImageError) as raised:
        preprocess.decode_image(data, budget)
    assert raised.value.code == "too_large" and loads == [] and budget.left == 1000


@pytest.mark.parametrize("mode", ["L", "P", "1", "RGBA", "I;16", "CMYK"])
def test_big_images_are_reduced_before_any_float_copy(mnist_digits, monkeypatch, mode):
    """A 40-MP float copy is 160 MB (RGBA 640 MB): to_grayscale must only see working-size images,
    and they must still give the digit of the small image."""
    import serving.handler.preprocess as preprocess

    photo = as_paper_photo(mnist_digits.images[0], size=(4000, 3000), scale=60, offset=(1200, 600))
    small = photo.resize((400, 300), Image.BOX)
    if mode == "I;16":
        photo, small = (Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257) for image in (photo, small))
    else:
        photo, small = photo.convert(mode), small.convert(mode)
    fmt = {"CMYK": "JPEG", "I;16": "TIFF"}.get(mode, "PNG")
    seen = []
    real = preprocess.to_grayscale
    monkeypatch.setattr(preprocess, "to_grayscale", lambda image: seen.append(image.size) or real(image))
    big_tensor = preprocess_bytes(encode(photo, fmt), MEAN, STD)
    assert max(seen[0]) <= MAX_WORKING_SIDE
    small_tensor = preprocess_bytes(encode(small, fmt), MEAN, STD)
    assert np.corrcoef(big_tensor.ravel(), small_tensor.ravel())[0, 1] > 0.9


def ink_share_under_frame(photo: Image.Image, shift: float = 0.0) -> float:
    """The share of the model input's ink pixels whose centre, placed on the photo through the
    frame (moved right by `shift` input pixels), falls on the photo's ink (dark on white paper)."""
    framed = preprocess_framed(encode(photo), MEAN, STD)
    ink = framed.pixels[0] * STD + MEAN > 0.5
    paper = np.asarray(photo.convert("L"))
    rows, cols = np.nonzero(ink)
    frame = framed.frame
    xs = (frame.left + (cols + 0.5 + shift) * frame.pixel_width).astype(int)
    ys = (frame.top + (rows + 0.5) * frame.pixel_height).astype(int)
    inside = (xs >= 0) & (xs < paper.shape[1]) & (ys >= 0) & (ys < paper.shape[0])
    return float(np.mean(inside & (paper[ys.clip(0, paper.shape[0] - 1), xs.clip(0, paper.shape[1] - 1)] < 128)))


@pytest.mark.parametrize("size,scale,offset", [((300, 220), 7, (40, 30)),            # as sent
                                               ((3000, 2000), 60, (900, 300))])     # shrunk first
def test_the_frame_places_the_model_input_on_the_image_sent(mnist_digits, size, scale, offset):
    """What an explanation's map is drawn over: the input's ink lands on the photo's ink."""
    shares = [ink_share_under_frame(as_paper_photo(image, size=size, scale=scale, offset=offset))
              for image in mnist_digits.images[:10]]
    assert min(shares) >= 0.9, shares
    # A frame off by a few input pixels fails the same check: it discriminates.
    shifted = [ink_share_under_frame(as_paper_photo(image, size=size, scale=scale, offset=offset), shift=4)
               for image in mnist_digits.images[:10]]
    assert np.mean(shifted) < 0.6, shifted
    # An MNIST-like 28x28 image is the model input itself.
    assert preprocess_framed(mnist_digits.png(0), MEAN, STD).frame == UNIT_FRAME
