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
