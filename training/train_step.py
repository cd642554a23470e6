"""One optimizer step, eager or replayed as a CUDA graph; running loss/accuracy sums stay on
the device so the loop never waits for the GPU between steps.

A CUDA graph records forward, backward, gradient clipping and the AdamW update once and
replays them with one launch: the small CNN's step is launch-bound on a GPU (hundreds of
kernels of microseconds each). It needs static shapes (drop_last batches), a capturable
optimizer (lr as a device tensor) and no host synchronisation inside the step, so it is used
for one process with bf16 or fp32; fp16 (GradScaler checks for inf on the host) and DDP
(PyTorch documents graph capture with DDP only under extra conditions) run eagerly instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ConfigError, TrainConfig
from .outliers import uniform_cross_entropy
from .tuning import Kernels


def graph_allowed(config: TrainConfig, device: torch.device, world_size: int, kernels: Kernels) -> tuple[bool, str]:
    """(can this run use a CUDA graph, and if not, why not)."""
    if device.type != "cuda":
        return False, "not on CUDA"
    if world_size > 1:
        return False, "DDP runs eagerly"
    if kernels.amp_dtype == "fp16":
        return False, "fp16 needs GradScaler's host-side inf check"
    if config.pipeline != "tensor":
        return False, "the textbook pipeline's batches live on the host"
    return True, ""


def use_cuda_graph(config: TrainConfig, device: torch.device, world_size: int, kernels: Kernels) -> bool:
    allowed, why = graph_allowed(config, device, world_size, kernels)
    if config.cuda_graph == "on" and not allowed:
        raise ConfigError(f"--cuda-graph on is not possible here: {why}")
    return allowed and config.cuda_graph != "off"


class EagerStep:
    """The plain step: any device, any precision, DDP or not."""

    def __init__(self, model, optimizer, scaler, config: TrainConfig, kernels: Kernels, device: torch.device):
        self.model, self.optimizer, self.scaler, self.config = model, optimizer, scaler, config
        self.kernels, self.device = kernels, device
        self.reset_sums()

    def reset_sums(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.float64, device=self.device)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward_backward_update(self, pixels, labels) -> None:
        with torch.autocast(self.device.type, dtype=self.kernels.torch_amp_dtype, enabled=self.kernels.amp):
            every_logit = self.model(pixels)
            # Rows past the labels are generated non-digits (outlier exposure, training/outliers.py):
            # static slices, so a CUDA graph can still record the step.
            logits = every_logit[:len(labels)]
            loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
            if len(every_logit) > len(labels):
                loss = loss + self.config.outlier_loss_weight * uniform_cross_entropy(every_logit[len(labels):].float())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip_norm, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.loss_sum += loss.detach().double() * len(labels)
        self.correct += (logits.detach().argmax(1) == labels).sum()

    def __call__(self, pixels, labels, lr: float) -> None:
        self.set_lr(lr)
        self.forward_backward_update(pixels, labels)


class GraphedStep(EagerStep):
    """The same step captured once as a CUDA graph, then replayed with new inputs copied into
    its static input tensors. Capture needs a few warm-up steps, which would change the
    weights: the model and optimizer state are copied before and restored in place after."""

    WARMUP_STEPS = 3

    def __init__(self, model, optimizer, scaler, config, kernels, device, pixels, labels):
        super().__init__(model, optimizer, scaler, config, kernels, device)
        self.lr = torch.tensor(0.0, device=device)
        for group in optimizer.param_groups:
            group["lr"] = self.lr          # capturable AdamW reads the lr tensor at replay
        self.static_pixels, self.static_labels = pixels.clone(), labels.clone()
        self.graph = self.capture()

    def capture(self) -> torch.cuda.CUDAGraph:
        saved = self.snapshot()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):   # warm-up on a side stream, as torch.cuda.graphs documents
                for _ in range(self.WARMUP_STEPS):
                    self.forward_backward_update(self.static_pixels, self.static_labels)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                self.forward_backward_update(self.static_pixels, self.static_labels)
        finally:
            self.restore(saved)          # captured or not, the run continues from untouched weights
        return graph

    def snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tensors = list(self.model.state_dict().values())
        for state in self.optimizer.state.values():
            tensors += [value for value in state.values() if torch.is_tensor(value)]
        return [(tensor, tensor.detach().clone()) for tensor in tensors]

    def restore(self, saved) -> None:
        restored = set()
        with torch.no_grad():
            for tensor, copy in saved:
                tensor.copy_(copy)       # in place: the graph holds these very addresses
                restored.add(tensor.data_ptr())
            # AdamW creates its moments (and step count) at the first warm-up step: a fresh
            # optimizer's state is all zeros, so that is what they go back to.
            for state in self.optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value) and value.data_ptr() not in restored:
                        value.zero_()
        self.reset_sums_in_place()

    def reset_sums_in_place(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def reset_sums(self) -> None:
        if hasattr(self, "graph"):
            self.reset_sums_in_place()   # the graph accumulates into these tensors
        else:
            super().reset_sums()

    def __call__(self, pixels, labels, lr: float) -> None:
        self.lr.fill_(lr)
        self.static_pixels.copy_(pixels)
        self.static_labels.copy_(labels)
        self.graph.replay()
