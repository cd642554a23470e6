"""Digits captured in the wild (issue 26, point 1): photos under uneven light with JPEG, paper
grain, small digits scaled up by the sender. Made from real MNIST test digits by
training/captures.py, the module the contact sheet draws from."""
import numpy as np
import pytest
import torch

from training.captures import captured, light_gradient, paper_texture, to_jpeg
from serving.handler.artifact import Trust
from serving.handler.photo import NO_BLOCKS, closing, find_blocks
from serving.handler.preprocess import (ImageError, decode_image, normalize_in_place, preprocess_bytes, to_grayscale,
                                        to_white_on_black)
from training.data import MNIST_MEAN, MNIST_STD

MEAN, STD = MNIST_MEAN, MNIST_STD
DIGITS = slice(0, 60)    # the first test digits: the contact sheet shows the first four


def unit(pixels: np.ndarray) -> np.ndarray:
    return pixels[0] * STD + MEAN


def test_mnist_form_keeps_its_exact_path(mnist_digits):
    """A real MNIST test digit as a 28x28 PNG gives, bit for bit, the tensor the model was tested
    on: uint8 / 255 in float32, normalized by the one shared function."""
    for image in mnist_digits.images[:2000]:
        expected = normalize_in_place(image.astype(np.float32) / np.float32(255.0), MEAN, STD)[None]
        got = preprocess_bytes(captured("clean", image[None])[0], MEAN, STD)
        assert got.dtype == np.float32 and np.array_equal(got, expected)


def test_a_light_gradient_is_divided_out(mnist_digits):
    """Paper under uneven light: the model input's background is black, not a grey wash."""
    for data in captured("photo", mnist_digits.images[DIGITS]):
        seen = unit(preprocess_bytes(data, MEAN, STD))
        ink = seen > 0.3
        assert np.median(seen[~ink]) < 0.02 and np.percentile(seen[~ink], 95) < 0.3
        assert 0.02 < ink.mean() < 0.45    # a digit's share of 28x28, not half the square


@pytest.mark.parametrize("seed", range(5))
def test_jpeg_noise_and_paper_grain_are_no_digit(seed):
    """Blank paper under uneven light, with grain and JPEG blocks: nothing on it is ink."""
    rng = np.random.default_rng(seed)
    data = to_jpeg(light_gradient(rng) * paper_texture(rng), quality=60, blur=0.8)
    with pytest.raises(ImageError) as raised:
        preprocess_bytes(data, MEAN, STD)
    assert raised.value.code == "no_digit"


def test_paper_grain_stays_paper_around_the_ink(mnist_digits):
    for data in captured("photo", mnist_digits.images[DIGITS], seed=3):
        ink = to_white_on_black(to_grayscale(decode_image(data)))
        # MNIST leaves a 4 px margin, 32 px on the sheet: the outer 20 px hold no ink, only grain.
        edge = np.concatenate([ink[:20].ravel(), ink[-20:].ravel(), ink[:, :20].ravel(), ink[:, -20:].ravel()])
        assert np.mean(edge > 0.2) < 0.01


def test_a_digit_the_sender_scaled_up_is_taken_back_to_its_pixels(mnist_digits):
    """Pixel replication is found and undone, so the small digit is resampled smoothly: the model
    input looks like the digit again, without stair steps."""
    correlations = []
    for image, data in zip(mnist_digits.images[DIGITS], captured("low_resolution", mnist_digits.images[DIGITS])):
        ink = to_white_on_black(to_grayscale(decode_image(data)))
        assert find_blocks(ink).factor in range(4, 9)
        seen = unit(preprocess_bytes(data, MEAN, STD))
        correlations.append(np.corrcoef(seen.ravel(), image.ravel().astype(np.float32))[0, 1])
    assert np.median(correlations) > 0.8, np.median(correlations)


def test_smooth_photos_are_not_called_blocky(mnist_digits):
    for data in captured("photo", mnist_digits.images[:20]) + captured("thick_marker", mnist_digits.images[:20]):
        assert find_blocks(to_white_on_black(to_grayscale(decode_image(data)))) == NO_BLOCKS


def test_a_photo_with_a_light_gradient_is_read_right_and_accepted(trained_checkpoint, mnist_digits):
    """The issue's photo: dark ink on paper under uneven light, JPEG. Before the light was divided
    out, the trained model accepted none of these and read most wrong (see docs/preprocessing.md)."""
    from export.artifacts import load_model

    model, saved = load_model(trained_checkpoint)
    trust = Trust.from_metadata(saved)
    batch = np.stack([preprocess_bytes(data, MEAN, STD) for data in captured("photo", mnist_digits.images[DIGITS])])
    with torch.no_grad():
        logits = model(torch.from_numpy(batch)).float().numpy()
    right = logits.argmax(axis=1) == mnist_digits.labels[DIGITS]
    accepted = trust.is_digit(logits)
    assert right.mean() >= 0.9 and (right & accepted).mean() >= 0.85, (right.mean(), (right & accepted).mean())


def test_the_frame_of_an_unblocked_digit_lies_on_the_image_sent(mnist_digits):
    """An explanation's map is drawn through the frame: after unblocking, it must still land on
    the ink of the blocky image as it was sent."""
    from test_preprocess import ink_share_under_frame

    sent = [decode_image(data).convert("L") for data in captured("low_resolution", mnist_digits.images[:10])]
    # The smooth 28x28 is a little wider than the sharp blocks it came from: not every ink pixel of
    # it falls on ink. A frame off by a few input pixels falls far lower.
    assert np.mean([ink_share_under_frame(image) for image in sent]) >= 0.8
    assert np.mean([ink_share_under_frame(image, shift=3) for image in sent]) < 0.5


def reference_closing(values: np.ndarray, size: int) -> np.ndarray:
    """A window per pixel (edges repeated): the definition photo.closing computes faster."""
    half = size // 2
    padded = np.pad(values, half, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size))
    dilated = np.pad(windows.max(axis=(2, 3)), half, mode="edge")
    return np.lib.stride_tricks.sliding_window_view(dilated, (size, size)).min(axis=(2, 3))


def test_the_closing_is_the_window_definition_exactly():
    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = rng.integers(1, 60, size=2)
        size = int(rng.integers(1, 30)) | 1
        values = rng.random((height, width)).astype(np.float32)
        if rng.random() < 0.5:
            values = np.round(values * 3) / 3          # ties: plateaus must come out the same
        assert np.array_equal(closing(values, size), reference_closing(values, size)), (height, width, size)


def mnist_c(name: str, images: np.ndarray, severity: int) -> list[bytes]:
    """MNIST-C's corruption (training/corruptions.py) on real test digits, sent as 28x28 PNGs."""
    from training.corruptions import CORRUPTIONS
    from training.shifts import encode

    rng = np.random.default_rng(0)
    return [encode(CORRUPTIONS[name](image / 255.0, rng, severity)) for image in images]


def test_a_28x28_sent_off_centre_is_moved_back_whole(mnist_digits):
    """MNIST-C's translate: the digit is moved back, whole pixels, nothing resampled; its centre
    of mass ends as close to MNIST's as the digit's own was."""
    from serving.handler.preprocess import centre_of_mass

    for image in mnist_digits.images[:200]:
        moved = np.zeros_like(image)
        moved[3:, 4:] = image[:-3, :-4]
        if moved.sum() != image.sum():       # ink pushed over the edge: not a plain move
            continue
        got = unit(preprocess_bytes(captured("clean", moved[None])[0], MEAN, STD))
        original = image.astype(np.float32) / 255
        assert any(np.allclose(got, np.roll(original, (dy, dx), axis=(0, 1)), atol=1e-6)
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        row, col = centre_of_mass(got)
        assert abs(row - 14) <= 1.3 and abs(col - 14) <= 1.3


# (corruption, its MNIST-C dataset severity, read right and accepted: at least after, under before).
# Measured on the test recipe's model: brightness 97% vs 0%, fog 65% vs 0% (a quarter of the fogged
# digits have too little contrast left and are refused before the model, both ways), translate 98%
# vs 43%. Since training shifts a quarter of each batch and rotates in its warp (2026-12-04), the
# model reads more of them even the old way: brightness 88% vs 42%, translate 67% the old way.
# Since the ink's side decides the polarity (ink_is_darker, 2026-12-05): brightness 98% vs 22%,
# fog 98% vs 12% (a fogged black background lies over 0.5 in about half the digits: taken for
# paper, the digit was lost), translate 98% vs 57%.
MOVED_OR_GREYED = [("brightness", 5, 0.85, 0.55), ("fog", 5, 0.85, 0.2), ("translate", 3, 0.85, 0.8)]


@pytest.mark.parametrize("name, severity, after, before", MOVED_OR_GREYED)
def test_a_brightened_fogged_or_moved_28x28_is_read_right_and_accepted(trained_checkpoint, mnist_digits, monkeypatch,
                                                                         name, severity, after, before):
    """MNIST-C's brightness and fog add a grey background to the 28x28, translate moves it; with
    MNIST form meaning "black background" (and off-centre digits moved back), they are read and
    accepted as clean digits are. The rule before (any 28x28 with a border under 0.5 passed as it
    was) is checked here too, so the test shows what the change made."""
    from export.artifacts import load_model
    from serving.handler import preprocess

    model, saved = load_model(trained_checkpoint)
    trust = Trust.from_metadata(saved)
    sent = mnist_c(name, mnist_digits.images[DIGITS], severity)
    labels = mnist_digits.labels[DIGITS]
    right, accepted_right = read_right_and_accepted(model, trust, sent, labels)
    assert accepted_right >= after, (right, accepted_right)
    monkeypatch.setattr(preprocess, "MNIST_FORM_BORDER", 0.5)          # the rules before
    monkeypatch.setattr(preprocess, "recentred", lambda gray: preprocess.Framed(gray.astype(np.float32),
                                                                              preprocess.UNIT_FRAME))
    monkeypatch.setattr(preprocess, "ink_is_darker", border_tone_is_light)
    before_right, before_accepted_right = read_right_and_accepted(model, trust, sent, labels)
    assert before_accepted_right < before, (before_right, before_accepted_right)


def border_tone_is_light(gray: np.ndarray) -> bool:
    """The polarity rule before ink_is_darker: paper is light when the border is over 0.5."""
    from serving.handler.photo import border_level

    return border_level(gray) > 0.5


def read_right_and_accepted(model, trust: Trust, sent: list[bytes], labels: np.ndarray) -> tuple[float, float]:
    """(read right, read right and accepted) as shares of all sent; a refusal before the model
    (no_digit) is neither."""
    inputs = {}
    for index, data in enumerate(sent):
        try:
            inputs[index] = preprocess_bytes(data, MEAN, STD)
        except ImageError:
            pass
    if not inputs:
        return 0.0, 0.0
    with torch.no_grad():
        logits = model(torch.from_numpy(np.stack(list(inputs.values())))).float().numpy()
    right = logits.argmax(axis=1) == labels[list(inputs)]
    return float(right.sum()) / len(sent), float((right & trust.is_digit(logits)).sum()) / len(sent)


def test_a_background_in_two_tones_is_taken_from_the_border():
    """Bands across the image (MNIST-C's stripe) under a linear light: the border's Coons patch
    is the background exactly; grain, noise and one tone are not two tones."""
    from serving.handler.photo import border_background, two_tone_border

    bands = np.zeros((28, 40), dtype=np.float32)
    bands[:, :9] = bands[:, 30:] = 0.9
    lit = bands + np.linspace(0.0, 0.08, 28, dtype=np.float32)[:, None]
    assert two_tone_border(lit)
    assert np.allclose(border_background(lit), lit, atol=1e-5)
    rng = np.random.default_rng(0)
    assert not two_tone_border((rng.random((28, 28)) > 0.5).astype(np.float32))   # noise: many changes
    assert not two_tone_border(np.full((28, 28), 0.9, dtype=np.float32))          # plain paper
    assert not two_tone_border(np.zeros((28, 28), dtype=np.float32))               # MNIST's black


def grey_paper_in_dim_light(images: np.ndarray) -> list[bytes]:
    """Grey ink on grey paper darker than mid-grey (a photo in dim light), JPEG."""
    from dataclasses import replace

    from training.captures import EVAL

    return captured("grey_on_grey", images, params=replace(EVAL, grey_paper=(0.42, 0.48)))


# (what is sent, read right and accepted: at least after, under before). Measured on the test
# recipe's model (2026-12-05): stripe 98% vs 0%, grey paper under mid-grey 98% vs 7% (read right
# before: 15%; the paper was taken for a black background, the ink for holes in it).
TWO_TONES_OR_DIM = [("stripe", lambda images: mnist_c("stripe", images, 1), 0.85, 0.2),
                    ("grey paper in dim light", grey_paper_in_dim_light, 0.85, 0.2)]


@pytest.mark.parametrize("name, send, after, before", TWO_TONES_OR_DIM, ids=[case[0] for case in TWO_TONES_OR_DIM])
def test_a_striped_background_or_dim_grey_paper_is_read_right_and_accepted(trained_checkpoint, mnist_digits,
                                                                          monkeypatch, name, send, after, before):
    """A background in two tones is read against the border's tones, and the ink's side (darker
    or lighter) is the one the image reaches further on, so grey paper under 0.5 is not taken for
    a black background. The rules before (one border level; paper is light when over 0.5) read
    neither."""
    from export.artifacts import load_model
    from serving.handler import preprocess

    model, saved = load_model(trained_checkpoint)
    trust = Trust.from_metadata(saved)
    sent, labels = send(mnist_digits.images[DIGITS]), mnist_digits.labels[DIGITS]
    right, accepted_right = read_right_and_accepted(model, trust, sent, labels)
    assert accepted_right >= after, (right, accepted_right)
    monkeypatch.setattr(preprocess, "two_tone_border", lambda gray: False)            # the rules before
    monkeypatch.setattr(preprocess, "ink_is_darker", border_tone_is_light)
    before_right, before_accepted_right = read_right_and_accepted(model, trust, sent, labels)
    assert before_accepted_right < before, (before_right, before_accepted_right)
