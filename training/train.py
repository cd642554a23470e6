"""Training: one code path for CPU/CUDA, single process or DDP, fp32/bf16/fp16.

    python -m training --data-dir ../shared/mnist
    torchrun --standalone --nproc-per-node=2 -m training --quick --data-dir ../shared/mnist

prints the measured kernel choice, then one line per epoch, e.g.
    epoch  1/10  loss 0.3954  train 89.31%  test 98.64%  lr 3.00e-03   2431 img/s   25.9 s
then the trust record fitted on the held-out validation digits (training/trust.py), e.g.
    trust: energy >= 9.56 accepts 97.00% of val: 5000 held-out training digits; temperature 0.7711
and writes artifacts/mnist_cnn.pt (the final EMA-averaged weights by default), metrics.jsonl
and test_report.json beside it; a --quick run writes artifacts/quick/ instead. A fresh run
refuses to replace a finished run's checkpoint unless --force.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from serving.handler.artifact import METRICS_NAME, TEST_REPORT_NAME

from . import dist
from .checkpoint import build_checkpoint, cpu_state_dict, rank_digest_path, unwrap, weights_digest
from .durable import save_atomic, sigterm_raises, sweep_stale_temps, write_text_atomic
from .resume import refuse_to_replace_finished_run, resume_after_restart, resume_state
from .config import ConfigError, TrainConfig, validate
from .data import epoch_seed, load_datasets, normalize
from .model import NUM_CLASSES, build_model
from .progress import EpochProgress, TensorBoardLog
from .report import write_test_report
from .run_state import RunState, log, make_step, setup_run
from .schedule import lr_at
from .trust import fit_trust, model_logits


@dataclass
class TrainResult:
    checkpoint_path: Path | None
    metrics: dict
    model: torch.nn.Module


@dataclass(frozen=True)
class EpochTotals:
    """One epoch of training steps, summed over all ranks."""
    loss_sum: float
    correct: float
    images: int
    lr: float                 # the learning rate of the epoch's last step
    train_seconds: float      # the training steps alone, without evaluation


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(config: TrainConfig, context: dist.DistContext) -> int:
    # Never oversubscribe: two ranks on two cores get one thread each.
    threads = config.threads_per_rank or max(1, cpu_count() // context.local_world_size)
    torch.set_num_threads(threads)
    return threads


def resolve_device(config: TrainConfig) -> str:
    if config.device != "auto":
        return config.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_local_ranks_fit_gpus(device_name: str) -> None:
    """torchrun starting more local ranks than this machine has GPUs would send a rank to a
    GPU that does not exist ("invalid device ordinal"): say how to fix it instead."""
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()
    if device_name == "cuda" and local_world_size > gpus:
        raise ConfigError(f"{local_world_size} processes on this machine but {gpus} GPU(s): use "
                          f"--nproc-per-node={gpus} (one process per GPU), or --device cpu to train on the CPU")


def train(config: TrainConfig) -> TrainResult:
    validate(config)
    device_name = resolve_device(config)
    if device_name == "cpu" and config.amp and config.amp_dtype == "fp16":
        raise ConfigError("fp16 autocast needs CUDA; use --amp-dtype bf16 (or auto) on the CPU")
    check_local_ranks_fit_gpus(device_name)
    config = resume_after_restart(config)
    refuse_to_replace_finished_run(config)   # every process checks the same file, so all stop alike
    with sigterm_raises():   # SIGTERM mid-save still removes the save's temp file
        context = dist.setup(device_name, config.peer_timeout_s)
        try:
            return run_training(config, context)
        except Exception as error:
            if context.enabled and dist.is_collective_failure(error):
                raise dist.peer_lost(error, context, config.peer_timeout_s) from None
            raise
        finally:
            dist.teardown(context)


@torch.inference_mode()
def evaluate(model, images, labels, config: TrainConfig, context: dist.DistContext,
             memory_format=torch.contiguous_format) -> dict:
    """fp32 accuracy and confusion matrix on this rank's shard, summed over all ranks."""
    model.eval()
    shard = slice(context.rank, None, context.world_size)
    images, labels = images[shard].to(context.device), labels[shard].to(context.device)
    confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.float64, device=context.device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=context.device)
    for start in range(0, len(labels), config.eval_batch_size):
        batch = normalize(images[start:start + config.eval_batch_size]).contiguous(memory_format=memory_format)
        target = labels[start:start + config.eval_batch_size]
        logits = model(batch).float()
        loss_sum += F.cross_entropy(logits, target, reduction="sum")
        confusion += torch.bincount(target * NUM_CLASSES + logits.argmax(1), minlength=NUM_CLASSES ** 2).double()
    totals = dist.all_reduce_sum(torch.cat([confusion, loss_sum]), context).cpu()
    confusion = totals[:NUM_CLASSES ** 2].reshape(NUM_CLASSES, NUM_CLASSES).long()
    count = int(confusion.sum())
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist()
    return {"acc": float(confusion.diag().sum()) / count, "loss": float(totals[100]) / count,
            "per_class_acc": per_class, "confusion_matrix": confusion.tolist()}


def train_one_epoch(step_fn, batches, state: RunState, context: dist.DistContext, lr_for,
                    progress: EpochProgress) -> EpochTotals:
    """One pass over this rank's batches; the totals are summed over all ranks."""
    started = time.perf_counter()
    state.model.train()
    step_fn.reset_sums()
    seen, lr = 0, lr_for(state.step)
    memory_format = state.kernels.torch_memory_format
    for pixels, labels in batches:
        pixels = pixels.to(context.device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(context.device, non_blocking=True)
        lr = lr_for(state.step)
        step_fn(pixels, labels, lr)
        if state.ema is not None:
            state.ema.update(state.step)
        seen += len(labels)
        state.step += 1
        progress.advance(len(labels))
    totals = torch.stack([step_fn.loss_sum, step_fn.correct,
                          torch.tensor(float(seen), dtype=torch.float64, device=context.device)])
    loss_sum, correct, images = dist.all_reduce_sum(totals, context).tolist()
    return EpochTotals(loss_sum, correct, int(images), lr, time.perf_counter() - started)


def select_weights(config: TrainConfig, state: RunState, epoch: int, evaluations: dict) -> None:
    """Keep the final weights (their EMA average while EMA is on), or the epoch with the best
    held-out validation accuracy: never choose on the test set, whose accuracy is then reported
    for the kept weights."""
    if config.select_by == "final" or evaluations["val"]["acc"] > state.best_val_acc:
        state.kept_state = cpu_state_dict(state.eval_model)
        state.kept_report = {"selected_epoch": epoch + 1}
        if config.select_by == "val_acc":
            state.best_val_acc = evaluations["val"]["acc"]
            state.kept_report["selected_val_acc"] = state.best_val_acc


def epoch_metrics(config: TrainConfig, state: RunState, epoch: int, totals: EpochTotals, evaluations: dict,
                  context: dist.DistContext, started: float) -> dict:
    metrics = {"epoch": epoch + 1, "epochs": config.epochs_to_run, "train_loss": totals.loss_sum / totals.images,
               "train_acc": totals.correct / totals.images, "lr": totals.lr, "train_images": totals.images,
               "images_per_s": totals.images / totals.train_seconds,
               "epoch_s": time.perf_counter() - started, "world_size": context.world_size,
               "hosts": dist.hosts(context), "selected_by": config.select_by, **state.kept_report}
    for name, evaluation in evaluations.items():
        metrics[f"{name}_acc"], metrics[f"{name}_loss"] = evaluation["acc"], evaluation["loss"]
    return metrics


def format_epoch(metrics: dict, evaluations: dict) -> str:
    scores = "  ".join(f"{name} {evaluation['acc']:6.2%}" for name, evaluation in evaluations.items())
    return (f"epoch {metrics['epoch']:>2}/{metrics['epochs']}  loss {metrics['train_loss']:.4f}  "
            f"train {metrics['train_acc']:6.2%}  {scores}  lr {metrics['lr']:.2e}  "
            f"{metrics['images_per_s']:6.0f} img/s  {metrics['epoch_s']:6.1f} s")


def check_ranks_start_alike(resumed, context: dist.DistContext) -> None:
    """Every rank reads the checkpoint at its own machine's --out: a machine without rank 0's
    copy would start afresh while the others resume, and their steps would never match up."""
    starts = dist.all_gather_objects(resumed.checkpoint["metrics"]["epoch"] if resumed is not None else 0, context)
    if len(set(starts)) > 1:
        ranks = ", ".join(f"rank {rank} after epoch {epoch}" for rank, epoch in enumerate(starts))
        raise ConfigError(f"the ranks would start from different epochs ({ranks}): each machine resumes from "
                          f"the checkpoint at its own --out; give every machine rank 0's (shared storage, or a copy)")


def run_training(asked: TrainConfig, context: dist.DistContext) -> TrainResult:
    resumed = resume_state(asked) if asked.resume else None
    check_ranks_start_alike(resumed, context)
    # A resumed run continues the original run's recipe, as its checkpoint saved it.
    config = resumed.config if resumed is not None else asked
    if config.batch_size % context.world_size:
        raise ConfigError(f"batch size {config.batch_size} does not split over {context.world_size} ranks")
    threads = set_threads(config, context)
    torch.manual_seed(config.seed)
    data = load_datasets(config, context)
    epochs = config.epochs_to_run
    state = setup_run(config, context, data.batches, resumed)
    lr_for = partial(lr_at, base_lr=config.lr, total_steps=state.total_steps, warmup_steps=state.warmup_steps)
    step_fn = make_step(config, state, context, data.batches)

    out_path = config.out_path
    if context.is_main:   # what a SIGKILLed run (which no handler sees) left half-written
        sweep_stale_temps([out_path, out_path.parent / METRICS_NAME, out_path.parent / TEST_REPORT_NAME])
    # Per-epoch rows travel in the checkpoint, so a resumed run rewrites metrics.jsonl exactly.
    history = list(resumed.checkpoint.get("history", [])) if resumed is not None else []
    metrics = resumed.checkpoint["metrics"] if resumed is not None else {}
    if resumed is not None:
        log(context, f"resuming {out_path} after epoch {state.start_epoch}/{epochs}")
    log(context, f"training on {context.device} x{context.world_size} rank(s), {threads} thread(s) each, "
                 f"kernels {state.kernels.name}, {'CUDA graph' if state.cuda_graph else 'eager'}, "
                 f"{len(data.batches)} steps/epoch of {config.batch_size} images, pipeline={config.pipeline}, "
                 f"weights kept: {config.select_by}")
    # No peeking at test when choosing by val; val is watched only when it chooses (it costs an evaluation).
    watched = "val" if config.select_by == "val_acc" else "test"
    monitored = {watched: data.eval_sets[watched]}
    tensorboard = TensorBoardLog(config.tensorboard) if context.is_main and config.tensorboard else None
    evaluations: dict = {}
    for epoch in range(state.start_epoch, epochs):
        started = time.perf_counter()
        data.batches.set_epoch(epoch)
        torch.manual_seed(epoch_seed(config.seed, epoch, context.rank))  # dropout masks
        with EpochProgress(len(data.batches) * config.batch_size // context.world_size, epoch, epochs,
                           enabled=context.is_main and sys.stdout.isatty()) as progress:
            totals = train_one_epoch(step_fn, data.batches, state, context, lr_for, progress)
        dist.broadcast_buffers(unwrap(state.model), context)
        if state.ema is not None:   # its average of the BatchNorm statistics followed each rank's own batches
            dist.broadcast_buffers(state.ema.module, context)
        evaluations = {name: evaluate(state.eval_model, *sets, config, context, state.kernels.torch_memory_format)
                       for name, sets in monitored.items()}
        select_weights(config, state, epoch, evaluations)
        metrics = epoch_metrics(config, state, epoch, totals, evaluations, context, started)
        log(context, format_epoch(metrics, evaluations))
        history.append(dict(metrics))
        if tensorboard:
            tensorboard.write(metrics)
        if context.is_main:
            save_atomic(build_checkpoint(state, config, metrics, history), out_path)
            write_text_atomic(out_path.parent / METRICS_NAME, "".join(json.dumps(row) + "\n" for row in history))
        dist.barrier(context)

    # Keeping the final (EMA-averaged) weights, the last epoch already measured them on the test set.
    test = evaluations.get("test") if config.select_by == "final" else None
    metrics = finish(config, state, context, data, metrics, history, out_path, test)
    if tensorboard:
        tensorboard.close()
    return TrainResult(out_path if context.is_main else None, metrics, unwrap(state.model))


def finish(config, state: RunState, context, data, metrics: dict, history: list, out_path: Path,
           test: dict | None) -> dict:
    """Test accuracy of the kept weights (measured here unless `test` already holds it) and
    their trust record (fitted on the held-out validation digits), into the checkpoint and
    test_report.json."""
    kept = build_model(state.model_config).to(context.device, memory_format=state.kernels.torch_memory_format)
    kept.load_state_dict(state.kept_state)
    if test is None:
        test = evaluate(kept, *data.eval_sets["test"], config, context, state.kernels.torch_memory_format)
    metrics = {**metrics, "test_acc": test["acc"], "test_loss": test["loss"],
               "per_class_acc": test["per_class_acc"], "confusion_matrix": test["confusion_matrix"]}
    if config.select_by == "val_acc":
        metrics["val_acc"] = state.best_val_acc   # of the kept weights (the rows hold each epoch's)
    if context.is_main:
        state.trust = fit_kept_trust(kept, *data.eval_sets["val"], context)
        log(context, f"trust: {state.trust.score} >= {state.trust.threshold:.4g} accepts "
                     f"{state.trust.accept_rate:.2%} of {state.trust.chosen_on}; temperature "
                     f"{state.trust.temperature:g}")
        save_atomic(build_checkpoint(state, config, metrics, history), out_path)
        write_test_report(out_path.parent / TEST_REPORT_NAME, metrics)
    else:   # the digest of this rank's copy, to compare with rank 0's checkpoint (e.g. on another machine)
        peer = context.peers[context.rank]
        write_text_atomic(rank_digest_path(out_path, context.rank), json.dumps(
            {"rank": context.rank, "hostname": peer.hostname, "address": peer.address,
             "weights_sha256": weights_digest(state.kept_state)}) + "\n")
    dist.barrier(context)   # no rank tears the process group down while rank 0 still writes
    return metrics


def fit_kept_trust(kept: torch.nn.Module, val_images: torch.Tensor, val_labels: torch.Tensor,
                   context: dist.DistContext):
    """The kept weights' trust record, chosen on the held-out digits (never the test set)."""
    logits = model_logits(kept, val_images, device=context.device)
    return fit_trust(logits, val_labels.numpy(), chosen_on=f"val: {len(val_images)} held-out training digits")
