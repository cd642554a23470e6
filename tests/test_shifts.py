"""The everyday shifts (training/shifts.py, training/corruptions.py) and their table in the trust
benchmark (benchmarks/shifted.py): deterministic, in range, really shifted, validation apart
from evaluation, and the table computed from the model's real answers."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from training.captures import EVAL, captured_with, differences
from training.shifts import CAPTURES, MNIST_C, VAL_PARAMS, ShiftParams, apply_shift, pick_digits, shift_sets

ALL = MNIST_C + CAPTURES
COUNT = 6


@pytest.fixture(scope="module")
def digits(mnist_digits):
    return mnist_digits.images[:COUNT], mnist_digits.labels[:COUNT]


def decoded(shifted) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32) / 255 for data in shifted.encoded]


@pytest.mark.parametrize("name", ALL)
def test_each_shift_is_deterministic_in_range_and_changes_the_digit(name, digits):
    images, labels = digits
    first = apply_shift(name, images, labels, np.arange(COUNT), "eval")
    again = apply_shift(name, images, labels, np.arange(COUNT), "eval")
    if name in MNIST_C:
        assert first.images.shape == (COUNT, 28, 28) and first.images.dtype == np.float32
        assert first.images.min() >= 0 and first.images.max() <= 1
        np.testing.assert_array_equal(first.images, again.images)
        changed = np.abs(first.images - images / 255.0).mean(axis=(1, 2))
        assert (changed > 0.005).all(), f"{name} left a digit (nearly) as it was: {changed}"
    else:
        assert first.encoded == again.encoded
        pictures = decoded(first)
        assert all(p.shape[0] > 28 or name == "low_resolution" for p in pictures)
        # dark ink on light paper, as a user sends: the border is the lighter side
        assert all(np.median(np.r_[p[0], p[-1]]) > p.min() + 0.1 for p in pictures)
        assert all(p.shape != (28, 28) for p in pictures)


def test_the_validation_split_differs_from_the_evaluation_split(digits):
    images, labels = digits
    for name in ("shot_noise", "rotate", "photo", "low_resolution"):
        evaluation = apply_shift(name, images, labels, np.arange(COUNT), "eval")
        validation = apply_shift(name, images, labels, np.arange(COUNT), "val")
        if name in MNIST_C:
            assert not np.array_equal(evaluation.images, validation.images)
        else:
            assert evaluation.encoded != validation.encoded
    assert VAL_PARAMS != ShiftParams()
    assert differences(ShiftParams().captures, VAL_PARAMS.captures)
    assert all(VAL_PARAMS.severity[name] != ShiftParams().severity[name] for name in VAL_PARAMS.severity)


def test_the_shifts_captures_are_the_capture_module_s(digits):
    """One definition: a capture shift is training/captures.py's capture with the split's seed."""
    from training.shifts import shift_seed

    images, labels = digits
    assert set(CAPTURES) == {"photo", "thin_pen", "thick_marker", "low_resolution", "blurred", "grey_on_grey"}
    for name in CAPTURES:
        shifted = apply_shift(name, images, labels, np.arange(COUNT), "eval")
        assert shifted.encoded == captured_with(name, images, np.random.default_rng(shift_seed(name, "eval")), EVAL)


def test_the_splits_draw_from_different_files_and_shift_sets_record_their_sources(mnist_digits):
    test_images, test_labels = mnist_digits.images, mnist_digits.labels
    sets = shift_sets(test_images, test_labels, "eval", 5, names=("stripe", "thin_pen"))
    for shifted in sets.values():
        np.testing.assert_array_equal(shifted.labels, test_labels[shifted.sources])
        assert shifted.split == "eval"
    # val reads training digits, and only the caller's held-out tail (first=...)
    val_sources = pick_digits(50, 60_000, "val", first=55_000)
    assert val_sources.min() >= 55_000 and len(set(val_sources)) == 50
    with pytest.raises(ValueError, match="unknown split"):
        apply_shift("stripe", test_images[:1], test_labels[:1], np.arange(1), "test")
    with pytest.raises(ValueError, match="unknown shift"):
        apply_shift("snow", test_images[:1], test_labels[:1], np.arange(1), "eval")


def test_the_shift_table_comes_from_real_predictions(quick_checkpoint, data_dir, monkeypatch):
    """measure_shifts' rows equal what the model answers, recomputed here on the same shifted
    digits (captures through serving's preprocessing)."""
    import benchmarks.shifted as shifted_module
    from export.artifacts import load_model
    from serving.handler.artifact import Trust
    from training.data import load_mnist
    from training.trust import model_logits

    names = ("rotate", "thick_marker")
    monkeypatch.setattr(shifted_module, "shift_sets",
                        lambda *args, **kwargs: shift_sets(*args, **{**kwargs, "names": names}))
    result = shifted_module.measure_shifts(str(quick_checkpoint), data_dir, per_shift=40)
    model, saved = load_model(quick_checkpoint)
    trust = Trust.from_metadata(saved)
    images, labels = (tensor.numpy() for tensor in load_mnist(data_dir, train=False))
    for name, shifted in shift_sets(images, labels, "eval", 40, names=names).items():
        pixels, kept = shifted_module.served_pixels(shifted)
        logits = model_logits(model, pixels)
        correct = np.zeros(40, dtype=bool)
        correct[kept] = logits.argmax(1) == shifted.labels[kept]
        assert result["rows"][name]["correct"] == pytest.approx(correct.mean())
        accepted = np.zeros(40, dtype=bool)
        accepted[kept] = trust.is_digit(logits)
        assert result["rows"][name]["accepted"] == pytest.approx(accepted.mean())
    assert result["mnist_c_mean_error"] == pytest.approx(result["rows"]["rotate"]["error"])
    lines = "\n".join(shifted_module.markdown_lines(result))
    assert "| rotate | mnist_c |" in lines and "| thick_marker | capture |" in lines
    assert "shot_noise severity 5 -> 4" in lines   # what the validation split changes, said
