"""The trust contract (serving.artifact.Trust): is_digit and calibrated probabilities in every
answer, chosen on held-out validation digits and carried by every artifact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.handler.artifact import TRUST_METADATA, ArtifactError, Trust, check_metadata, predictions

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
    from training.trust import ACCEPT_RATE, fit_trust

    logits = np.random.default_rng(0).normal(size=(1000, 10)) * 3
    trust = fit_trust(logits, None, chosen_on="val: synthetic")
    accepted = trust.is_digit(logits).mean()
    assert ACCEPT_RATE <= accepted < ACCEPT_RATE + 0.002 and trust.accept_rate == accepted
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
    train_images, train_labels = load_mnist(data_dir, train=True)
    from training.trust import fit_trust
    val_images, val_labels = train_images[-QUICK.val_images:], train_labels[-QUICK.val_images:].numpy()
    refit = fit_trust(model_logits(model, val_images), val_labels, chosen_on=trust.chosen_on)
    assert refit.threshold == pytest.approx(trust.threshold, rel=1e-6)
    on_test = fit_trust(model_logits(model, mnist_digits.images[:QUICK.val_images].copy()),
                        mnist_digits.labels[:QUICK.val_images], chosen_on=trust.chosen_on)
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


# --- the generated sets, outlier exposure, augmentation -----------------------------------------

def test_the_generated_sets_are_deterministic_and_their_splits_disjoint():
    from training.synthetic import font_paths, non_digits, real_world_digits

    first, again = non_digits("eval", 6), non_digits("eval", 6)
    np.testing.assert_array_equal(first.images, again.images)
    assert first.images.shape[1:] == (28, 28) and first.images.dtype == np.float32
    assert set(first.categories) == {"letters", "words", "symbols", "doodles", "scribbles", "textures", "noise",
                                     "glyphs", "shapes"}
    other = non_digits("train", 6)
    assert not any(np.array_equal(a, b) for a in first.images for b in other.images)
    assert not set(font_paths("train")) & set(font_paths("eval"))
    # An image does not depend on how many are made: a larger set starts with the smaller one.
    larger = non_digits("eval", 8, ("letters",))
    np.testing.assert_array_equal(larger.images[:6], first.only("letters"))
    digits = real_world_digits("eval", 20)
    assert digits.labels.tolist() == [index % 10 for index in range(20)] * 3
    # What the server's preprocessing makes: white ink on black, a 20x20 box in 28x28.
    assert digits.images.max() == pytest.approx(1.0, abs=0.05) and digits.images[:, :3].max() < 0.05


def test_outlier_exposure_trains_on_glyphs_and_shapes_but_never_on_symbols_or_doodles():
    """Cyrillic glyphs and overlapping outlines widen what "not a digit" looks like in training;
    symbols and doodles stay unseen, so their refusal still measures categories never trained on.
    A glyph that reads as a digit (З 3, О 0, б 6, Ч 4, ...) would teach refusing real digits."""
    from training.synthetic import CYRILLIC, SEED_NAMES, TRAINED_CATEGORIES, image_rng

    assert {"glyphs", "shapes"} <= set(TRAINED_CATEGORIES)
    assert not {"symbols", "doodles"} & set(TRAINED_CATEGORIES)
    assert not set("ЗзОоБбЧчУуЬьЪъТтГгЭэ") & set(CYRILLIC)
    # Seeds follow SEED_NAMES, append only: the sets made before the new categories are unchanged.
    assert SEED_NAMES[:10] == ("letters", "words", "symbols", "doodles", "scribbles", "textures", "noise",
                               "typed", "drawn", "photographed")
    assert image_rng("eval", "typed", 3).random() == np.random.default_rng([2_000, 7, 3]).random()


def test_outlier_exposure_pushes_towards_uniform_and_rides_behind_the_digits(data_dir):
    from training.config import TrainConfig
    from training.data import load_datasets
    from training.dist import setup, teardown
    from training.outliers import uniform_cross_entropy

    assert uniform_cross_entropy(torch.zeros(4, 10)).item() == pytest.approx(np.log(10), abs=1e-6)
    assert uniform_cross_entropy(torch.eye(10) * 5).item() > np.log(10) + 1.0
    context = setup("cpu")
    try:
        data = load_datasets(TrainConfig(quick=True, data_dir=data_dir, outlier_weight=0.5, outlier_images=40),
                             context)
        pixels, labels = next(iter(data.batches))
        assert len(pixels) == len(labels) + data.batches.outliers_per_batch > len(labels)
        plain = load_datasets(TrainConfig(quick=True, data_dir=data_dir, outlier_weight=0), context)
        assert len(next(iter(plain.batches))[0]) == len(labels)
        # Generated digits join MNIST's, labelled (QUICK.train_images MNIST images in a quick run).
        mixed = load_datasets(TrainConfig(quick=True, data_dir=data_dir, synthetic_digits=30), context)
        assert len(mixed.batches.labels) == len(plain.batches.labels) + 30
        assert mixed.batches.labels[-30:].tolist() == [index % 10 for index in range(15)] * 2
    finally:
        teardown(context)


def test_stroke_change_thickens_thins_or_leaves_alone():
    from training.data import change_strokes

    image = torch.zeros(3, 1, 28, 28)
    image[:, :, 6:22, 13:15] = 1.0   # a 2-px vertical stroke
    changed = change_strokes(image, torch.tensor([1.0, -0.5, 0.0]).view(3, 1, 1, 1))
    ink = changed.sum(dim=(1, 2, 3))
    assert ink[0] > image[0].sum() > ink[1] and torch.equal(changed[2], image[2])


def test_auroc_and_ece_on_cases_worked_by_hand():
    from training.trust import auroc
    from training.trust import expected_calibration_error, fit_temperature

    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5
    assert auroc(np.array([0.0, 3.0]), np.array([1.0, 2.0])) == 0.5
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    # 0.9 bin: both right (gap 0.1); 0.6 bin: one of two right (gap 0.1): ECE 0.1.
    assert expected_calibration_error(probabilities, np.array([0, 0, 0, 1])) == pytest.approx(0.1)
    # Overconfident logits (right 80% of the time at ~99.9% confidence) want a temperature > 1.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    guesses = np.where(rng.random(2000) < 0.8, labels, (labels + 1) % 10)
    logits = np.eye(10)[guesses] * 8.0
    assert fit_temperature(logits, labels) > 1.5


# --- the tests' trained model ----------------------------------------------------------------------
# The test recipe (conftest.TEST_RECIPE: 2 epochs on 16,384 images, outlier exposure on) refused
# REFUSED_MEASURED of these non-digits and accepted ACCEPTED_MEASURED of MNIST test digits; the bars
# keep a margin below that (the aim for `make train` is 97% / 99%, benchmarks/TRUST.md). Measured
# with the threshold at 99% of validation digits (2026-12-04): 81.4% refused, 98.8% accepted.
TRAINED_MIN_REFUSED = 0.75
TRAINED_MIN_ACCEPTED = 0.96


def refusal_and_acceptance(trust: Trust, non_digit_logits: np.ndarray, digit_logits: np.ndarray) -> tuple[float, float]:
    return float((~trust.is_digit(non_digit_logits)).mean()), float(trust.is_digit(digit_logits).mean())


@pytest.fixture(scope="module")
def trained_outputs(trained_checkpoint, mnist_digits):
    from export.artifacts import load_model
    from training.synthetic import non_digits
    from training.trust import model_logits

    model, checkpoint = load_model(trained_checkpoint)
    return (Trust.from_metadata(checkpoint), model_logits(model, non_digits("eval", 30).images),
            model_logits(model, mnist_digits.images[:2000].copy()))


def test_the_trained_models_trust_refuses_non_digits_and_accepts_digits(trained_outputs):
    trust, non_digit_logits, digit_logits = trained_outputs
    refused, accepted = refusal_and_acceptance(trust, non_digit_logits, digit_logits)
    assert trust.chosen_on.startswith("val: 5000 held-out")
    assert refused >= TRAINED_MIN_REFUSED and accepted >= TRAINED_MIN_ACCEPTED, (refused, accepted)


def test_a_wrong_threshold_fails_those_bars(trained_outputs):
    trust, non_digit_logits, digit_logits = trained_outputs
    for threshold in (np.inf, -np.inf):   # refuse everything, accept everything
        wrong = Trust(trust.score, float(np.nan_to_num(threshold)), trust.temperature, trust.accept_rate,
                      trust.chosen_on)
        refused, accepted = refusal_and_acceptance(wrong, non_digit_logits, digit_logits)
        assert not (refused >= TRAINED_MIN_REFUSED and accepted >= TRAINED_MIN_ACCEPTED), threshold


def test_the_options_of_trust_training_are_checked_with_a_reason():
    from training.config import ConfigError, TrainConfig, validate

    for config, reason in ((TrainConfig(pipeline="torchvision", synthetic_digits=0), "--outlier-weight 0"),
                           (TrainConfig(pipeline="torchvision", outlier_weight=0), "--synthetic-digits 0"),
                           (TrainConfig(val_images=0), "trust threshold is chosen on them"),
                           (TrainConfig(select_by="test_acc"), "select by"),
                           (TrainConfig(max_stroke_change=2.0), "stroke change")):
        with pytest.raises(ConfigError, match=reason):
            validate(config)
    validate(TrainConfig(pipeline="torchvision", outlier_weight=0, synthetic_digits=0))
    assert TrainConfig().outlier_loss_weight == 0.5 and TrainConfig(quick=True).outlier_loss_weight == 0


def test_training_without_the_fonts_says_how_to_install_them(monkeypatch, tmp_path, data_dir):
    """The generated non-digits are drawn in system fonts: on a machine without them, mnist-train
    ends with one line naming `make fonts`, not a traceback (make train installs them first)."""
    from click.testing import CliRunner

    from training import synthetic
    from training.cli import main
    monkeypatch.setattr(synthetic, "FONT_DIRS", (str(tmp_path / "no-fonts"),))
    result = CliRunner().invoke(main, ["--data-dir", data_dir, "--train-subset", "512", "--epochs", "1",
                                       "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 1, result.output
    assert "make fonts" in result.output and "Traceback" not in result.output


def test_trust_md_names_the_recipe_as_run_never_null():
    """TRUST.md's header printed null for every setting left to the recipe's default (outlier
    weight and pool, synthetic digits, held-out images): it names the values the run used."""
    from dataclasses import asdict

    from benchmarks.trust import recipe_summary
    from training.config import DEFAULT_OUTLIER_WEIGHT, DEFAULT_VAL_IMAGES, TrainConfig

    summary = recipe_summary({"train_config": {**asdict(TrainConfig()), "a_setting_since_removed": 1}})
    assert None not in summary.values(), summary
    assert summary["val_images"] == DEFAULT_VAL_IMAGES and summary["outlier_weight"] == DEFAULT_OUTLIER_WEIGHT
    assert recipe_summary({"train_config": asdict(TrainConfig(val_images=500))})["val_images"] == 500
