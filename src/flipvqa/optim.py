"""The optimizer and its learning-rate schedule, as the reference sets them up
(docs/faithfulness.md, "Training schedule and log")."""

from __future__ import annotations

import math

import torch

from .model.flipped import FlippedVQA


def make_optimizer(model: FlippedVQA, weight_decay: float, lr: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) with timm's rule, as the reference: no decay for 1-d tensors and biases.
    Empty groups are left out and the order (no-decay first, parameters in model order) is the
    reference's, so its optimizer state loads (all Flipped-VQA tensors are >= 2-d: one group)."""
    decay, no_decay = [], []
    for name, p in model.trainable_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((no_decay, 0.0), (decay, weight_decay)) if ps]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def base_lr(blr: float, batch_size: int, accum_iter: int, world_size: int) -> float:
    """``blr * effective batch / 256``: the paper's lr follows the global batch."""
    return blr * batch_size * accum_iter * world_size / 256


def lr_at(epoch_float: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up from 0, then a half-cycle cosine down to ``min_lr``; ``epoch_float`` is the
    fractional epoch ``epoch + step / steps_per_epoch`` (so the first step's lr is 0)."""
    if epoch_float < warmup_epochs:
        return lr * epoch_float / warmup_epochs
    if epochs <= warmup_epochs:
        return lr
    progress = (epoch_float - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
