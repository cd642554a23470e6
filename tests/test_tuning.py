"""The kernel probe (training/tuning.py) on a machine whose load comes and goes: a fake clock and
fake steps stand in for the CPU, so the test shows the choice, not this machine's speed."""
from __future__ import annotations

import torch

from training import tuning
from training.config import TrainConfig
from training.model import ModelConfig
from training.tuning import Kernels, choose_kernels


class BusyMachine:
    """A clock, and steps that take their true time, times LOAD while a burst lasts (the first
    BURST_STEPS steps of the probe, whichever candidate runs them)."""
    LOAD = 4.0

    def __init__(self, true_ms: dict[str, float], burst_steps: int):
        self.now, self.steps_run, self.true_ms, self.burst_steps = 0.0, 0, true_ms, burst_steps

    def clock(self) -> float:
        return self.now

    def make_step(self, kernels: Kernels, *_):
        def step() -> None:
            load = self.LOAD if self.steps_run < self.burst_steps else 1.0
            self.now += self.true_ms[kernels.name] / 1000 * load
            self.steps_run += 1
        return step


def probe(monkeypatch, true_ms: dict[str, float], burst_steps: int) -> Kernels:
    machine = BusyMachine(true_ms, burst_steps)
    monkeypatch.setattr(tuning, "make_step", machine.make_step)
    monkeypatch.setattr(tuning.time, "perf_counter", machine.clock)
    config = TrainConfig(memory_format="auto", amp_dtype="auto")
    pixels, labels = torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    return choose_kernels(config, pixels, labels, ModelConfig(), run_steps=10_000)


def test_a_burst_of_load_on_the_first_candidate_does_not_decide_the_choice(monkeypatch):
    """channels_last+bf16 is truly fastest; a burst covers the probe's first steps, all of which
    the old probe (each candidate's steps back to back, the fastest of two) gave to it."""
    true_ms = {"channels_last+bf16": 76, "channels_last+fp32": 173, "contiguous+bf16": 105, "contiguous+fp32": 220}
    chosen = probe(monkeypatch, true_ms, burst_steps=3 + 2 * len(true_ms))
    assert chosen.name == "channels_last+bf16", chosen.probe
    assert chosen.probe["ms_per_step"]["channels_last+bf16"] == 76.0
    assert chosen.probe["margin"] == round(105 / 76, 2)   # the runner-up, contiguous+bf16
    assert chosen.probe["rounds"] == tuning.PROBE_ROUNDS


def test_the_median_ignores_a_burst_inside_the_timed_rounds(monkeypatch):
    """A burst over the first two timed rounds (after the warm-up) slows every candidate's first
    two steps alike: the medians, and so the choice and the margin, are the true ones."""
    true_ms = {"channels_last+bf16": 120, "channels_last+fp32": 173, "contiguous+bf16": 100, "contiguous+fp32": 220}
    warmup = tuning.PROBE_WARMUP_STEPS * len(true_ms)
    chosen = probe(monkeypatch, true_ms, burst_steps=warmup + 2 * len(true_ms))
    assert chosen.name == "contiguous+bf16" and chosen.probe["margin"] == 1.2, chosen.probe


def test_the_probe_line_says_how_it_measured_and_the_margin():
    kernels = Kernels("channels_last", "bf16", probe={"chosen": "channels_last+bf16", "probe_s": 4.2, "margin": 1.38,
                                                      "rounds": 5, "ms_per_step": {"channels_last+bf16": 76.0,
                                                                                   "contiguous+bf16": 105.0}})
    line = tuning.format_probe(kernels, batch_size=256)
    assert "median of 5 interleaved steps" in line and "runner-up 1.38x slower" in line, line
