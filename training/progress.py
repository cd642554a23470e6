"""What a person watching a run sees: a progress bar within an epoch when stdout is a
terminal (logs and CI keep one plain line per epoch), and optional TensorBoard event files."""
from __future__ import annotations


class EpochProgress:
    """A tqdm bar counting this rank's training images; a no-op when disabled."""

    def __init__(self, total_images: int, epoch: int, epochs: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total_images, desc=f"epoch {epoch + 1}/{epochs}", unit="img", unit_scale=True,
                            leave=False, dynamic_ncols=True)

    def advance(self, images: int) -> None:
        if self.bar is not None:
            self.bar.update(images)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


# metrics.jsonl key -> TensorBoard tag
TENSORBOARD_TAGS = {"train_loss": "loss/train", "test_loss": "loss/test", "val_loss": "loss/val",
                    "train_acc": "accuracy/train", "test_acc": "accuracy/test", "val_acc": "accuracy/val",
                    "lr": "lr", "images_per_s": "images_per_s"}


class TensorBoardLog:
    """One scalar per metric and epoch (the step axis is the epoch), the same values as metrics.jsonl."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=log_dir)

    def write(self, metrics: dict) -> None:
        for key, tag in TENSORBOARD_TAGS.items():
            if metrics.get(key) is not None:
                self.writer.add_scalar(tag, metrics[key], metrics["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
