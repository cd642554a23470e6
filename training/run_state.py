"""Building a run: the model, the kernels measured for it, optimizer, scaler, EMA and the
step function, fresh or restored from a checkpoint; and the RunState the loop carries."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from serving.handler.artifact import Trust

from . import dist
from .checkpoint import unwrap
from .resume import Resumed
from .config import ConfigError, TrainConfig
from .ema import WeightEMA
from .model import ModelConfig, build_model
from .train_step import EagerStep, GraphedStep, use_cuda_graph
from .tuning import Kernels, choose_kernels, format_probe


@dataclass
class RunState:
    """Everything a run carries from one epoch to the next (and into the checkpoint)."""
    model_config: ModelConfig
    model: torch.nn.Module                 # possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None
    kernels: Kernels                       # measured at the run's start, or read back by --resume
    cuda_graph: bool
    total_steps: int
    warmup_steps: int
    step: int = 0
    start_epoch: int = 0
    kept_state: dict | None = None          # the weights the checkpoint ships
    kept_report: dict | None = None         # selected_epoch (and selected_val_acc) of those weights
    best_val_acc: float = -1.0
    trust: Trust | None = None              # fitted when the run finishes (training/trust.py)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights being trained, or their running average when EMA is on."""
        return self.ema.module if self.ema is not None else unwrap(self.model)


def log(context: dist.DistContext, message: str) -> None:
    if context.is_main:
        print(message, flush=True)


def probe_batch(batches, context: dist.DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """One real batch of the real shape for the kernel probe (taken before the run's epochs
    re-seed the iterator, so the run itself is unchanged)."""
    batches.set_epoch(0)
    pixels, labels = next(iter(batches))
    return pixels.to(context.device), labels.to(context.device)


def agree_on_kernels(kernels: Kernels, context: dist.DistContext) -> Kernels:
    """Every rank must run the same kernels: rank 0's measurement decides."""
    if not context.enabled:
        return kernels
    shared = [kernels]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]


def measure_kernels(config: TrainConfig, context: dist.DistContext, batches, model_config: ModelConfig,
                    total_steps: int) -> Kernels:
    pixels, labels = probe_batch(batches, context)
    kernels = agree_on_kernels(choose_kernels(config, pixels, labels, model_config, total_steps), context)
    log(context, format_probe(kernels, len(labels)))
    return kernels


def setup_run(config: TrainConfig, context: dist.DistContext, batches, resumed: Resumed | None) -> RunState:
    """The run's state, fresh, or continued from `resumed` (then `config` is resumed.config)."""
    # The one ModelConfig of the run: a resumed run rebuilds the network its checkpoint describes.
    model_config = ModelConfig(**resumed.checkpoint["model_config"]) if resumed is not None else ModelConfig()
    model = build_model(model_config).to(context.device)
    steps_per_epoch = len(batches)
    if steps_per_epoch == 0:
        raise ConfigError(f"batch size {config.batch_size} is larger than the training set")
    total_steps = config.epochs_to_run * steps_per_epoch
    if resumed is not None:   # the kernels measured at the run's start: a resumed run continues on them
        kernels = resumed.kernels
        log(context, f"kernels: {kernels.name} (from the checkpoint)")
    else:
        kernels = measure_kernels(config, context, batches, model_config, total_steps)
    model = model.to(memory_format=kernels.torch_memory_format)
    graphed = use_cuda_graph(config, context.device, context.world_size, kernels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  capturable=graphed)
    scaler = torch.amp.GradScaler(context.device.type, enabled=kernels.amp_dtype == "fp16")
    ema = WeightEMA(model, config.ema_decay) if config.ema_decay else None
    state = RunState(model_config, model, optimizer, scaler, ema, kernels, graphed, total_steps,
                     warmup_steps=min(total_steps, round(config.warmup_epochs * steps_per_epoch)))
    if resumed is not None:
        restore_run_state(state, resumed.checkpoint)
    if context.enabled:
        state.model = DistributedDataParallel(model)
    return state


def restore_run_state(state: RunState, checkpoint: dict) -> None:
    state.model.load_state_dict(checkpoint["last_model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scaler.load_state_dict(checkpoint["scaler"])
    if state.ema is not None:   # a checkpoint from a run without EMA starts the average at its weights
        state.ema.module.load_state_dict(checkpoint.get("ema_model") or checkpoint["last_model"])
    metrics = checkpoint["metrics"]
    state.start_epoch, state.step = metrics["epoch"], checkpoint["scheduler"]["step"]
    state.kept_state = checkpoint["model"]
    state.kept_report = {key: metrics[key] for key in ("selected_epoch", "selected_val_acc") if key in metrics}
    state.best_val_acc = metrics.get("selected_val_acc", -1.0)


def make_step(config: TrainConfig, state: RunState, context: dist.DistContext, batches):
    kernels = state.kernels
    if state.cuda_graph:
        pixels, labels = probe_batch(batches, context)   # the shapes the graph is captured for
        try:
            return GraphedStep(state.model, state.optimizer, state.scaler, config, kernels,
                               context.device, pixels.contiguous(memory_format=kernels.torch_memory_format), labels)
        except RuntimeError as error:
            if config.cuda_graph == "on":
                raise ConfigError(f"--cuda-graph on: capture failed: {str(error).splitlines()[0]}") from None
            log(context, f"CUDA graph capture failed ({str(error).splitlines()[0]}); running eagerly")
            state.cuda_graph = False
    return EagerStep(state.model, state.optimizer, state.scaler, config, kernels, context.device)
