"""Digits seen differently (issue 26 point 2): per shift of training/shifts.py, the share of
digits accepted as digits and read right, and MNIST-C's mean error. benchmarks/trust.py calls
measure_shifts and puts markdown_lines into TRUST.md.

Every shift is measured as served: MNIST-C's 28x28 images are sent as PNGs and the captures as
the files a user sends, through serving's preprocessing (preprocess_bytes) first; an image it
refuses (422 no_digit) counts as refused and wrong. MNIST-C's error is also measured the paper's
way, the 28x28 fed to the model as it is ("raw"), for comparison with published figures.

    python -m benchmarks.shifted --split val CHECKPOINT...   # compare models on the validation split
"""
from __future__ import annotations

from dataclasses import dataclass

import click
import numpy as np

from serving.handler.artifact import Trust
from serving.handler.preprocess import ImageError, preprocess_bytes
from training.captures import differences
from training.shifts import MNIST_C, VAL_PARAMS, ShiftedSet, ShiftParams, encode, shift_sets

PER_SHIFT = 1000   # MNIST test digits per shift (the same digits for every shift)
# The paper's CNN figure (Mu and Gilmer 2019, arXiv 1906.02337): None until someone copies it
# from the paper with its table number. The sources this session could search held the paper's
# abstract and summaries, not its tables; a figure is never typed from memory.
PAPER_CNN_MEAN_ERROR: float | None = None
PAPER_SOURCE = "Mu and Gilmer 2019, MNIST-C, arXiv 1906.02337"


def sent_files(shifted: ShiftedSet) -> list[bytes]:
    """What a user sends: the captures' files, or MNIST-C's 28x28 as 8-bit PNGs."""
    return shifted.encoded if shifted.encoded is not None else [encode(x) for x in shifted.images]


def served_pixels(shifted: ShiftedSet) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [M, 28, 28] model inputs in [0, 1], bool [N] preprocessed) for a set, as served."""
    pixels, kept = [], []
    for data in sent_files(shifted):
        try:
            pixels.append(preprocess_bytes(data, 0.0, 1.0)[0])   # mean 0, std 1: pixels in [0, 1]
            kept.append(True)
        except ImageError:
            kept.append(False)
    empty = np.zeros((0, 28, 28), dtype=np.float32)
    return (np.stack(pixels).astype(np.float32) if pixels else empty), np.array(kept)


@dataclass(frozen=True)
class ServedShift:
    """One shift as served: the model's logits [M, 10] for the images preprocessing kept, and
    which those were (bool [N]); the refused ones count as refused and wrong."""
    shifted: ShiftedSet
    logits: np.ndarray
    kept: np.ndarray


def served_shift(model, shifted: ShiftedSet) -> ServedShift:
    from training.trust import model_logits

    pixels, kept = served_pixels(shifted)
    return ServedShift(shifted, model_logits(model, pixels) if len(pixels) else np.zeros((0, 10)), kept)


def shift_row(model, trust: Trust, served: ServedShift) -> dict:
    from training.trust import model_logits

    shifted, kept = served.shifted, served.kept
    accepted = np.zeros(len(shifted.labels), dtype=bool)
    correct = np.zeros(len(shifted.labels), dtype=bool)
    accepted[kept] = trust.is_digit(served.logits)
    correct[kept] = served.logits.argmax(1) == shifted.labels[kept]
    row = {"kind": "mnist_c" if shifted.name in MNIST_C else "capture", "digits": len(shifted.labels),
           "preprocessing_refused": float((~kept).mean()), "accepted": float(accepted.mean()),
           "correct": float(correct.mean()), "error": float(1 - correct.mean()),
           "accepted_and_correct": float((accepted & correct).mean())}
    if shifted.images is not None:     # the paper's protocol: the 28x28 to the model as it is
        row["raw_error"] = float((model_logits(model, shifted.images).argmax(1) != shifted.labels).mean())
    return row


def split_digits(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(uint8 images, labels, first usable index): eval takes MNIST test digits; val the
    training digits that training always holds out (the last DEFAULT_VAL_IMAGES)."""
    from training.config import DEFAULT_VAL_IMAGES
    from training.data import load_mnist

    images, labels = (tensor.numpy() for tensor in load_mnist(data_dir, train=split == "val"))
    return images, labels, (len(images) - DEFAULT_VAL_IMAGES if split == "val" else 0)


def served_shifts(model, data_dir: str, per_shift: int = PER_SHIFT, split: str = "eval") -> dict[str, ServedShift]:
    """Every shift on the same per_shift digits of the split, as served."""
    images, labels, first = split_digits(data_dir, split)
    return {name: served_shift(model, shifted)
            for name, shifted in shift_sets(images, labels, split, per_shift, first).items()}


def measure_shifts(checkpoint_path: str, data_dir: str, per_shift: int = PER_SHIFT, split: str = "eval") -> dict:
    """Every shift on per_shift digits of the split: rows, MNIST-C mean error (served and raw)."""
    from export.artifacts import load_model

    model, saved = load_model(checkpoint_path)
    return shift_table(model, Trust.from_metadata(saved), served_shifts(model, data_dir, per_shift, split),
                       per_shift, split)


def shift_table(model, trust: Trust, served: dict[str, ServedShift], per_shift: int, split: str) -> dict:
    """The rows and means of shifts already served with this model."""
    rows = {name: shift_row(model, trust, one) for name, one in served.items()}
    mnist_c = [row for row in rows.values() if row["kind"] == "mnist_c"]
    return {"per_shift": per_shift, "split": split, "rows": rows,
            "mnist_c_mean_error": float(np.mean([row["error"] for row in mnist_c])),
            "mnist_c_mean_raw_error": float(np.mean([row["raw_error"] for row in mnist_c])),
            "mean_accepted": float(np.mean([row["accepted"] for row in rows.values()])),
            "mean_correct": float(np.mean([row["correct"] for row in rows.values()])),
            "paper_cnn_mean_error": PAPER_CNN_MEAN_ERROR, "paper_source": PAPER_SOURCE}


def validation_differences() -> str:
    """What the validation split (for choosing augmentations and thresholds) changes: eval -> val."""
    evaluation = ShiftParams()
    changed = [f"{name} severity {evaluation.severity[name]} -> {level}" for name, level in VAL_PARAMS.severity.items()
               if evaluation.severity[name] != level]
    changed += differences(evaluation.captures, VAL_PARAMS.captures)
    return "; ".join(changed)


def markdown_lines(shifts: dict) -> list[str]:
    paper = shifts["paper_cnn_mean_error"]
    paper_text = f"{paper:.2%}" if paper is not None else "not copied yet (see benchmarks/shifted.py)"
    lines = ["## Digits seen differently (training/shifts.py, eval split: MNIST test digits, never trained on)", "",
             f"{shifts['per_shift']} MNIST test digits per shift, the same digits for each; MNIST-C's 15 corruptions "
             "(its code's definitions and dataset severities, ported to numpy: training/corruptions.py) sent as "
             "28x28 PNGs, the captures as the files a user sends, all through serving's preprocessing "
             "(its refusals count as refused and wrong).", "",
             f"MNIST-C mean error (15 corruptions) as served: **{shifts['mnist_c_mean_error']:.2%}**; fed to the "
             f"model as they are (the paper's protocol): {shifts['mnist_c_mean_raw_error']:.2%}; "
             f"the paper's CNN ({shifts['paper_source']}): {paper_text}.", "",
             "The validation split of the same shifts (training/shifts.py, split val: training digits, other "
             f"seeds; for choosing augmentations and thresholds, not measured here) differs: {validation_differences()}.",
             "",
             f"Mean over all {len(shifts['rows'])} shifts: accepted {shifts['mean_accepted']:.2%}, "
             f"correct {shifts['mean_correct']:.2%}.", "",
             "| shift | kind | accepted | correct | accepted and correct | refused by preprocessing | correct, raw |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, row in shifts["rows"].items():
        raw = f"{1 - row['raw_error']:.1%}" if "raw_error" in row else "-"
        lines.append(f"| {name} | {row['kind']} | {row['accepted']:.1%} | {row['correct']:.1%} | "
                     f"{row['accepted_and_correct']:.1%} | {row['preprocessing_refused']:.1%} | {raw} |")
    return lines + [""]


def comparison_lines(results: dict[str, dict]) -> list[str]:
    """Models side by side on one split: per shift, accepted / correct."""
    names = list(next(iter(results.values()))["rows"])
    lines = ["| shift | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for name in names + ["mean"]:
        cells = []
        for result in results.values():
            if name == "mean":
                cells.append(f"{result['mean_accepted']:.1%} / {result['mean_correct']:.1%}")
            else:
                row = result["rows"][name]
                cells.append(f"{row['accepted']:.1%} / {row['correct']:.1%}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


@click.command()
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--data-dir", envvar="DATA_DIR", required=True)
@click.option("--split", type=click.Choice(["val", "eval"]), default="val", show_default=True)
@click.option("--per-shift", type=click.IntRange(min=10), default=300, show_default=True)
def main(checkpoints, data_dir, split, per_shift):
    """Accepted / correct per shift for each checkpoint, on one split (val: to choose by)."""
    results = {path: measure_shifts(path, data_dir, per_shift, split) for path in checkpoints}
    click.echo("\n".join(comparison_lines(results)))


if __name__ == "__main__":
    main()
