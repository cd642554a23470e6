"""Everyday shifts as training augmentation (issue 26 point 3): a share of each batch gets one
shift a camera, a scanner or a pen makes, so such digits are in the distribution the model and
its is_digit threshold learn, and the outliers in the batch (non-digits) get them alike, so a
shift never means "digit".

Whole batches in torch (no per-image Python), on the training device, from the batch's generator
(deterministic per epoch and rank, like the rest of augmentation). The families follow MNIST-C's
(training/corruptions.py) with their own parameters, drawn over ranges rather than its fixed
severities: the evaluation set is never reproduced, and the validation split of the shifts
(training/shifts.py, split val) is what the share is chosen on (docs/trust.md).

    noise:  salt and pepper (impulse) or Gaussian noise on the whole image
    blur:   a Gaussian or a directional (motion) blur
    lines:  a straight, dotted or zigzag stroke across the image
    edges:  the outline of the strokes only (morphological gradient: canny-like)
    fog:    a smooth brightness field added (fog, brightness)
    warp:   scale, shear and a rotation up to 40 degrees (translation is the base augmentation's)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FAMILIES = ("noise", "blur", "lines", "edges", "fog", "warp")
MAX_WARP_ROTATION = 0.7   # radians (40 degrees); the base augmentation's rotation stays small


def uniform(n: int, low: float, high: float, generator: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, 1, 1, 1, generator=generator, device=device)


def noise(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n, device = images.shape[0], images.device
    draw = torch.rand(images.shape, generator=generator, device=device)
    amount = uniform(n, 0.02, 0.3, generator, device)
    salted = torch.where(draw < amount / 2, 0.0, torch.where(draw > 1 - amount / 2, 1.0, images))
    sigma = uniform(n, 0.05, 0.35, generator, device)
    gaussian = images + sigma * torch.randn(images.shape, generator=generator, device=device)
    impulse = torch.rand(n, 1, 1, 1, generator=generator, device=device) < 0.5
    return torch.where(impulse, salted, gaussian).clamp(0, 1)


def gaussian_kernel(sigma: float, device) -> torch.Tensor:
    radius = max(1, math.ceil(2.5 * sigma))
    steps = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    weights = torch.exp(-steps ** 2 / (2 * sigma ** 2))
    return weights / weights.sum()


def blur(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Half Gaussian (one sigma per batch, from 0.7 to 2 px), half motion: a line of 5 to 11
    taps in a random direction per image, by sampling along it."""
    device = images.device
    sigma = float(0.7 + 1.3 * torch.rand(1, generator=generator, device=device))
    kernel = gaussian_kernel(sigma, device).to(images.dtype)
    size = len(kernel)
    soft = F.conv2d(F.pad(images, (size // 2,) * 4, mode="replicate"), kernel.view(1, 1, 1, -1))
    soft = F.conv2d(soft, kernel.view(1, 1, -1, 1))
    n, _, height, width = images.shape
    angle = torch.rand(n, generator=generator, device=device) * math.pi
    length = 2 + 3 * torch.rand(n, generator=generator, device=device)     # half-length in pixels
    taps = torch.linspace(-1, 1, 9, device=device)
    motion = torch.zeros_like(images)
    base = F.affine_grid(torch.eye(2, 3, device=device, dtype=images.dtype).expand(n, 2, 3), list(images.shape),
                         align_corners=False)
    for tap in taps:
        offset = torch.stack([torch.cos(angle) * 2 / width, torch.sin(angle) * 2 / height], dim=1) * length[:, None] * tap
        motion += F.grid_sample(images, base + offset[:, None, None, :].to(images.dtype), mode="bilinear",
                                padding_mode="zeros", align_corners=False)
    motion /= len(taps)
    gaussian = torch.rand(n, 1, 1, 1, generator=generator, device=device) < 0.5
    return torch.where(gaussian, soft, motion)


def lines(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A stroke from one edge to the other: straight, dotted (every other 2 px) or zigzag."""
    n, _, height, width = images.shape
    device = images.device
    rows = torch.arange(height, device=device, dtype=images.dtype).view(1, 1, height, 1)
    cols = torch.arange(width, device=device, dtype=images.dtype).view(1, 1, 1, width)
    start = uniform(n, 0, height - 1, generator, device)
    end = uniform(n, 0, height - 1, generator, device)
    centre = start + (end - start) * cols / (width - 1)
    kind = torch.randint(3, (n, 1, 1, 1), generator=generator, device=device)
    zig = 3 * torch.abs(((cols / 4) % 2) - 1)                    # a triangle wave, 3 px high
    centre = torch.where(kind == 2, centre + zig - 1.5, centre)
    width_px = uniform(n, 0.6, 1.4, generator, device)
    stroke = (1 - (torch.abs(rows - centre) - width_px / 2).clamp(0, 1)).clamp(0, 1)
    dotted = ((cols % 4) < 2).to(images.dtype)
    stroke = torch.where(kind == 1, stroke * dotted, stroke)
    transpose = torch.rand(n, 1, 1, 1, generator=generator, device=device) < 0.5   # across or down
    stroke = torch.where(transpose, stroke.transpose(2, 3), stroke)
    return torch.maximum(images, stroke * uniform(n, 0.6, 1.0, generator, device))


SOBEL = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def edges(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Canny-like outlines: Sobel on a blurred copy, kept where the gradient peaks across the
    edge (its stronger axis), above 0.2 (MNIST-C's strong threshold)."""
    sobel = torch.tensor(SOBEL, device=images.device, dtype=images.dtype)
    kernel = gaussian_kernel(1.0, images.device).to(images.dtype)
    size = len(kernel)
    smooth = F.conv2d(F.pad(images, (size // 2,) * 4, mode="replicate"), kernel.view(1, 1, 1, -1))
    smooth = F.pad(F.conv2d(smooth, kernel.view(1, 1, -1, 1)), (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(smooth, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(smooth, sobel.t().contiguous().view(1, 1, 3, 3))
    magnitude = torch.hypot(gx, gy)
    padded = F.pad(magnitude, (1, 1, 1, 1))
    across_cols = (magnitude >= padded[..., 1:-1, :-2]) & (magnitude >= padded[..., 1:-1, 2:])
    across_rows = (magnitude >= padded[..., :-2, 1:-1]) & (magnitude >= padded[..., 2:, 1:-1])
    peak = torch.where(gx.abs() >= gy.abs(), across_cols, across_rows)
    return (peak & (magnitude >= 0.2)).to(images.dtype)


def fog(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A smooth field (4x4 noise, bicubically enlarged) plus a level, added and rescaled."""
    n, _, height, width = images.shape
    device = images.device
    coarse = torch.rand(n, 1, 4, 4, generator=generator, device=device, dtype=images.dtype)
    field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
    strength = uniform(n, 0.1, 0.6, generator, device)
    return ((images + strength * field) / (1 + strength * 0.5)).clamp(0, 1)


def warp(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    device = images.device
    scale = 1 / (0.6 + 0.7 * torch.rand(n, generator=generator, device=device))   # digit 0.6x .. 1.3x
    shear = (torch.rand(n, generator=generator, device=device) * 2 - 1) * 0.5
    angle = (torch.rand(n, generator=generator, device=device) * 2 - 1) * MAX_WARP_ROTATION
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros(n, device=device)
    # rotation @ [[scale, shear * scale], [0, scale]]
    theta = torch.stack([torch.stack([cos * scale, (cos * shear - sin) * scale, zero], 1),
                         torch.stack([sin * scale, (sin * shear + cos) * scale, zero], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


SHIFTS = {"noise": noise, "blur": blur, "lines": lines, "edges": edges, "fog": fog, "warp": warp}


def shift_augment(images: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """images float [N, 1, H, W] in [0, 1]; each image gets, with probability share, one family
    (all equally likely). The others are returned unchanged."""
    if not share:
        return images
    n, device = images.shape[0], images.device
    chosen = torch.rand(n, generator=generator, device=device) < share
    family = torch.randint(len(FAMILIES), (n,), generator=generator, device=device)
    out = images.clone()
    for index, name in enumerate(FAMILIES):
        picked = (chosen & (family == index)).nonzero().flatten()
        if len(picked):
            out[picked] = SHIFTS[name](images[picked], generator)
    return out
