"""Learning-rate schedule as a pure function of the step, so it is easy to test and resume."""
from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int,
          final_lr_fraction: float = 0.0) -> float:
    """Linear warmup from ~0 to base_lr over warmup_steps, then cosine decay to
    base_lr * final_lr_fraction at total_steps (clamped after that)."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    if warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError("warmup_steps must be between 0 and total_steps")
    if step < warmup_steps:
        # (step + 1): the very first step already trains, instead of wasting a step at lr 0.
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    final_lr = base_lr * final_lr_fraction
    return final_lr + (base_lr - final_lr) * cosine
