"""The inner loops: one training step, one training epoch, scoring a split."""

from __future__ import annotations

import functools
import math
from typing import Iterable, Optional

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader

from .data.dataset import collate
from .devices import Dist
from .errors import FlipVQAError
from .io import progress
from .model.flipped import FlippedVQA
from .model.inputs import Batch
from .optim import lr_at

LOSS_KEYS = ("loss", "vqa_loss", "vaq_loss", "qav_loss")


def train_step(model: FlippedVQA, batch: Batch, optimizer: torch.optim.Optimizer, *, amp, dist: Dist,
               accum_iter: int = 1, update: bool = True, scaler=None, where: str = "") -> list[float]:
    """Forward and backward of one batch (the loss divided by ``accum_iter``); with ``update``,
    also average the gradients over ranks, step the optimizer and zero the gradients.

    Returns the batch's (loss, vqa, vaq, qav) before the division. A non-finite loss stops the
    run, as the reference's does, before it reaches the weights."""
    with amp:
        vqa, vaq, qav = model(batch)
    loss = vqa + vaq + qav
    values = [t.item() for t in (loss, vqa, vaq, qav)]
    if not math.isfinite(values[0]):
        bad = [k for k, v in zip(LOSS_KEYS[1:], values[1:]) if not math.isfinite(v)]
        raise FlipVQAError(f"{where}: the loss is {values[0]} ({', '.join(bad) or 'the sum'} not finite); "
                           f"stopping (lower --blr/--lr, use bf16 rather than fp16, or check the features)")
    loss = loss / accum_iter
    (scaler.scale(loss) if scaler else loss).backward()
    if update:
        if dist.enabled:
            _average_gradients([p for _, p in model.trainable_parameters()], dist)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return values


def train_one_epoch(model: FlippedVQA, loader: DataLoader, optimizer: torch.optim.Optimizer, epoch: int,
                    args, device: torch.device, amp, dist: Dist, scaler=None) -> dict[str, float]:
    """One epoch; returns the means over its batches (the reference's ``train_*`` values).

    The lr is set from the fractional epoch at the first batch of every accumulation; the
    gradients are zeroed at the start, so an epoch's leftover micro-batches are dropped, as the
    reference does (docs/faithfulness.md, "Training schedule and log")."""
    model.train()
    sums = dict.fromkeys(("lr", *LOSS_KEYS), 0.0)
    n_batches = len(loader)
    optimizer.zero_grad(set_to_none=True)
    bar = progress(loader, f"epoch {epoch}", enabled=dist.is_main)
    for step, batch in enumerate(bar):
        if step % args.accum_iter == 0:
            lr = lr_at(epoch + step / n_batches, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
        values = train_step(model, batch.to(device), optimizer, amp=amp, dist=dist, accum_iter=args.accum_iter,
                            update=(step + 1) % args.accum_iter == 0, scaler=scaler,
                            where=f"epoch {epoch} step {step} (videos {_videos(batch)})")
        for key, value in zip(LOSS_KEYS, values):
            sums[key] += value
        sums["lr"] += optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{values[0]:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    means = {k: v / max(n_batches, 1) for k, v in sums.items()}
    if dist.enabled:  # the reference averages the epoch's statistics over all ranks
        t = torch.tensor(list(means.values()), dtype=torch.float64, device=device)
        torch_dist.all_reduce(t)
        means = dict(zip(means, (t / dist.world_size).tolist()))
    return means


def _videos(batch: Batch, most: int = 4) -> str:
    vids = [r.vid for r in batch.records]
    return ", ".join(vids[:most]) + (f" and {len(vids) - most} more" if len(vids) > most else "")


def _average_gradients(params: list[torch.Tensor], dist: Dist) -> None:
    for p in params:
        if p.grad is None:  # every rank must join every all-reduce
            p.grad = torch.zeros_like(p)
        torch_dist.all_reduce(p.grad)
        p.grad /= dist.world_size


@torch.no_grad()
def score_split(model: FlippedVQA, loader: Iterable, device: torch.device, amp, dist: Dist,
                desc: str = "eval") -> list[dict]:
    """Per-option scores of every question of the loader, gathered on every rank and sorted by
    the question's index (each question exactly once, also under torchrun)."""
    model.eval()
    rows = []
    for batch in progress(loader, desc, enabled=dist.is_main):
        with amp:
            scores = model.score_options(batch.to(device)).float().cpu()
        for rec, s in zip(batch.records, scores):
            s = s[:len(rec.options)]  # a question with fewer options than the batch's most
            rows.append({"index": rec.index, "qid": rec.qid, "vid": rec.vid, "answer": rec.answer,
                         "prediction": int(s.argmin()), "scores": s.tolist(), "qtype": rec.qtype})
    if dist.enabled:
        gathered = [None] * dist.world_size
        torch_dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    return sorted(rows, key=lambda r: r["index"])


def eval_loader(dataset, batch_size: int, num_workers: int, dist: Dist, pad_to: Optional[int] = None) -> DataLoader:
    """Questions split across ranks without padding, so that each is scored exactly once."""
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    subset = torch.utils.data.Subset(dataset, indices)
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=functools.partial(collate, pad_to=pad_to))
