"""The threshold rules of benchmarks/thresholds.py (issue 26 point 4): each chooses on validation
data alone and accepts at least what it demands there; the shipped rule is the one training keeps;
the table's shares are what the thresholds accept, images refused before the model included."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.thresholds import RULES, RuleSets, Scored, measure_rules, rule_threshold
from serving.handler.artifact import Trust


def logits_scoring(energies: np.ndarray) -> np.ndarray:
    """Logits whose energy score (temperature 1) is the given value: ten equal logits e - log 10."""
    return np.repeat((np.asarray(energies, dtype=np.float64) - np.log(10))[:, None], 10, axis=1)


@pytest.fixture
def sets() -> RuleSets:
    rng = np.random.default_rng(0)
    clean = Scored(logits_scoring(rng.normal(10, 1, 1000)))
    # shifted digits score lower than clean ones; one shift had 5 of its 200 images refused before the
    # model, and a quarter of it is misread (the logits say 0, the labels 3)
    labels = np.where(np.arange(195) % 4 == 0, 3, 0)
    val_shifts = [Scored(logits_scoring(rng.normal(7, 1.5, 200)), 0, np.zeros(200, dtype=int)),
                  Scored(logits_scoring(rng.normal(6, 1.5, 195)), 5, labels)]
    return RuleSets(val_clean=clean, val_shifts=val_shifts, mnist_test=Scored(logits_scoring(rng.normal(10, 1, 500))),
                    eval_shifts=[Scored(logits_scoring(rng.normal(6.5, 1.5, 300)), 10)],
                    non_digits=Scored(logits_scoring(rng.normal(3, 1.5, 400)), 40),
                    fashion=Scored(logits_scoring(rng.normal(2, 1, 300)), 5))


def test_each_rule_accepts_at_least_what_it_demands_on_validation(sets):
    unset = Trust("energy", 0.0, 1.0, 0.0, "val")
    for rule in RULES:
        trust = Trust("energy", rule_threshold(rule, unset, sets), 1.0, 0.0, "val")
        if rule.clean is not None:
            assert sets.val_clean.accepted(trust) >= rule.clean
        if rule.shifted is not None:   # of the shifted digits the model saw and read right
            right = [trust.is_digit(shift.read_right()) for shift in sets.val_shifts]
            assert sum(r.sum() for r in right) / sum(len(r) for r in right) >= rule.shifted
    # demanding shifted digits lowers the threshold below the clean-only one
    assert rule_threshold(RULES[1], unset, sets) < rule_threshold(RULES[0], unset, sets)


def test_a_misread_digit_is_not_what_a_shifted_rule_demands(sets):
    assert len(sets.val_shifts[1].read_right()) == 195 - 49


def test_the_table_counts_refusals_before_the_model_and_measures_on_evaluation_sets(sets):
    table = measure_rules(1.0, sets)
    assert len(table) == 2 * len(RULES)
    row = table[f"energy: {RULES[0].name}"]
    trust = Trust("energy", row["threshold"], 1.0, 0.0, "val")
    assert row["mnist_test_accepted"] == pytest.approx(trust.is_digit(sets.mnist_test.logits).mean())
    refused = (~trust.is_digit(sets.non_digits.logits)).sum() + 40
    assert row["non_digits_refused"] == pytest.approx(refused / 440)
    assert row["shifts_accepted"] == pytest.approx(trust.is_digit(sets.eval_shifts[0].logits).sum() / 310)
    assert row["fashion_refused"] == pytest.approx(1 - trust.is_digit(sets.fashion.logits).sum() / 305)


def test_the_shipped_rule_is_the_threshold_training_records(quick_checkpoint, data_dir):
    """RULES[0] on the checkpoint's held-out validation digits gives its trust record's threshold (up to
    the float rounding of training's own kernels: neighbouring scores lie much further apart)."""
    from benchmarks.trust import held_out_count
    from export.artifacts import load_model
    from training.data import load_mnist
    from training.trust import model_logits

    model, saved = load_model(quick_checkpoint)
    recorded = Trust.from_metadata(saved)
    images, _ = load_mnist(data_dir, train=True)
    val = Scored(model_logits(model, images[-held_out_count(saved):]))
    unset = Trust(recorded.score, 0.0, recorded.temperature, 0.0, "val")
    empty = Scored(np.zeros((0, 10)))
    rule_sets = RuleSets(val, [], empty, [], empty, None)
    assert rule_threshold(RULES[0], unset, rule_sets) == pytest.approx(recorded.threshold, abs=1e-4)


def test_a_recipe_is_compared_at_the_threshold_that_accepts_its_share_of_clean_validation_digits():
    """benchmarks/choose.py: each rate refits the threshold on the clean validation digits; what
    preprocessing refused counts as refused, and the never-trained categories get their own share."""
    from benchmarks.choose import ValidationSets, row

    rng = np.random.default_rng(1)
    clean = Scored(logits_scoring(rng.normal(10, 1, 1000)), 0, np.zeros(1000, dtype=int))
    shifts = [Scored(logits_scoring(rng.normal(8, 2, 300)), 0, np.zeros(300, dtype=int))]
    energies = np.concatenate([rng.normal(3, 1, 100), rng.normal(8.5, 1, 100)])   # doodles look more like digits
    sets = ValidationSets(clean, shifts, Scored(logits_scoring(energies), 20),
                          np.array(["symbols"] * 100 + ["doodles"] * 100))
    trust = Trust("energy", 0.0, 1.0, 0.97, "val")
    strict, lenient = row(sets, trust, 0.97), row(sets, trust, 0.99)
    assert strict["clean_accuracy"] == 1.0
    assert strict["shifts_accepted"] < lenient["shifts_accepted"]
    assert strict["non_digits_refused"] > lenient["non_digits_refused"]
    assert strict["symbols_refused"] > 0.95 and strict["doodles_refused"] < 0.9
    at_97 = Trust("energy", float(np.sort(trust.scores(clean.logits))[30]), 1.0, 0.97, "val")
    refused_seen = 1 - at_97.is_digit(sets.non_digits.logits).mean()
    assert strict["non_digits_refused"] == pytest.approx((refused_seen * 200 + 20) / 220)
