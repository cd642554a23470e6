"""The end-of-run report: per-digit accuracy and the confusion matrix of the kept weights."""
from __future__ import annotations

import json
from pathlib import Path

from .durable import write_text_atomic

REPORT_KEYS = ("selected_by", "selected_epoch", "test_acc", "per_class_acc", "confusion_matrix")


def format_confusion(metrics: dict) -> str:
    lines = [f"kept weights ({metrics['selected_by']}, epoch {metrics['selected_epoch']}): "
             f"test accuracy {metrics['test_acc']:.2%}",
             "digit  accuracy   confusion (rows: true digit, columns: predicted)",
             "                  " + "".join(f"{digit:>6}" for digit in range(len(metrics["per_class_acc"])))]
    for digit, (accuracy, row) in enumerate(zip(metrics["per_class_acc"], metrics["confusion_matrix"])):
        lines.append(f"{digit:>5}  {accuracy:8.2%}  " + "".join(f"{count:>6}" for count in row))
    return "\n".join(lines)


def write_test_report(path: Path, metrics: dict) -> None:
    report = {key: metrics[key] for key in REPORT_KEYS if key in metrics}
    write_text_atomic(path, json.dumps(report, indent=1) + "\n")
    print(format_confusion(metrics), flush=True)
