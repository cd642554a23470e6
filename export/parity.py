"""Prove that eager PyTorch, TorchScript and ONNX Runtime compute the same function.

Each backend runs the same normalized MNIST images at several batch sizes; logits must
agree with eager within an absolute tolerance and every predicted digit must match.
"""
from __future__ import annotations

import numpy as np

from serving.handler.artifact import Runner, run_batched

DEFAULT_TOLERANCE = 1e-4       # max |logit difference|; fp32 kernels differ by ~1e-6 here
DEFAULT_BATCH_SIZES = (1, 7, 256)
SMALL_BATCH_IMAGES = 256       # batch sizes below the largest run on this many images, to stay fast


class ParityError(Exception):
    """The exported artifacts do not compute what the trained model computes."""


def check_parity(backends: dict[str, Runner], images: np.ndarray, labels: np.ndarray, *,
                 reference: str = "eager", tolerance: float = DEFAULT_TOLERANCE,
                 batch_sizes=DEFAULT_BATCH_SIZES) -> dict:
    """Compare every backend against the reference; return the report (passed: bool).

    images: float32 [N, 1, 28, 28], already normalized. The largest batch size runs on all
    N images (agreement and accuracy on the whole set), smaller ones on the first few hundred.
    """
    largest = max(batch_sizes)
    report = {"reference": reference, "tolerance": tolerance, "images": int(len(images)),
              "batches": [], "accuracy": {}, "failures": []}
    for batch_size in sorted(batch_sizes):
        count = len(images) if batch_size == largest else min(len(images), SMALL_BATCH_IMAGES)
        logits = {name: run_batched(backend, images[:count], batch_size) for name, backend in backends.items()}
        expected = logits[reference]
        entry = {"batch_size": batch_size, "images": count, "max_abs_diff": {}, "disagreements": {}}
        for name, values in logits.items():
            if name == reference:
                continue
            max_diff = float(np.abs(values - expected).max())
            disagreements = int((values.argmax(1) != expected.argmax(1)).sum())
            entry["max_abs_diff"][name] = max_diff
            entry["disagreements"][name] = disagreements
            if not max_diff <= tolerance:  # written so that NaN fails too
                report["failures"].append(f"{name} at batch {batch_size}: max |diff| {max_diff:.3g} > {tolerance:g}")
            if disagreements:
                report["failures"].append(f"{name} at batch {batch_size}: {disagreements} predictions differ")
        if batch_size == largest:
            report["accuracy"] = {name: float((values.argmax(1) == labels[:count]).mean())
                                  for name, values in logits.items()}
        report["batches"].append(entry)
    report["passed"] = not report["failures"]
    return report


def format_report(report: dict) -> str:
    names = list(report["accuracy"])
    others = [name for name in names if name != report["reference"]]
    lines = [f"parity against {report['reference']} (tolerance {report['tolerance']:g} on logits)",
             "batch  images  " + "  ".join(f"{name + ' max|diff|':>24}  {'differ':>6}" for name in others)]
    for entry in report["batches"]:
        lines.append(f"{entry['batch_size']:>5}  {entry['images']:>6}  " + "  ".join(
            f"{entry['max_abs_diff'][name]:>24.2e}  {entry['disagreements'][name]:>6}" for name in others))
    lines.append("test accuracy: " + ", ".join(f"{name} {acc:.2%}" for name, acc in report["accuracy"].items()))
    lines.append("PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"]))
    return "\n".join(lines)
