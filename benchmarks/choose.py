"""Which training recipe (issue 26 point 3): models side by side on validation data alone, the
data recipes are chosen on, never on what TRUST.md reports.

Per checkpoint, with its own trust score and its is_digit threshold refitted to accept 97% and
99% of its clean validation digits (the held-out training digits):
    clean:      validation accuracy;
    shifts:     the validation split of the everyday shifts (training/shifts.py, split val; through
                serving's preprocessing, its refusals counted), mean accepted and mean accepted of
                those read right;
    non-digits: training/synthetic.py's "val" split (every category, symbols and doodles included;
                other seeds than the images outlier exposure trains on), refused per category.

    python -m benchmarks.choose --data-dir ../shared/mnist CHECKPOINT...
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import click
import numpy as np

from benchmarks.shifted import served_shifts
from benchmarks.thresholds import Scored, scored_shifts
from serving.handler.artifact import Trust

CLEAN_RATES = (0.97, 0.99)
VAL_PER_SHIFT = 300
VAL_PER_CATEGORY = 150
CATEGORY_COLUMNS = ("symbols", "doodles")   # the never-trained ones get their own columns


@dataclass(frozen=True)
class ValidationSets:
    """One model's logits on every validation set."""
    clean: Scored
    shifts: list[Scored]
    non_digits: Scored
    categories: np.ndarray


def validation_sets(model, checkpoint: dict, data_dir: str, non_digits) -> ValidationSets:
    from benchmarks.trust import model_outputs
    from training.trust import model_logits

    clean_logits, clean_labels = model_outputs(model, checkpoint, data_dir, {})["val"]
    return ValidationSets(Scored(clean_logits, 0, clean_labels),
                          scored_shifts(served_shifts(model, data_dir, VAL_PER_SHIFT, "val")),
                          Scored(model_logits(model, non_digits.images), sum(non_digits.blank.values())),
                          non_digits.categories)


def row(sets: ValidationSets, trust: Trust, rate: float) -> dict:
    """The model at the threshold that accepts `rate` of its clean validation digits."""
    from training.trust import threshold_at

    at = replace(trust, threshold=threshold_at(trust.scores(sets.clean.logits), rate), accept_rate=rate)
    refused = ~at.is_digit(sets.non_digits.logits)
    return {"clean_rate": rate,
            "clean_accuracy": float((sets.clean.logits.argmax(1) == sets.clean.labels).mean()),
            "shifts_accepted": float(np.mean([shift.accepted(at) for shift in sets.shifts])),
            "shifts_read_right_accepted": float(np.mean([at.is_digit(shift.read_right()).mean()
                                                         for shift in sets.shifts])),
            "non_digits_refused": 1 - sets.non_digits.accepted(at),
            **{f"{category}_refused": float(refused[sets.categories == category].mean())
               for category in CATEGORY_COLUMNS}}


def compare(checkpoints: list[str], data_dir: str, per_category: int = VAL_PER_CATEGORY) -> dict[str, list[dict]]:
    from export.artifacts import load_model
    from training.synthetic import non_digits

    made = non_digits("val", per_category)
    results = {}
    for path in checkpoints:
        model, checkpoint = load_model(path)
        sets = validation_sets(model, checkpoint, data_dir, made)
        results[path] = [row(sets, Trust.from_metadata(checkpoint), rate) for rate in CLEAN_RATES]
    return results


def markdown_lines(results: dict[str, list[dict]]) -> list[str]:
    lines = ["| checkpoint | clean val accepted | val accuracy | shifts accepted (read right) | non-digits refused | "
             + " | ".join(f"{category} refused" for category in CATEGORY_COLUMNS) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(CATEGORY_COLUMNS)]
    for path, rows in results.items():
        for measured in rows:
            lines.append(f"| {path} | {measured['clean_rate']:.0%} | {measured['clean_accuracy']:.2%} | "
                         f"{measured['shifts_accepted']:.1%} ({measured['shifts_read_right_accepted']:.1%}) | "
                         f"{measured['non_digits_refused']:.1%} | "
                         + " | ".join(f"{measured[f'{category}_refused']:.1%}" for category in CATEGORY_COLUMNS)
                         + " |")
    return lines


@click.command()
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--data-dir", envvar="DATA_DIR", required=True)
@click.option("--per-category", type=click.IntRange(min=10), default=VAL_PER_CATEGORY, show_default=True)
def main(checkpoints, data_dir, per_category):
    """Checkpoints side by side on validation data alone (to choose a recipe by)."""
    click.echo("\n".join(markdown_lines(compare(list(checkpoints), data_dir, per_category))))


if __name__ == "__main__":
    main()
