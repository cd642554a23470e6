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
        # Paired once: the tensors stay the same objects for the whole run (weights are updated,
        # and restored from a checkpoint, in place), and update() runs after every step.
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self.averaged = [ema for ema, _ in pairs if ema.is_floating_point()]
        self.current = [tensor for ema, tensor in pairs if ema.is_floating_point()]
        self.counters = [(ema, tensor) for ema, tensor in pairs if not ema.is_floating_point()]

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the weights of the model it was made from."""
        torch._foreach_lerp_(self.averaged, self.current, 1.0 - self.decay_at(step))
        for ema_counter, counter in self.counters:   # BatchNorm's num_batches_tracked
            ema_counter.copy_(counter)
