"""The trust contract (serving.artifact.Trust): is_digit and calibrated probabilities in every
answer, chosen on held-out validation digits and carried by every artifact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.artifact import TRUST_METADATA, ArtifactError, Trust, check_metadata, predictions

LABELS = [str(digit) for digit in range(10)]


def confident_and_unsure_logits() -> np.ndarray:
    confident = np.full(10, -5.0)
    confident[3] = 10.0                 # max softmax ~1.0
    unsure = np.zeros(10)              # max softmax 0.1
    return np.stack([confident, unsure])


def test_is_digit_follows_the_threshold_on_the_chosen_score():
    logits = confident_and_unsure_logits()
    trust = Trust("max_softmax", 0.5, 1.0, 0.97, "val")
    assert trust.is_digit(logits).tolist() == [True, False]
    assert Trust("max_softmax", 0.05, 1.0, 0.97, "val").is_digit(logits).tolist() == [True, True]
    assert Trust("max_softmax", 1.01, 1.0, 0.97, "val").is_digit(logits).tolist() == [False, False]
    energy = Trust("energy", 5.0, 1.0, 0.97, "val")
    # energy = logsumexp: 10 + log(1 + 9 e^-15) for the confident row, log(10) for the flat one
    np.testing.assert_allclose(energy.scores(logits), [10 + np.log1p(9 * np.exp(-15.0)), np.log(10)], rtol=1e-12)
    assert energy.is_digit(logits).tolist() == [True, False]


def test_every_answer_says_is_digit_and_uses_the_temperature():
    logits = confident_and_unsure_logits()
    plain = predictions(logits, LABELS, "v", Trust("max_softmax", 0.5, 1.0, 0.97, "val"))
    assert [answer["is_digit"] for answer in plain] == [True, False]
    assert plain[0]["digit"] == 3 and plain[1]["confidence"] == pytest.approx(0.1)  # best guess stays
    hot = predictions(logits, LABELS, "v", Trust("max_softmax", 0.5, 4.0, 0.97, "val"))[0]
    expected = np.exp(logits[0] / 4.0) / np.exp(logits[0] / 4.0).sum()
    assert hot["confidence"] == pytest.approx(expected[3]) and hot["confidence"] < plain[0]["confidence"]
    assert hot["probabilities"] == pytest.approx(expected.tolist())
    assert hot["top_k"][0] == {"digit": 3, "probability": pytest.approx(expected[3])}


def test_a_record_round_trips_and_a_bad_one_is_refused_with_a_reason():
    trust = Trust("energy", 7.5, 1.3, 0.97, "val: 5000 held-out training digits")
    assert Trust.from_metadata({TRUST_METADATA: trust.as_dict()}) == trust
    bad = [None, "max_softmax", {**trust.as_dict(), "score": "entropy"}, {**trust.as_dict(), "temperature": 0},
           {**trust.as_dict(), "threshold": float("nan")}, {**trust.as_dict(), "accept_rate": 1.5},
           {key: value for key, value in trust.as_dict().items() if key != "threshold"}]
    for record in bad:
        with pytest.raises(ArtifactError):
            Trust.from_metadata({TRUST_METADATA: record})


def test_an_artifact_without_a_trust_record_is_refused_with_what_to_do():
    metadata = {"model_version": "v", "labels": LABELS, "mean": 0.1, "std": 0.3, "input_shape": [1, 28, 28]}
    with pytest.raises(ArtifactError, match="retrain.*re-export"):
        check_metadata(metadata, "old.onnx")
    with pytest.raises(ArtifactError, match="threshold"):
        check_metadata({**metadata, TRUST_METADATA: {"score": "max_softmax"}}, "odd.onnx")


def test_the_threshold_accepts_the_asked_share_of_validation_digits():
    from training.trust import fit_trust

    logits = np.random.default_rng(0).normal(size=(1000, 10)) * 3
    trust = fit_trust(logits, chosen_on="val: synthetic")
    accepted = trust.is_digit(logits).mean()
    assert 0.97 <= accepted < 0.972 and trust.accept_rate == accepted
    assert trust.chosen_on == "val: synthetic" and trust.temperature == 1.0


def test_a_quick_run_fits_its_trust_on_held_out_digits_only(quick_checkpoint, data_dir, mnist_digits):
    from training.checkpoint import load_checkpoint
    from training.config import QUICK
    from training.data import load_mnist
    from training.model import build_model
    from training.trust import model_logits

    checkpoint = load_checkpoint(quick_checkpoint)
    trust = Trust.from_metadata(checkpoint)
    assert trust.chosen_on == f"val: {QUICK.val_images} held-out training digits"
    # Refitting on the held-out images (the last of the training set) gives the same record:
    # it was chosen on them, and the test set played no part.
    model = build_model(checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"])
    train_images, _ = load_mnist(data_dir, train=True)
    from training.trust import fit_trust
    refit = fit_trust(model_logits(model, train_images[-QUICK.val_images:]), chosen_on=trust.chosen_on)
    assert refit.threshold == pytest.approx(trust.threshold, rel=1e-6)
    on_test = fit_trust(model_logits(model, torch.from_numpy(mnist_digits.images[:QUICK.val_images].copy())),
                        chosen_on=trust.chosen_on)
    assert on_test.threshold != pytest.approx(trust.threshold, rel=1e-6)


def test_export_refuses_a_checkpoint_without_a_trust_record(quick_checkpoint, tmp_path, data_dir):
    from export.run import ExportConfig, run_export
    from training.checkpoint import CheckpointError, load_checkpoint

    checkpoint = load_checkpoint(quick_checkpoint)
    del checkpoint[TRUST_METADATA]
    torch.save(checkpoint, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="no trust record"):
        run_export(ExportConfig(checkpoint=str(tmp_path / "old.pt"), out_dir=str(tmp_path / "out"),
                                data_dir=data_dir, force=True))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
