"""Choose the step's kernels by measuring them on this machine, not by assumption.

The same CNN step differs by an order of magnitude between CPUs: on one 2-core AMD EPYC
channels-last bf16 was fastest, on a 2-core Xeon VM BatchNorm on channels-last tensors ran
30x slower than on contiguous bf16 ones. So at start each candidate (memory format x autocast
dtype, whichever the options leave open) runs a few real training steps of the real batch
shape on a throwaway copy of the model, and the fastest is kept.

A busy machine must not decide it: two `make train` runs on a loaded 2-core VM once chose
channels_last+bf16, then contiguous+fp32 (2.7x slower there), when each candidate ran its two steps
back to back and a burst of load fell on one of them. So the candidates take turns, one step each
per round over PROBE_ROUNDS rounds, each is judged by its median step, and the record keeps the
margin between the best and the runner-up.

torch.compile is not a candidate on the CPU: measured on a 2-core Xeon with torch 2.14, the
step took about 30 s to compile and then ran slower than eager bf16.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .model import ModelConfig, build_model

PROBE_WARMUP_STEPS = 1
PROBE_ROUNDS = 5   # timed steps per candidate, interleaved: one step each per round
# Measure only when the run is long enough to repay it: a run of fewer steps (a --quick smoke
# run, a test) takes the first candidate, channels_last+bf16, the fastest on the AMD EPYC.
MIN_RUN_STEPS_TO_MEASURE = 100
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}   # the spelling of TrainConfig.amp_dtype


@dataclass(frozen=True)
class Kernels:
    """The kernels a run uses, as measured (or as asked): the one shape of that choice. It is
    stored in the checkpoint under "kernels" and read back by --resume; TrainConfig keeps what
    the user asked ("auto") and is never rewritten with it."""
    memory_format: str                  # "channels_last" or "contiguous"
    amp_dtype: str | None               # autocast dtype, "bf16" or "fp16"; None: plain fp32
    probe: dict | None = field(default=None, compare=False)   # how it was chosen: choose_kernels

    @property
    def name(self) -> str:
        return f"{self.memory_format}+{self.amp_dtype or 'fp32'}"

    @property
    def amp(self) -> bool:
        return self.amp_dtype is not None

    @property
    def torch_amp_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES.get(self.amp_dtype)

    @property
    def torch_memory_format(self) -> torch.memory_format:
        return MEMORY_FORMATS[self.memory_format]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> Kernels:
        return cls(record["memory_format"], record["amp_dtype"], record.get("probe"))


def default_amp_dtype(config: TrainConfig, device: torch.device) -> str:
    """The autocast dtype when it is not measured: fp16 only where asked (CUDA) or where a
    card lacks bf16."""
    if config.amp_dtype == "fp16":
        return "fp16"
    if config.amp_dtype == "auto" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def candidates(config: TrainConfig, device: torch.device) -> list[Kernels]:
    formats = list(MEMORY_FORMATS) if config.memory_format == "auto" else [config.memory_format]
    amp_dtype = default_amp_dtype(config, device)
    if not config.amp:
        precisions = [None]
    elif config.amp_dtype == "auto" and device.type == "cpu":
        precisions = [amp_dtype, None]      # bf16 autocast vs plain fp32: measured, not assumed
    else:
        precisions = [amp_dtype]
    return [Kernels(fmt, precision) for fmt in formats for precision in precisions]


def make_step(kernels: Kernels, pixels: torch.Tensor, labels: torch.Tensor,
              model_config: ModelConfig) -> Callable[[], None]:
    """One real training step (forward, backward, AdamW) with these kernels, on its own throwaway
    model, as a function to call (and time) again and again."""
    device = pixels.device
    model = build_model(model_config).to(device, memory_format=kernels.torch_memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pixels = pixels.contiguous(memory_format=kernels.torch_memory_format)

    def step() -> None:
        with torch.autocast(device.type, dtype=kernels.torch_amp_dtype, enabled=kernels.amp):
            loss = F.cross_entropy(model(pixels)[:len(labels)], labels)   # rows past labels: outliers
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step


def time_interleaved(steps: dict[Kernels, Callable[[], None]], rounds: int = PROBE_ROUNDS,
                     warmup: int = PROBE_WARMUP_STEPS) -> dict[Kernels, list[float]]:
    """Seconds of each candidate's steps, taken in turns (one step each per round), so that load
    that comes and goes falls on every candidate alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds: dict[Kernels, list[float]] = {kernels: [] for kernels in steps}
    for _ in range(rounds):
        for kernels, step in steps.items():
            started = time.perf_counter()
            step()
            seconds[kernels].append(time.perf_counter() - started)
    return seconds


def choose_kernels(config: TrainConfig, pixels: torch.Tensor, labels: torch.Tensor,
                   model_config: ModelConfig, run_steps: int) -> Kernels:
    """The fastest candidate by median step, its probe record attached: {"ms_per_step": {name: ms},
    "chosen", "probe_s", "margin"} (margin: the runner-up's median over the best's, e.g. 1.4 = 40%
    slower). With a single candidate, or a run too short to repay the probe, nothing is timed."""
    options = candidates(config, pixels.device)
    if len(options) == 1 or run_steps < MIN_RUN_STEPS_TO_MEASURE:
        why = "as asked" if len(options) == 1 else f"not measured: {run_steps} steps are too few to repay it"
        return replace(options[0], probe={"chosen": options[0].name, "ms_per_step": {}, "probe_s": 0.0,
                                          "why": why})
    started = time.perf_counter()
    rng_state = torch.get_rng_state()   # the probe's throwaway models must not shift the run's seed
    steps = {kernels: make_step(kernels, pixels, labels, model_config) for kernels in options}
    medians = {kernels: statistics.median(seconds) for kernels, seconds in time_interleaved(steps).items()}
    torch.set_rng_state(rng_state)
    best, runner_up = sorted(medians, key=medians.get)[:2]
    return replace(best, probe={"chosen": best.name, "probe_s": round(time.perf_counter() - started, 2),
                                "ms_per_step": {kernels.name: round(seconds * 1000, 1)
                                                for kernels, seconds in medians.items()},
                                "margin": round(medians[runner_up] / medians[best], 2),
                                "rounds": PROBE_ROUNDS})


def format_probe(kernels: Kernels, batch_size: int) -> str:
    record = kernels.probe
    if not record["ms_per_step"]:
        return f"kernels: {record['chosen']} ({record['why']})"
    rates = ", ".join(f"{name} {batch_size / ms * 1000:.0f} img/s" + (" (chosen)" if name == record["chosen"] else "")
                      for name, ms in sorted(record["ms_per_step"].items(), key=lambda item: item[1]))
    margin = f"; the runner-up {record['margin']:.2f}x slower" if "margin" in record else ""
    return f"kernels measured in {record['probe_s']:.1f} s (median of {record.get('rounds', 2)} interleaved steps): " \
        f"{rates}{margin}"
