"""Everyday shifts as training augmentation (training/shift_augment.py)."""
import pytest
import torch

from training.config import ConfigError, TrainConfig, validate
from training.shift_augment import FAMILIES, SHIFTS, shift_augment


@pytest.fixture(scope="module")
def digits(mnist_digits):
    images = torch.from_numpy(mnist_digits.images[:32].copy())
    return images.unsqueeze(1).float() / 255


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_changes_digits_and_stays_in_range(digits, name):
    shifted = SHIFTS[name](digits, generator())
    assert shifted.shape == digits.shape and shifted.dtype == digits.dtype
    assert float(shifted.min()) >= 0 and float(shifted.max()) <= 1 + 1e-6
    changed = (shifted - digits).abs().flatten(1).amax(1) > 0.1
    assert bool(changed.all()), f"{name} left {int((~changed).sum())} digits as they were"


def test_the_share_is_the_share_and_the_generator_decides(digits):
    assert torch.equal(shift_augment(digits, 0.0, generator()), digits)
    many = digits.repeat(16, 1, 1, 1)
    shifted = shift_augment(many, 0.25, generator())
    share = float(((shifted - many).abs().flatten(1).amax(1) > 0).float().mean())
    assert 0.15 < share < 0.35
    assert torch.equal(shift_augment(many, 0.25, generator(3)), shift_augment(many, 0.25, generator(3)))
    assert not torch.equal(shift_augment(many, 0.25, generator(3)), shift_augment(many, 0.25, generator(4)))


def test_the_share_is_validated():
    with pytest.raises(ConfigError, match="shift share"):
        validate(TrainConfig(shift_share=1.5))


def test_warp_also_rotates_as_a_camera_or_a_slanted_page_does():
    """MNIST-C's rotate turns digits by up to 57 degrees; the base augmentation by 10. A horizontal
    bar stays horizontal under scale and shear alone: the warp family must tilt it, both ways."""
    bars = torch.zeros(64, 1, 28, 28)
    bars[:, :, 13:15, 4:24] = 1
    warped = SHIFTS["warp"](bars, generator())
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = warped[:, 0].flatten(1).sum(1)
    mean_x = (warped[:, 0] * xs).flatten(1).sum(1) / mass
    mean_y = (warped[:, 0] * ys).flatten(1).sum(1) / mass
    covariance = (warped[:, 0] * (xs - mean_x[:, None, None]) * (ys - mean_y[:, None, None])).flatten(1).sum(1) / mass
    slope = covariance / ((warped[:, 0] * (xs - mean_x[:, None, None]) ** 2).flatten(1).sum(1) / mass)
    angles = torch.rad2deg(torch.atan(slope))
    assert float(angles.abs().max()) > 20, f"steepest tilt {float(angles.abs().max()):.1f} degrees"
    assert bool((angles > 10).any() and (angles < -10).any())
    assert float(angles.abs().max()) < 45
