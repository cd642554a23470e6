"""The trust record of a trained model (serving.artifact.Trust): which score says "a digit",
the threshold on it and the temperature of the reported probabilities, all chosen on held-out
validation digits at the end of training, never on the test set."""
from __future__ import annotations

import numpy as np
import torch

from serving.handler.artifact import Trust, softmax
from serving.handler.preprocess import normalize_in_place

from .data import MNIST_MEAN, MNIST_STD

# The share of validation digits the threshold accepts: issue 26 asks for >= 99% of MNIST test
# digits accepted while >= 97% of non-digits stay refused. Chosen on validation data alone
# (python -m benchmarks.choose, docs/trust.md): on the make-train model 99% of clean validation
# digits accepted refused 97.3% of the validation non-digits (97%: 99.2%) and accepted 83.9% of the
# shifted validation digits (97%: 74.2%; since preprocessing reads two-tone backgrounds and takes
# the ink's side for its polarity, 2026-12-05: 91.7%, 97%: 81.7%); a threshold at exactly that share
# is one a reader can check.
ACCEPT_RATE = 0.99
# Chosen by measurement (python -m benchmarks.trust compares both): on the test recipe's model with
# outlier exposure (2 epochs on 16,384 images) energy refused 95.1% of the generated non-digits at
# 96.9% of MNIST test digits accepted, max_softmax 93.9% at 96.6% (AUROC 0.9923 vs 0.9922); without
# outlier exposure 78.9% vs 69.8%. Both thresholds accept 97% of the validation digits.
DEFAULT_SCORE = "energy"
ECE_BINS = 15
TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(8.0), 121))   # the grid a temperature is fitted on


@torch.inference_mode()
def model_logits(model: torch.nn.Module, images: torch.Tensor | np.ndarray, batch_size: int = 1000,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """float64 logits [N, 10] in eval mode and fp32 of images [N, 28, 28]: uint8 (MNIST's
    tensors) or float in [0, 1] (what serving's preprocessing returns)."""
    images = torch.as_tensor(images)
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = images[start:start + batch_size].to(device)
        pixels = pixels.float().div(255.0) if pixels.dtype == torch.uint8 else pixels.float().clone()
        chunks.append(model(normalize_in_place(pixels.unsqueeze(1), MNIST_MEAN, MNIST_STD)).double().cpu())
    return torch.cat(chunks).numpy()


def threshold_at(scores: np.ndarray, accept_rate: float) -> float:
    """The score that at least accept_rate of these scores reach (so is_digit accepts them)."""
    refused = int(np.floor((1 - accept_rate) * len(scores)))
    return float(np.sort(scores)[refused])


def confidence_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[tuple]:
    """Per non-empty equal-width confidence bin: (mean confidence, accuracy, images in it)."""
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1], right=True), 0, bins - 1)
    return [(float(confidence[which == b].mean()), float(correct[which == b].mean()), int((which == b).sum()))
            for b in range(bins) if (which == b).any()]


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy over equal-width bins."""
    return float(sum(abs(accuracy - confidence) * count
                     for confidence, accuracy, count in confidence_bins(probabilities, labels, bins)) / len(labels))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    probabilities = softmax(logits / temperature)
    return float(-np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-300)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature of least NLL on these (validation) digits, kept only where it also lowers
    their ECE; else 1.0: a temperature that does not help is not worth explaining."""
    best = min(TEMPERATURES, key=lambda t: negative_log_likelihood(logits, labels, t))
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits / best), labels)
    return float(round(best, 4)) if after < before else 1.0


def fit_trust(val_logits: np.ndarray, val_labels: np.ndarray | None, chosen_on: str, score: str = DEFAULT_SCORE,
              accept_rate: float = ACCEPT_RATE) -> Trust:
    """The record for these validation digits: the temperature fitted on them (1.0 without
    labels), and the threshold that accepts accept_rate of them."""
    temperature = fit_temperature(val_logits, val_labels) if val_labels is not None else 1.0
    scores = Trust(score, 0.0, temperature, accept_rate, chosen_on).scores(val_logits)
    threshold = threshold_at(scores, accept_rate)
    accepted = float((scores >= threshold).mean())
    return Trust(score, threshold, temperature, accepted, chosen_on)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(score of a random positive > that of a random negative), ties counting half."""
    ranks = average_ranks(np.concatenate([positives, negatives]))
    n_pos, n_neg = len(positives), len(negatives)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
