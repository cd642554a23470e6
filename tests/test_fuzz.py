"""Property tests: whatever bytes arrive, preprocessing returns a valid tensor or raises
ImageError (the one documented error type), never anything else."""
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.handler.preprocess import ImageError, preprocess_bytes
from training.data import MNIST_MEAN, MNIST_STD

pytestmark = pytest.mark.reliability
MEAN, STD = MNIST_MEAN, MNIST_STD
FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"]
MODES = ["L", "RGB", "RGBA", "LA", "P", "1", "CMYK", "I;16", "I", "F"]


TRIED = {"inputs": 0, "passed": 0, "rejected": 0}


@pytest.fixture(scope="module", autouse=True)
def _report(reliability_log):
    yield
    reliability_log.append({"check": f"fuzz preprocessing ({TRIED['rejected']} rejected with ImageError)",
                            "cases": TRIED["inputs"], "passed": TRIED["passed"], "requests": "", "5xx": "",
                            "worker restarts": "", "lost": ""})


def check(data: bytes) -> None:
    """Only ImageError may escape; anything returned is a valid model input."""
    TRIED["inputs"] += 1
    try:
        tensor = preprocess_bytes(data, MEAN, STD)
    except ImageError as error:
        assert error.code and str(error)
        TRIED["rejected"] += 1
        TRIED["passed"] += 1
        return
    assert tensor.shape == (1, 28, 28) and tensor.dtype == np.float32
    assert np.isfinite(tensor).all()
    pixels = tensor * STD + MEAN
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    TRIED["passed"] += 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    check(data)


@st.composite
def encoded_images(draw):
    width, height = draw(st.integers(1, 120)), draw(st.integers(1, 120))
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if draw(st.booleans()):    # mostly flat images with a blob: closer to real digits
        pixels[:] = pixels[0, 0]
        pixels[height // 4: 3 * height // 4 + 1, width // 3: 2 * width // 3 + 1] = 255 - pixels[0, 0]
    image = Image.fromarray(pixels, "RGB").convert(mode if mode not in ("I;16",) else "L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):   # this format cannot store this mode: re-encode as PNG
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    data = buffer.getvalue()
    cut = draw(st.sampled_from([None, None, None, len(data) // 2, 20]))   # sometimes truncated
    return data if cut is None else data[:cut]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoded_images())
def test_random_valid_and_truncated_images(data):
    check(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 2000), st.sampled_from(FORMATS))
def test_valid_header_then_garbage(garbage, cut, fmt):
    buffer = io.BytesIO()
    Image.new("L", (40, 30), 255).save(buffer, format=fmt)
    data = buffer.getvalue()
    check(data[:cut] + garbage + data[cut + len(garbage):])


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.just((28, 28)), st.tuples(st.integers(1, 40), st.integers(1, 40))),
       st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=8),
       st.integers(0, 2 ** 32 - 1))
def test_float_images_with_non_finite_pixels(size, specials, seed):
    """Float TIFFs (mode F) carry any float32, NaN and infinities included: never a NaN answer.
    28x28 comes often: an MNIST-sized image skips the crop that would drop NaNs by accident."""
    width, height = size
    rng = np.random.default_rng(seed)
    pixels = rng.random((height, width), dtype=np.float32)
    flat = pixels.reshape(-1)
    flat[rng.integers(0, flat.size, len(specials))] = specials
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(buffer, format="TIFF")
    check(buffer.getvalue())
