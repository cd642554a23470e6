"""Training: one code path for CPU/CUDA, single process or DDP, fp32/bf16/fp16.

    python -m training --data-dir ../shared/mnist
    torchrun --standalone --nproc-per-node=2 -m training --quick --data-dir ../shared/mnist

prints one line per epoch, e.g.
    epoch  1/10  loss 0.3954  train 89.31%  test 98.64%  lr 3.00e-03   2431 img/s   25.9 s
and writes artifacts/mnist_cnn.pt, metrics.jsonl and test_report.json beside it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from . import dist
from .checkpoint import FORMAT_VERSION, CheckpointError, cpu_state_dict, load_checkpoint, save_atomic, unwrap
from .data import (MNIST_MEAN, MNIST_STD, augment, load_mnist, normalize, open_mnist_dataset,
                   preprocess_metadata)
from .model import ModelConfig, build_model
from .schedule import lr_at

QUICK_TRAIN_IMAGES = 1024
QUICK_TEST_IMAGES = 512
QUICK_MAX_EPOCHS = 2


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256            # global: split evenly over the ranks
    lr: float = 3e-3
    weight_decay: float = 0.05       # AdamW's decoupled decay
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0     # smoothing caps answers near 0.9 confidence; off, probabilities stay readable
    grad_clip_norm: float = 5.0      # 0 disables clipping
    amp: bool = True
    amp_dtype: str = "auto"          # auto: bf16 on CPU and on CUDA cards that have it, else fp16
    max_rotation_deg: float = 10.0
    max_shift_px: float = 2.0
    seed: int = 0
    data_dir: str | None = None
    out: str = "artifacts/mnist_cnn.pt"
    pipeline: str = "tensor"         # tensor: in-memory uint8 + batch augmentation; torchvision: textbook DataLoader
    num_workers: int = 2             # DataLoader workers, torchvision pipeline only
    device: str = "auto"
    threads_per_rank: int = 0        # 0: the machine's cores divided by the ranks on this node
    eval_batch_size: int = 1000
    train_subset: int = 0            # train on the first N images only; 0: all
    quick: bool = False
    resume: bool = False


class ConfigError(ValueError):
    """An option value that makes no sense."""


@dataclass
class TrainResult:
    checkpoint_path: Path | None
    metrics: dict
    model: torch.nn.Module


def validate(config: TrainConfig) -> None:
    checks = [
        (config.epochs >= 1, "epochs must be >= 1"),
        (config.batch_size >= 1, "batch size must be >= 1"),
        (config.lr > 0, "learning rate must be > 0"),
        (config.weight_decay >= 0, "weight decay must be >= 0"),
        (config.warmup_epochs >= 0, "warmup epochs must be >= 0"),
        (config.warmup_epochs <= config.epochs, "warmup epochs cannot exceed epochs"),
        (0 <= config.label_smoothing < 1, "label smoothing must be in [0, 1)"),
        (config.grad_clip_norm >= 0, "grad clip norm must be >= 0"),
        (config.amp_dtype in ("auto", "bf16", "fp16"), "amp dtype must be auto, bf16 or fp16"),
        (config.pipeline in ("tensor", "torchvision"), "pipeline must be tensor or torchvision"),
        (config.num_workers >= 0, "num workers must be >= 0"),
        (config.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
        (config.threads_per_rank >= 0, "threads per rank must be >= 0"),
        (config.eval_batch_size >= 1, "eval batch size must be >= 1"),
        (config.train_subset >= 0, "train subset must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")


def resolve_amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.amp_dtype == "fp16":
        if device.type != "cuda":
            raise ConfigError("fp16 autocast needs CUDA; use --amp-dtype bf16 on the CPU")
        return torch.float16
    if config.amp_dtype == "auto" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(config: TrainConfig, context: dist.DistContext) -> int:
    # Never oversubscribe: two ranks on two cores get one thread each.
    threads = config.threads_per_rank or max(1, cpu_count() // context.local_world_size)
    torch.set_num_threads(threads)
    return threads


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Randomness (augmentation, dropout) seeded per epoch and rank, so a resumed run
    continues exactly as the uninterrupted one would have."""
    return seed * 1_000_003 + epoch * 1009 + rank


class TensorBatches:
    """The training set as one uint8 tensor; each batch is indexed, augmented and
    normalized as a whole: no per-image Python work, no loader processes."""

    def __init__(self, images, labels, config: TrainConfig, context: dist.DistContext):
        self.images, self.labels, self.config, self.context = images, labels, config, context
        self.batch_per_rank = config.batch_size // context.world_size
        # Only used for its index arithmetic: the same shuffling and sharding as any DDP loader.
        self.sampler = DistributedSampler(range(len(labels)), num_replicas=context.world_size,
                                          rank=context.rank, shuffle=True, seed=config.seed, drop_last=True)
        self.generator = torch.Generator()

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_per_rank

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(self.config.seed, epoch, self.context.rank))

    def __iter__(self):
        indices = torch.tensor(list(self.sampler))
        for step in range(len(self)):
            batch = indices[step * self.batch_per_rank:(step + 1) * self.batch_per_rank]
            pixels = self.images[batch].unsqueeze(1).float().div_(255.0)
            pixels = augment(pixels, max_rotation_deg=self.config.max_rotation_deg,
                             max_shift_px=self.config.max_shift_px, generator=self.generator)
            yield pixels.sub_(MNIST_MEAN).div_(MNIST_STD), self.labels[batch]


def textbook_loader(config: TrainConfig, context: dist.DistContext, subset: int | None):
    """The usual tutorial pipeline: per-image PIL transforms in DataLoader workers.
    Kept as a selectable baseline (--pipeline torchvision) for benchmarks."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.RandomAffine(config.max_rotation_deg, translate=(config.max_shift_px / 28,) * 2),
        transforms.ToTensor(),
        transforms.Normalize((MNIST_MEAN,), (MNIST_STD,)),
    ])
    dataset = open_mnist_dataset(config.data_dir, train=True, transform=transform)
    if subset is not None:
        dataset = torch.utils.data.Subset(dataset, range(subset))
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank,
                                 shuffle=True, seed=config.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size // context.world_size, sampler=sampler,
        num_workers=config.num_workers, drop_last=True, persistent_workers=config.num_workers > 0)
    loader.set_epoch = sampler.set_epoch
    return loader


@torch.inference_mode()
def evaluate(model, images, labels, config: TrainConfig, context: dist.DistContext) -> dict:
    """fp32 accuracy and confusion matrix on this rank's shard, summed over all ranks."""
    model.eval()
    shard = slice(context.rank, None, context.world_size)
    images, labels = images[shard], labels[shard]
    confusion = torch.zeros(10 * 10, dtype=torch.float64)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    for start in range(0, len(labels), config.eval_batch_size):
        batch = normalize(images[start:start + config.eval_batch_size]).to(
            context.device, memory_format=torch.channels_last)
        target = labels[start:start + config.eval_batch_size].to(context.device)
        logits = model(batch).float()
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        confusion += torch.bincount(target.cpu() * 10 + logits.argmax(1).cpu(), minlength=100).double()
    totals = dist.all_reduce_sum(torch.cat([confusion, loss_sum]).to(context.device), context).cpu()
    confusion = totals[:100].reshape(10, 10).long()
    count = int(confusion.sum())
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist()
    return {"test_acc": float(confusion.diag().sum()) / count, "test_loss": float(totals[100]) / count,
            "per_class_acc": per_class, "confusion_matrix": confusion.tolist()}


def build_checkpoint(model, best_state, optimizer, scaler, config, model_config, metrics, history, step,
                     total_steps, warmup_steps) -> dict:
    train_config = asdict(replace(config, resume=False))
    return {
        "format_version": FORMAT_VERSION,
        "model": best_state,
        "model_config": model_config.to_dict(),
        "train_config": train_config,
        "preprocess": preprocess_metadata(),
        "metrics": metrics,
        "history": history,
        "last_model": cpu_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "scheduler": {"name": "warmup_cosine", "step": step, "total_steps": total_steps,
                      "warmup_steps": warmup_steps, "base_lr": config.lr},
    }


def resume_state(config: TrainConfig) -> tuple[TrainConfig, dict]:
    """The checkpoint to continue from, and the run's original config (paths and
    loader settings from the command line win: the files may have moved)."""
    try:
        checkpoint = load_checkpoint(config.out)
    except CheckpointError as error:
        raise CheckpointError(f"cannot resume: {error}") from None
    if "last_model" not in checkpoint or "optimizer" not in checkpoint:
        raise CheckpointError(f"cannot resume: {config.out} has no training state")
    saved = {key: value for key, value in checkpoint["train_config"].items() if key in TrainConfig.__annotations__}
    for key in ("data_dir", "out", "num_workers", "device", "threads_per_rank", "resume"):
        saved[key] = getattr(config, key)
    return TrainConfig(**saved), checkpoint


def train(config: TrainConfig) -> TrainResult:
    validate(config)
    device_name = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    context = dist.setup(device_name)
    try:
        return run_training(config, context)
    finally:
        dist.teardown(context)


def log(context: dist.DistContext, message: str) -> None:
    if context.is_main:
        print(message, flush=True)


def load_datasets(config: TrainConfig, context: dist.DistContext):
    """(training batches, test images, test labels), cut down for --quick / --train-subset."""
    train_subset = config.train_subset or (QUICK_TRAIN_IMAGES if config.quick else None)
    test_images, test_labels = load_mnist(config.data_dir, train=False)
    if config.pipeline == "tensor":
        train_images, train_labels = load_mnist(config.data_dir, train=True)
        batches = TensorBatches(train_images[:train_subset], train_labels[:train_subset], config, context)
    else:
        batches = textbook_loader(config, context, train_subset)
    if config.quick:
        test_images, test_labels = test_images[:QUICK_TEST_IMAGES], test_labels[:QUICK_TEST_IMAGES]
    return batches, test_images, test_labels


def train_one_epoch(model, batches, optimizer, scaler, config: TrainConfig, context: dist.DistContext,
                    amp_dtype: torch.dtype, step: int, lr_for) -> tuple[list[float], int, float]:
    """One pass over this rank's batches. Returns ([loss sum, correct, images] summed over all
    ranks, the next global step, the last learning rate)."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=context.device)
    correct = torch.zeros((), dtype=torch.float64, device=context.device)
    seen, lr = 0, lr_for(step)
    for pixels, labels in batches:
        pixels = pixels.to(context.device, memory_format=torch.channels_last, non_blocking=True)
        labels = labels.to(context.device, non_blocking=True)
        lr = lr_for(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(context.device.type, dtype=amp_dtype, enabled=config.amp):
            logits = model(pixels)
            loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip_norm:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().double() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        step += 1
    totals = torch.stack([loss_sum, correct, torch.tensor(float(seen), dtype=torch.float64, device=context.device)])
    return dist.all_reduce_sum(totals, context).tolist(), step, lr


def run_training(config: TrainConfig, context: dist.DistContext) -> TrainResult:
    checkpoint = None
    if config.resume:
        config, checkpoint = resume_state(config)
    if config.batch_size % context.world_size:
        raise ConfigError(f"batch size {config.batch_size} does not split over {context.world_size} ranks")
    threads = set_threads(config, context)
    amp_dtype = resolve_amp_dtype(config, context.device)
    torch.manual_seed(config.seed)

    batches, test_images, test_labels = load_datasets(config, context)
    epochs = min(config.epochs, QUICK_MAX_EPOCHS) if config.quick else config.epochs

    model_config = ModelConfig()
    model = build_model(model_config).to(context.device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(context.device.type, enabled=config.amp and amp_dtype == torch.float16)
    steps_per_epoch = len(batches)
    if steps_per_epoch == 0:
        raise ConfigError(f"batch size {config.batch_size} is larger than the training set")
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(config.warmup_epochs * steps_per_epoch))
    lr_for = partial(lr_at, base_lr=config.lr, total_steps=total_steps, warmup_steps=warmup_steps)

    start_epoch, step, best_acc, best_epoch, best_state, best_report = 0, 0, -1.0, 0, None, None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["last_model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        metrics = checkpoint["metrics"]
        start_epoch, step = metrics["epoch"], checkpoint["scheduler"]["step"]
        best_acc, best_epoch, best_state = metrics["best_test_acc"], metrics["best_epoch"], checkpoint["model"]
        best_report = {key: metrics[key] for key in ("per_class_acc", "confusion_matrix")}
        log(context, f"resuming {config.out} after epoch {start_epoch}/{epochs}")
    if context.enabled:
        model = DistributedDataParallel(model)

    out_path = Path(config.out)
    metrics_path = out_path.parent / "metrics.jsonl"
    # Per-epoch rows travel in the checkpoint, so a resumed run rewrites metrics.jsonl exactly.
    history = list(checkpoint.get("history", [])) if checkpoint is not None else []
    log(context, f"training on {context.device} x{context.world_size} rank(s), {threads} thread(s) each, "
                 f"amp={'off' if not config.amp else str(amp_dtype).removeprefix('torch.')}, "
                 f"{steps_per_epoch} steps/epoch of {config.batch_size} images, pipeline={config.pipeline}")

    metrics = checkpoint["metrics"] if checkpoint is not None else {}
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        batches.set_epoch(epoch)
        torch.manual_seed(epoch_seed(config.seed, epoch, context.rank))  # dropout masks
        totals, step, lr = train_one_epoch(model, batches, optimizer, scaler, config, context, amp_dtype, step, lr_for)
        train_seconds = time.perf_counter() - started
        raw_model = unwrap(model)
        dist.broadcast_buffers(raw_model, context)
        report = evaluate(raw_model, test_images, test_labels, config, context)
        if report["test_acc"] > best_acc:
            best_acc, best_epoch = report["test_acc"], epoch + 1
            best_state = cpu_state_dict(raw_model)
            best_report = {key: report[key] for key in ("per_class_acc", "confusion_matrix")}
        metrics = {
            "epoch": epoch + 1, "epochs": epochs, "train_loss": totals[0] / totals[2],
            "train_acc": totals[1] / totals[2], "test_acc": report["test_acc"],
            "test_loss": report["test_loss"], "best_test_acc": best_acc, "best_epoch": best_epoch,
            "lr": lr, "images_per_s": totals[2] / train_seconds, "epoch_s": time.perf_counter() - started,
            "world_size": context.world_size, **best_report,
        }
        log(context, f"epoch {epoch + 1:>2}/{epochs}  loss {metrics['train_loss']:.4f}  "
                     f"train {metrics['train_acc']:6.2%}  test {metrics['test_acc']:6.2%}  lr {lr:.2e}  "
                     f"{metrics['images_per_s']:6.0f} img/s  {metrics['epoch_s']:6.1f} s")
        history.append({key: value for key, value in metrics.items() if key not in best_report})
        if context.is_main:
            save_atomic(build_checkpoint(raw_model, best_state, optimizer, scaler, config, model_config, metrics,
                                         history, step, total_steps, warmup_steps), out_path)
            metrics_path.write_text("".join(json.dumps(row) + "\n" for row in history))
        dist.barrier(context)

    if context.is_main:
        write_test_report(out_path.parent / "test_report.json", metrics)
    return TrainResult(out_path if context.is_main else None, metrics, unwrap(model))


def format_confusion(metrics: dict) -> str:
    lines = [f"best epoch {metrics['best_epoch']}: test accuracy {metrics['best_test_acc']:.2%}",
             "digit  accuracy   confusion (rows: true digit, columns: predicted)",
             "                  " + "".join(f"{digit:>6}" for digit in range(10))]
    for digit, (accuracy, row) in enumerate(zip(metrics["per_class_acc"], metrics["confusion_matrix"])):
        lines.append(f"{digit:>5}  {accuracy:8.2%}  " + "".join(f"{count:>6}" for count in row))
    return "\n".join(lines)


def write_test_report(path: Path, metrics: dict) -> None:
    report = {key: metrics[key] for key in ("best_epoch", "best_test_acc", "per_class_acc", "confusion_matrix")}
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(format_confusion(metrics), flush=True)
