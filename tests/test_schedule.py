import math

import pytest

from training.schedule import lr_at

BASE = 1e-3


def lr(step, total=100, warmup=10, **kw):
    return lr_at(step, base_lr=BASE, total_steps=total, warmup_steps=warmup, **kw)


def test_warmup_is_linear_and_reaches_peak():
    assert lr(0) == pytest.approx(BASE / 10)
    assert lr(4) == pytest.approx(BASE * 5 / 10)
    assert lr(9) == pytest.approx(BASE)
    assert all(lr(s) < lr(s + 1) for s in range(9))


def test_cosine_decay_after_warmup():
    assert lr(10) == pytest.approx(BASE)
    assert lr(55) == pytest.approx(BASE * 0.5)               # halfway through the decay
    assert lr(100) == pytest.approx(0.0, abs=1e-12)
    decay = [lr(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_final_fraction_and_clamp_past_the_end():
    assert lr(100, final_lr_fraction=0.1) == pytest.approx(BASE * 0.1)
    assert lr(500, final_lr_fraction=0.1) == pytest.approx(BASE * 0.1)


def test_no_warmup_starts_at_peak():
    assert lr(0, warmup=0) == pytest.approx(BASE)
    assert lr(25, total=100, warmup=0) == pytest.approx(BASE * 0.5 * (1 + math.cos(math.pi * 0.25)))


@pytest.mark.parametrize("total,warmup", [(0, 0), (10, 11), (10, -1)])
def test_rejects_nonsense(total, warmup):
    with pytest.raises(ValueError):
        lr(0, total=total, warmup=warmup)
