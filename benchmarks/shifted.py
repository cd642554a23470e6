"""Digits seen differently (issue 26 point 2): per shift of training/shifts.py, the share of
digits accepted as digits and read right, and MNIST-C's mean error. benchmarks/trust.py calls
measure_shifts and puts markdown_lines into TRUST.md.

MNIST-C's corruptions are 28x28 white-on-black, fed to the model as they are (as the paper
did); the captures are files in the form a user sends and go through serving's preprocessing
(preprocess_bytes) first: an image it refuses (422 no_digit) counts as refused and wrong.
"""
from __future__ import annotations

import numpy as np

from serving.handler.artifact import Trust
from serving.handler.preprocess import ImageError, preprocess_bytes
from training.shifts import MNIST_C, VAL_PARAMS, ShiftedSet, ShiftParams, shift_sets

PER_SHIFT = 1000   # MNIST test digits per shift (the same digits for every shift)
# The paper's CNN figure (Mu and Gilmer 2019, arXiv 1906.02337): None until someone copies it
# from the paper with its table number. The sources this session could search held the paper's
# abstract and summaries, not its tables; a figure is never typed from memory.
PAPER_CNN_MEAN_ERROR: float | None = None
PAPER_SOURCE = "Mu and Gilmer 2019, MNIST-C, arXiv 1906.02337"


def served_pixels(shifted: ShiftedSet) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [M, 28, 28] model inputs in [0, 1], bool [N] preprocessed) for a set."""
    if shifted.images is not None:
        return shifted.images, np.ones(len(shifted.labels), dtype=bool)
    pixels, kept = [], []
    for data in shifted.encoded:
        try:
            pixels.append(preprocess_bytes(data, 0.0, 1.0)[0])   # mean 0, std 1: pixels in [0, 1]
            kept.append(True)
        except ImageError:
            kept.append(False)
    empty = np.zeros((0, 28, 28), dtype=np.float32)
    return (np.stack(pixels).astype(np.float32) if pixels else empty), np.array(kept)


def shift_row(model, trust: Trust, shifted: ShiftedSet) -> dict:
    from training.trust import model_logits

    pixels, kept = served_pixels(shifted)
    accepted = np.zeros(len(shifted.labels), dtype=bool)
    correct = np.zeros(len(shifted.labels), dtype=bool)
    if len(pixels):
        logits = model_logits(model, pixels)
        accepted[kept] = trust.is_digit(logits)
        correct[kept] = logits.argmax(1) == shifted.labels[kept]
    return {"kind": "mnist_c" if shifted.name in MNIST_C else "capture", "digits": len(shifted.labels),
            "preprocessing_refused": float((~kept).mean()), "accepted": float(accepted.mean()),
            "correct": float(correct.mean()), "error": float(1 - correct.mean()),
            "accepted_and_correct": float((accepted & correct).mean())}


def measure_shifts(checkpoint_path: str, data_dir: str, per_shift: int = PER_SHIFT) -> dict:
    """Every shift on per_shift MNIST test digits (the eval split): rows, MNIST-C mean error."""
    from export.artifacts import load_model
    from training.data import load_mnist

    model, saved = load_model(checkpoint_path)
    trust = Trust.from_metadata(saved)
    images, labels = (tensor.numpy() for tensor in load_mnist(data_dir, train=False))
    rows = {name: shift_row(model, trust, shifted)
            for name, shifted in shift_sets(images, labels, "eval", per_shift).items()}
    mnist_c = [row["error"] for row in rows.values() if row["kind"] == "mnist_c"]
    return {"per_shift": per_shift, "rows": rows, "mnist_c_mean_error": float(np.mean(mnist_c)),
            "mean_accepted": float(np.mean([row["accepted"] for row in rows.values()])),
            "mean_correct": float(np.mean([row["correct"] for row in rows.values()])),
            "paper_cnn_mean_error": PAPER_CNN_MEAN_ERROR, "paper_source": PAPER_SOURCE}


def validation_differences() -> str:
    """What the validation split (for choosing augmentations and thresholds) changes: eval -> val."""
    evaluation = ShiftParams()
    changed = [f"{name} severity {evaluation.severity[name]} -> {level}" for name, level in VAL_PARAMS.severity.items()
               if evaluation.severity[name] != level]
    changed += [f"{key} {value} -> {getattr(VAL_PARAMS, key)}" for key, value in vars(evaluation).items()
                if key != "severity" and getattr(VAL_PARAMS, key) != value]
    return "; ".join(changed)


def markdown_lines(shifts: dict) -> list[str]:
    paper = shifts["paper_cnn_mean_error"]
    paper_text = f"{paper:.2%}" if paper is not None else "not copied yet (see benchmarks/shifted.py)"
    lines = ["## Digits seen differently (training/shifts.py, eval split: MNIST test digits, never trained on)", "",
             f"{shifts['per_shift']} MNIST test digits per shift, the same digits for each; MNIST-C's 15 corruptions "
             "(its code's definitions and dataset severities, ported to numpy: training/corruptions.py) fed as "
             "28x28, the captures as the files a user sends, through serving's preprocessing "
             "(its refusals count as refused and wrong).", "",
             f"MNIST-C mean error (15 corruptions): **{shifts['mnist_c_mean_error']:.2%}**; "
             f"the paper's CNN ({shifts['paper_source']}): {paper_text}.", "",
             "The validation split of the same shifts (training/shifts.py, split val: training digits, other "
             f"seeds; for choosing augmentations and thresholds, not measured here) differs: {validation_differences()}.",
             "",
             f"Mean over all {len(shifts['rows'])} shifts: accepted {shifts['mean_accepted']:.2%}, "
             f"correct {shifts['mean_correct']:.2%}.", "",
             "| shift | kind | accepted | correct | accepted and correct | refused by preprocessing |",
             "|---|---|---:|---:|---:|---:|"]
    for name, row in shifts["rows"].items():
        lines.append(f"| {name} | {row['kind']} | {row['accepted']:.1%} | {row['correct']:.1%} | "
                     f"{row['accepted_and_correct']:.1%} | {row['preprocessing_refused']:.1%} |")
    return lines + [""]
