"""The learning-rate schedule and the optimizer's parameter groups, on their own."""

import math

import pytest

from flipvqa.optim import base_lr, lr_at


def test_warmup_is_linear_from_zero():
    assert lr_at(0.0, lr=0.8, min_lr=0.0, warmup_epochs=2, epochs=5) == 0.0  # the first step of a run
    assert lr_at(0.5, lr=0.8, min_lr=0.0, warmup_epochs=2, epochs=5) == pytest.approx(0.2)
    assert lr_at(1.999, lr=0.8, min_lr=0.0, warmup_epochs=2, epochs=5) == pytest.approx(0.8 * 1.999 / 2)


def test_cosine_after_warmup_reaches_min_lr_at_the_end():
    lr, low = 0.8, 0.1
    assert lr_at(2.0, lr, low, 2, 5) == pytest.approx(lr)  # warm-up ends at the peak
    assert lr_at(3.5, lr, low, 2, 5) == pytest.approx((lr + low) / 2)  # half way down the half cycle
    assert lr_at(2.75, lr, low, 2, 5) == pytest.approx(low + (lr - low) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(5.0, lr, low, 2, 5) == pytest.approx(low)
    values = [lr_at(2 + k / 10, lr, low, 2, 5) for k in range(31)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never rises again


def test_no_cosine_when_warmup_covers_every_epoch():
    assert lr_at(3.0, lr=0.5, min_lr=0.0, warmup_epochs=4, epochs=4) == pytest.approx(0.375)
    assert lr_at(0.0, lr=0.5, min_lr=0.0, warmup_epochs=0, epochs=0) == 0.5


def test_base_lr_follows_the_global_batch():
    # NExT-QA's preset on the paper's 4 GPUs: 9e-2 * 8 * 2 * 4 / 256
    assert base_lr(9e-2, 8, 2, 4) == pytest.approx(0.0225)
    assert base_lr(9e-2, 8, 2, 1) == pytest.approx(0.0225 / 4)
