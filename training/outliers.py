"""Outlier exposure (Hendrycks et al., 2019): the model also sees generated non-digits and is
pushed towards uniform probabilities on them, so that a low top probability (or energy) says
"not a digit". The non-digits come from training/synthetic.py's "train" split and its
TRAINED_CATEGORIES only: the evaluation split, and the symbols and doodles categories, stay unseen."""
from __future__ import annotations

import math

import torch

from .synthetic import TRAINED_CATEGORIES, non_digits

OUTLIER_SHARE = 0.25   # outliers per batch, as a share of its digits: a quarter more compute per step


def outlier_pool(count: int) -> torch.Tensor:
    """uint8 [~count, 28, 28] generated non-digits, white on black like MNIST, already through
    the server's preprocessing (a few the preprocessing refuses as blank are left out)."""
    per_category = math.ceil(count / len(TRAINED_CATEGORIES))
    return torch.from_numpy(non_digits("train", per_category, TRAINED_CATEGORIES).as_uint8()[:count])


def outliers_per_batch(batch_per_rank: int) -> int:
    return max(1, round(batch_per_rank * OUTLIER_SHARE))


def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy from the uniform distribution to softmax(logits): logsumexp(logits) -
    mean(logits), least (log of the class count) at a flat answer."""
    return (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).mean()
