"""The trust record of a trained model (serving.artifact.Trust): which score says "a digit",
the threshold on it and the temperature of the reported probabilities, all chosen on held-out
validation digits at the end of training, never on the test set."""
from __future__ import annotations

import numpy as np
import torch

from serving.artifact import Trust

from .data import normalize

# The share of validation digits the threshold accepts: the aim is >= 97% of MNIST
# test digits accepted, and a threshold at exactly that share of validation digits is the
# simplest choice that a reader can check.
ACCEPT_RATE = 0.97


@torch.inference_mode()
def model_logits(model: torch.nn.Module, images_uint8: torch.Tensor, batch_size: int = 1000,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """float64 logits [N, 10] of uint8 images [N, 28, 28], in eval mode and fp32."""
    model.eval()
    chunks = [model(normalize(images_uint8[start:start + batch_size].to(device))).double().cpu()
              for start in range(0, len(images_uint8), batch_size)]
    return torch.cat(chunks).numpy()


def threshold_at(scores: np.ndarray, accept_rate: float) -> float:
    """The score that at least accept_rate of these scores reach (so is_digit accepts them)."""
    refused = int(np.floor((1 - accept_rate) * len(scores)))
    return float(np.sort(scores)[refused])


def fit_trust(val_logits: np.ndarray, chosen_on: str, score: str = "max_softmax", temperature: float = 1.0,
              accept_rate: float = ACCEPT_RATE) -> Trust:
    """The record whose threshold accepts accept_rate of the validation digits."""
    scores = Trust(score, 0.0, temperature, accept_rate, chosen_on).scores(val_logits)
    threshold = threshold_at(scores, accept_rate)
    accepted = float((scores >= threshold).mean())
    return Trust(score, threshold, temperature, accepted, chosen_on)
