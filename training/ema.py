"""An exponential moving average of the weights (and BatchNorm statistics), evaluated and kept
instead of the raw weights when --ema-decay is on."""
from __future__ import annotations

import copy

import torch


class WeightEMA:
    """ema = decay * ema + (1 - decay) * weights after every step. The decay warms up as
    (1 + step) / (10 + step), capped at `decay`, so early in a run (or in a short one) the
    average follows the weights instead of remembering the random initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        averaged, current = [], []
        for ema_tensor, tensor in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_tensor.is_floating_point():
                averaged.append(ema_tensor)
                current.append(tensor)
            else:
                ema_tensor.copy_(tensor)      # counters (BatchNorm's num_batches_tracked)
        torch._foreach_lerp_(averaged, current, weight)
