"""MNIST loading, the normalization constants, whole-batch augmentation, and the batch iterators.

The constants here are the single source of truth: training copies them into the
checkpoint, export copies them into every artifact, serving reads them from there.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from serving.handler.preprocess import normalize_in_place

from .config import QUICK, ConfigError, TrainConfig
from .dist import DistContext
from .model import NUM_CLASSES
from .outliers import outlier_pool, outliers_per_batch
from .shift_augment import shift_augment

MNIST_MEAN = 0.1307  # pixel mean of the 60,000 training images, scaled to [0, 1]
MNIST_STD = 0.3081   # their standard deviation
INPUT_SHAPE = (1, 28, 28)
CLASS_LABELS = [str(digit) for digit in range(NUM_CLASSES)]
DATA_DIR_ENV = "MNIST_DATA_DIR"
DEFAULT_DOWNLOAD_DIR = Path("data")


class DataError(Exception):
    """The MNIST data could not be found, downloaded or read."""


def preprocess_metadata() -> dict:
    """What a consumer of an artifact needs to turn pixels into model input."""
    return {"mean": MNIST_MEAN, "std": MNIST_STD, "input_shape": list(INPUT_SHAPE),
            "labels": CLASS_LABELS}


def load_mnist(data_dir: str | os.PathLike | None, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 [N, 28, 28], labels int64 [N]).

    data_dir None: use $MNIST_DATA_DIR if set, else download into ./data.
    An explicit directory (or the env var) is read as it is and never written to.
    """
    raw = mnist_root(data_dir) / "MNIST" / "raw"
    images_file, labels_file = (raw / name for name in IDX_FILES[train])
    if images_file.is_file() and labels_file.is_file():
        images, labels = read_idx(images_file, IMAGES_MAGIC), read_idx(labels_file, LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels")
        return torch.from_numpy(images), torch.from_numpy(labels).long()
    dataset = open_mnist_dataset(data_dir, train)   # downloads, or says what is missing
    return dataset.data.contiguous(), dataset.targets.long().contiguous()


# torchvision's raw layout: the four IDX files, uncompressed. Reading them takes numpy alone;
# importing torchvision for it took ~5 s of each process here (the Xeon @ 2.60GHz), and
# every training rank and export paid it. torchvision stays for downloading and its Dataset.
IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049   # unsigned bytes, 3 and 1 dimensions


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes: a big-endian header (magic, then one int32 per
    dimension) and the values. DataError when it is not the file expected or is cut short."""
    return parse_idx(path.read_bytes(), magic, path)


def parse_idx(data: bytes, magic: int, path: Path | str) -> np.ndarray:
    """read_idx on bytes already read (a gzipped IDX file unpacked in memory); `path` names them."""
    dims = magic & 0xFF
    header = 4 + 4 * dims
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DataError(f"{path} is not an MNIST IDX file (expected magic number {magic})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    if len(data) != header + math.prod(shape):
        raise DataError(f"{path} is cut short or too long: its header says {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def mnist_root(data_dir: str | os.PathLike | None) -> Path:
    """--data-dir, else $MNIST_DATA_DIR, else ./data (where a download goes)."""
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    return Path(data_dir) if data_dir is not None else DEFAULT_DOWNLOAD_DIR


def open_mnist_dataset(data_dir: str | os.PathLike | None, train: bool, transform=None):
    """The torchvision MNIST dataset; see load_mnist for how data_dir is resolved."""
    from torchvision.datasets import MNIST  # imported here: only training needs torchvision

    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    download = data_dir is None
    root = Path(data_dir) if data_dir is not None else DEFAULT_DOWNLOAD_DIR
    if not download and not (root / "MNIST" / "raw").is_dir():
        raise DataError(
            f"no MNIST copy at {root}: expected {root}/MNIST/raw with the IDX files "
            f"(torchvision layout); leave --data-dir and ${DATA_DIR_ENV} unset to download")
    try:
        return MNIST(str(root), train=train, download=download, transform=transform)
    except RuntimeError as error:  # torchvision: 'Dataset not found' or a failed download
        raise DataError(unreadable_mnist(root, download, error)) from None
    except OSError as error:
        raise DataError(f"could not read or download MNIST into {root}: {error}") from None


def unreadable_mnist(root: Path, downloading: bool, error: RuntimeError) -> str:
    """One line: a failed download (torchvision's message spans lines, one per mirror) says
    how to point at a copy instead; a copy that does not load says what is wrong with it."""
    if downloading:
        return (f"no MNIST copy in {root}/ and the download failed (offline?): pass --data-dir with an "
                f"existing copy (torchvision layout, e.g. ../shared/mnist) or set ${DATA_DIR_ENV}")
    reason = " ".join(str(error).split())
    return f"could not load MNIST from {root} (the IDX files are missing or incomplete): {reason}"


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] or [N, 1, 28, 28] -> float [N, 1, 28, 28], normalized."""
    images = images_uint8.float().div_(255.0)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return normalize_in_place(images, MNIST_MEAN, MNIST_STD)


def augment(images: torch.Tensor, *, max_rotation_deg: float, max_shift_px: float,
            generator: torch.Generator, max_stroke_change: float = 0.0) -> torch.Tensor:
    """Random rotation and translation of a whole batch in one grid_sample call, then (with
    max_stroke_change) strokes thickened or thinned per image (change_strokes).

    images: float [N, 1, H, W] in [0, 1] pixel space, so zero padding is background ink-free.
    """
    n, _, height, width = images.shape
    # Drawn on the images' device, from a generator on that device (a CUDA one on the GPU).
    angles = (torch.rand(n, generator=generator, device=images.device) * 2 - 1) * math.radians(max_rotation_deg)
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size of them.
    shifts = (torch.rand(n, 2, generator=generator, device=images.device) * 2 - 1) * max_shift_px
    cos, sin = torch.cos(angles), torch.sin(angles)
    theta = torch.stack([
        torch.stack([cos, -sin, shifts[:, 0] * 2 / width], dim=1),
        torch.stack([sin, cos, shifts[:, 1] * 2 / height], dim=1),
    ], dim=1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if not max_stroke_change:
        return moved
    change = (torch.rand(n, 1, 1, 1, generator=generator, device=images.device) * 2 - 1) * max_stroke_change
    return change_strokes(moved, change.to(images.dtype))


def change_strokes(images: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """Thicker strokes where change > 0 (towards a 3x3 dilation), thinner where < 0 (towards a
    3x3 erosion), by |change| in [0, 1]: digits typed in bold or light faces, drawn with a
    marker or a fine pen, are what MNIST's uniform pen lacks (training/synthetic.py's real-world set)."""
    dilated = F.max_pool2d(images, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-images, 3, stride=1, padding=1)
    target = torch.where(change > 0, dilated, eroded)
    return images + change.abs() * (target - images)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Randomness (augmentation, dropout) seeded per epoch and rank, so a resumed run
    continues exactly as the uninterrupted one would have."""
    return seed * 1_000_003 + epoch * 1009 + rank


class TensorBatches:
    """The training set as one uint8 tensor on the training device (47 MB: on a GPU it stays
    there); each batch is indexed, augmented and normalized as a whole on that device: no
    per-image Python work, no loader processes, no host-to-device copies.

    With outliers (outlier exposure, training/outliers.py) each batch's pixels end with
    outliers_per_batch generated non-digits, drawn at random from that pool and augmented alike;
    its labels are the digits' only, so pixels[:len(labels)] are the digits."""

    def __init__(self, images, labels, config: TrainConfig, context: DistContext, outliers=None):
        self.images, self.labels = images.to(context.device), labels.to(context.device)
        self.outliers = outliers.to(context.device) if outliers is not None else None
        self.config, self.context = config, context
        self.batch_per_rank = config.batch_size // context.world_size
        self.outliers_per_batch = outliers_per_batch(self.batch_per_rank) if outliers is not None else 0
        # Only used for its index arithmetic: the same shuffling and sharding as any DDP loader.
        self.sampler = DistributedSampler(range(len(labels)), num_replicas=context.world_size,
                                          rank=context.rank, shuffle=True, seed=config.seed, drop_last=True)
        self.generator = torch.Generator(device=context.device)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_per_rank

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(self.config.seed, epoch, self.context.rank))

    def batch_pixels(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = self.images[batch]
        if self.outliers is not None:
            drawn = torch.randint(len(self.outliers), (self.outliers_per_batch,), generator=self.generator,
                                  device=self.outliers.device)
            pixels = torch.cat([pixels, self.outliers[drawn]])
        return pixels.unsqueeze(1).float().div_(255.0)

    def __iter__(self):
        indices = torch.tensor(list(self.sampler), device=self.images.device)
        for step in range(len(self)):
            batch = indices[step * self.batch_per_rank:(step + 1) * self.batch_per_rank]
            pixels = augment(self.batch_pixels(batch), max_rotation_deg=self.config.max_rotation_deg,
                             max_shift_px=self.config.max_shift_px, generator=self.generator,
                             max_stroke_change=self.config.max_stroke_change)
            pixels = shift_augment(pixels, self.config.shift_share, self.generator)
            yield normalize_in_place(pixels, MNIST_MEAN, MNIST_STD), self.labels[batch]   # augment's own output


def textbook_loader(config: TrainConfig, context: DistContext, count: int):
    """The usual tutorial pipeline: per-image PIL transforms in DataLoader workers, over the
    first `count` training images. Kept as a selectable baseline (--pipeline torchvision) for benchmarks."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.RandomAffine(config.max_rotation_deg, translate=(config.max_shift_px / 28,) * 2),
        transforms.ToTensor(),
        transforms.Normalize((MNIST_MEAN,), (MNIST_STD,)),
    ])
    dataset = torch.utils.data.Subset(open_mnist_dataset(config.data_dir, train=True, transform=transform),
                                      range(count))
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank,
                                 shuffle=True, seed=config.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size // context.world_size, sampler=sampler,
        num_workers=config.num_workers, drop_last=True, persistent_workers=config.num_workers > 0)
    loader.set_epoch = sampler.set_epoch
    return loader


@dataclass
class Datasets:
    batches: object              # TensorBatches or the textbook DataLoader: len(), set_epoch(), iteration
    eval_sets: dict              # name -> (uint8 images, labels): "val" (held out of training) and "test"


def with_synthetic_digits(images: torch.Tensor, labels: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST plus `count` generated typed and drawn digits (training/synthetic.py, split "fit")."""
    if not count:
        return images, labels
    from .synthetic import real_world_digits

    made = real_world_digits("fit", -(-count // 2), styles=("typed", "drawn"))
    return (torch.cat([images, torch.from_numpy(made.as_uint8()[:count])]),
            torch.cat([labels, torch.from_numpy(made.labels[:count])]))


def load_datasets(config: TrainConfig, context: DistContext) -> Datasets:
    """Training batches and evaluation sets, cut down for --quick / --train-subset. The last
    config.held_out_images training images are always held out ("val"): the trust record is
    fitted on them, and --select-by val_acc picks the epoch by them."""
    train_images, train_labels = load_mnist(config.data_dir, train=True)
    test_images, test_labels = load_mnist(config.data_dir, train=False)
    held_out = config.held_out_images
    if held_out >= len(train_labels):
        raise ConfigError(f"--val-images {held_out} leaves no training images")
    eval_sets = {"val": (train_images[-held_out:], train_labels[-held_out:])}
    train_images, train_labels = train_images[:-held_out], train_labels[:-held_out]
    count = min(config.train_subset or (QUICK.train_images if config.quick else len(train_labels)), len(train_labels))
    if config.pipeline == "tensor":
        outliers = outlier_pool(config.outlier_pool_images) if config.outlier_loss_weight else None
        images, labels = with_synthetic_digits(train_images[:count], train_labels[:count],
                                               config.synthetic_digit_count)
        batches = TensorBatches(images, labels, config, context, outliers)
    else:
        batches = textbook_loader(config, context, count)
    if config.quick:
        test_images, test_labels = test_images[:QUICK.test_images], test_labels[:QUICK.test_images]
    eval_sets["test"] = test_images, test_labels
    return Datasets(batches, eval_sets)


def check_data(data_dir: str | os.PathLike | None) -> str:
    """Load both splits (downloading when no copy is given) and describe what was found."""
    try:
        train_images, _ = load_mnist(data_dir, train=True)
        test_images, _ = load_mnist(data_dir, train=False)
    except DataError as error:
        if data_dir is None and not os.environ.get(DATA_DIR_ENV):
            raise DataError(f"MNIST is not in ./{DEFAULT_DOWNLOAD_DIR} and the download failed (no network?). "
                            f"Point DATA_DIR=... (make) or ${DATA_DIR_ENV} at a local copy. "
                            f"({str(error).splitlines()[0]})") from None
        raise
    source = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DOWNLOAD_DIR
    return f"MNIST ready: {len(train_images)} training and {len(test_images)} test images from {source}"


if __name__ == "__main__":
    import sys

    try:
        print(check_data(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None))
    except DataError as error:
        sys.exit(f"error: {error}")
