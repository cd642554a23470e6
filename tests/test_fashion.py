"""Fashion-MNIST from Debian's dataset-fashion-mnist (make fashion): real non-digits that nobody
here made and nothing trains on, sent in both polarities through the server's preprocessing."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.fashion import POLARITIES, FashionMissing, refused, served_sets, load_test_images
from serving.handler.artifact import Trust

# The test recipe's model (conftest.TEST_RECIPE) refused 79.4% (as they are) and 91.2% (inverted) of
# 1,000 Fashion-MNIST test images per polarity with its threshold at 99% of validation digits
# (2026-12-04); the bar keeps a margin below it. `make train`'s model is measured by
# `python -m benchmarks.trust` (benchmarks/TRUST.md).
TRAINED_MIN_FASHION_REFUSED = 0.7
SENT = 1000


def test_the_debian_files_are_read_and_sent_in_both_polarities():
    images = load_test_images()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.median(images[:, 0, :]) == 0          # clothes light on a dark ground, like MNIST
    fashion = served_sets(50)
    as_is, inverted = fashion.images["as_is"], fashion.images["inverted"]
    # Both reach the model in MNIST's form (light on dark, 28x28) and differ: inverted ones were cropped and fitted.
    assert as_is.shape[1:] == inverted.shape[1:] == (28, 28)
    assert np.median(inverted[:, 0, :]) < 0.1 and not np.allclose(as_is[:len(inverted)], inverted[:len(as_is)])


def test_missing_files_say_how_to_install_them(tmp_path):
    with pytest.raises(FashionMissing, match="make fashion"):
        load_test_images(tmp_path)


@pytest.fixture(scope="module")
def trained_trust(trained_checkpoint):
    from export.artifacts import load_model
    from training.trust import model_logits

    model, checkpoint = load_model(trained_checkpoint)
    trust = Trust.from_metadata(checkpoint)
    return lambda fashion: {polarity: trust.is_digit(model_logits(model, fashion.images[polarity]))
                            for polarity in POLARITIES}


def test_the_trained_model_refuses_fashion_mnist_in_both_polarities(trained_trust):
    fashion = served_sets(SENT)
    shares = refused(fashion, trained_trust(fashion))
    print(f"Fashion-MNIST refused by the test recipe's model: {shares}")
    assert all(shares[polarity] >= TRAINED_MIN_FASHION_REFUSED for polarity in POLARITIES), shares


def test_the_trust_benchmark_reports_fashion_with_fpr_at_95_tpr(trained_checkpoint, mnist_digits):
    """benchmarks.trust's Fashion rows: refusal per polarity as `refused` counts it, and the FPR at
    95% TPR recomputed here from the scores (the share of Fashion scored at or above the score
    that 95% of MNIST test digits reach)."""
    from benchmarks.fashion import fashion_logits, markdown_lines, measure_fashion
    from export.artifacts import load_model
    from training.trust import model_logits

    model, saved = load_model(trained_checkpoint)
    trust = Trust.from_metadata(saved)
    test_logits = model_logits(model, mnist_digits.images[:2000])
    result = measure_fashion(trust, fashion_logits(model, SENT), test_logits)
    fashion = served_sets(SENT)
    accepted = {polarity: trust.is_digit(model_logits(model, fashion.images[polarity])) for polarity in POLARITIES}
    assert result["refused"] == refused(fashion, accepted)
    scores = np.concatenate([trust.scores(model_logits(model, fashion.images[p])) for p in POLARITIES])
    cut = np.sort(trust.scores(test_logits))[int(0.05 * len(test_logits))]
    assert abs(result["fpr_at_95_tpr"] - (scores >= cut).sum() / (2 * SENT)) <= 2 / SENT
    assert 0.5 < result["auroc"] <= 1
    text = "\n".join(markdown_lines(result))
    assert "FPR at 95% TPR" in text and f"{result['refused']['inverted']:.2%}" in text
    assert "Not measured: gone" in "\n".join(markdown_lines({"missing": "gone"}))
