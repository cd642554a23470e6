"""Which threshold answers "is there a digit at all?" (issue 26 point 4): rules that choose the
is_digit threshold on validation data only (held-out training digits, clean, and the validation
split of the everyday shifts), each measured on what no rule saw: MNIST test digits, the shifts'
evaluation split, the generated non-digits and Fashion-MNIST. A rule's demand on shifted digits
counts those the model saw and read right: no threshold brings back an image preprocessing
refused, and accepting a misread digit is no gain. Both scores of the trust record
(energy and max_softmax, at the record's temperature). benchmarks/trust.py calls measure_rules
and puts markdown_lines into TRUST.md; training keeps RULES[0] (training/trust.py ACCEPT_RATE).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.handler.artifact import TRUST_SCORES, Trust
from training.trust import ACCEPT_RATE, threshold_at


@dataclass(frozen=True)
class Rule:
    """Accept at least `clean` of the clean and `shifted` of the shifted validation digits read
    right (None: no demand on that set); the threshold is the lower of the two it takes."""
    name: str
    clean: float | None
    shifted: float | None


RULES = (
    Rule(f"{ACCEPT_RATE:.0%} of clean validation digits (shipped)", ACCEPT_RATE, None),
    Rule("99% of clean and 97% of shifted validation digits read right (issue 26's example)", 0.99, 0.97),
    Rule("97% of clean validation digits (shipped before 2026-12-04)", 0.97, None),
)


@dataclass(frozen=True)
class Scored:
    """A set's logits for the images the model saw, and how many more were refused before it
    (preprocessing found no digit): those are refused at any threshold. labels: the digits the
    seen images show, where they are digits."""
    logits: np.ndarray
    refused_before: int = 0
    labels: np.ndarray | None = None

    def read_right(self) -> np.ndarray:
        return self.logits[self.logits.argmax(1) == self.labels]

    def accepted(self, trust: Trust) -> float:
        return float(trust.is_digit(self.logits).sum()) / (len(self.logits) + self.refused_before)


@dataclass(frozen=True)
class RuleSets:
    """Validation (chooses) and evaluation (measures) sets, each a Scored or a list of them (one per shift)."""
    val_clean: Scored
    val_shifts: list[Scored]
    mnist_test: Scored
    eval_shifts: list[Scored]
    non_digits: Scored
    fashion: Scored | None


def scored_shifts(served: dict) -> list[Scored]:
    """benchmarks.shifted's served shifts (name -> ServedShift) as Scored sets."""
    return [Scored(shift.logits, int((~shift.kept).sum()), shift.shifted.labels[shift.kept])
            for shift in served.values()]


def rule_threshold(rule: Rule, trust: Trust, sets: RuleSets) -> float:
    thresholds = []
    if rule.clean is not None:
        thresholds.append(threshold_at(trust.scores(sets.val_clean.logits), rule.clean))
    if rule.shifted is not None:
        scores = np.concatenate([trust.scores(shift.read_right()) for shift in sets.val_shifts])
        thresholds.append(threshold_at(scores, rule.shifted))
    return min(thresholds)


def measure_rules(temperature: float, sets: RuleSets) -> dict:
    """Per score and rule: the threshold and what it accepts or refuses on the evaluation sets."""
    table = {}
    for score in TRUST_SCORES:
        for rule in RULES:
            unset = Trust(score, 0.0, temperature, 0.0, "val")
            trust = Trust(score, rule_threshold(rule, unset, sets), temperature, 0.0, "val")
            shifts = [shift.accepted(trust) for shift in sets.eval_shifts]
            table[f"{score}: {rule.name}"] = {
                "score": score, "rule": rule.name, "threshold": trust.threshold,
                "val_clean_accepted": sets.val_clean.accepted(trust),
                "val_shifts_accepted": float(np.mean([shift.accepted(trust) for shift in sets.val_shifts])),
                "val_shifts_read_right_accepted": float(np.mean([trust.is_digit(shift.read_right()).mean()
                                                                 for shift in sets.val_shifts])),
                "mnist_test_accepted": sets.mnist_test.accepted(trust),
                "shifts_accepted": float(np.mean(shifts)), "lowest_shift_accepted": float(min(shifts)),
                "non_digits_refused": 1 - sets.non_digits.accepted(trust),
                "fashion_refused": None if sets.fashion is None else 1 - sets.fashion.accepted(trust)}
    return table


def markdown_lines(table: dict) -> list[str]:
    lines = ["## The threshold for the semantic question (benchmarks/thresholds.py)", "",
             "Each rule chooses the is_digit threshold on validation data alone (clean: the checkpoint's held-out "
             "training digits; shifted: the validation split of the shifts above, through serving's preprocessing); "
             "the other columns are measured on data no rule saw (shifts: the evaluation split, mean and lowest "
             "over the shifts).", "",
             "| score: rule | val clean accepted | val shifts accepted (all / read right) | MNIST test accepted | "
             "shifts accepted (mean / lowest) | non-digits refused | Fashion-MNIST refused |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in table.items():
        fashion = "-" if row["fashion_refused"] is None else f"{row['fashion_refused']:.1%}"
        lines.append(f"| {name} | {row['val_clean_accepted']:.1%} | {row['val_shifts_accepted']:.1%} / "
                     f"{row['val_shifts_read_right_accepted']:.1%} | "
                     f"{row['mnist_test_accepted']:.1%} | {row['shifts_accepted']:.1%} / "
                     f"{row['lowest_shift_accepted']:.1%} | {row['non_digits_refused']:.1%} | {fashion} |")
    return lines + [""]
