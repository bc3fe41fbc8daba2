"""The inner loops: one training epoch, scoring a split, the schedule and the metrics."""

from __future__ import annotations

import functools
import math
from typing import Iterable, Optional

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data.dataset import collate
from .errors import FlipVQAError
from .model.flipped import FlippedVQA
from .runtime import Dist

# Question-type groups of the reference's log (SPEC.md section 6 codes).
QTYPE_GROUPS = {
    "nextqa": {"C": (1, 2), "T": (3, 4, 5), "D": (6, 7, 8)},
    "star": {"In": (1,), "Seq": (2,), "Pre": (3,), "Feas": (4,)},
}
QTYPE_NAMES = {
    "nextqa": {1: "CH", 2: "CW", 3: "TN", 4: "TC", 5: "TP", 6: "DL", 7: "DC", 8: "DO"},
    "star": {1: "Interaction", 2: "Sequence", 3: "Prediction", 4: "Feasibility"},
}


def lr_at(epoch_float: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up from 0, then a half-cycle cosine down to ``min_lr`` (per iteration)."""
    if epoch_float < warmup_epochs:
        return lr * epoch_float / warmup_epochs
    if epochs <= warmup_epochs:
        return lr
    progress = (epoch_float - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_one_epoch(model: FlippedVQA, loader: DataLoader, optimizer: torch.optim.Optimizer, epoch: int,
                    args, device: torch.device, amp, dist: Dist, scaler=None) -> dict[str, float]:
    """One epoch; returns the means over its batches (the reference's ``train_*`` values)."""
    model.train()
    params = [p for _, p in model.trainable_parameters()]
    sums = {"lr": 0.0, "loss": 0.0, "vqa_loss": 0.0, "vaq_loss": 0.0, "qav_loss": 0.0}
    n_batches = len(loader)
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not dist.is_main, leave=False, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        if step % args.accum_iter == 0:
            lr = lr_at(epoch + step / n_batches, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
        with amp:
            vqa, vaq, qav = model(batch.to(device))
        loss = vqa + vaq + qav
        values = [t.item() for t in (loss, vqa, vaq, qav)]
        if not math.isfinite(values[0]):
            raise FlipVQAError(f"epoch {epoch} step {step}: the loss is {values[0]}; stopping "
                               f"(lower --blr/--lr, or check the data)")
        loss = loss / args.accum_iter
        (scaler.scale(loss) if scaler else loss).backward()
        if (step + 1) % args.accum_iter == 0:
            if dist.enabled:
                _average_gradients(params, dist)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for key, value in zip(("loss", "vqa_loss", "vaq_loss", "qav_loss"), values):
            sums[key] += value
        sums["lr"] += optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{values[0]:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    means = {k: v / max(n_batches, 1) for k, v in sums.items()}
    if dist.enabled:  # the reference averages the epoch's statistics over all ranks
        t = torch.tensor(list(means.values()), dtype=torch.float64, device=device)
        torch_dist.all_reduce(t)
        means = dict(zip(means, (t / dist.world_size).tolist()))
    return means


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
    for batch in tqdm(loader, desc=desc, disable=not dist.is_main, leave=False, dynamic_ncols=True):
        with amp:
            scores = model.score_options(batch.to(device)).float().cpu()
        for rec, s in zip(batch.records, scores):
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


def accuracy_stats(rows: list[dict], dataset: str, batch_size: int, seed: int = 0) -> dict[str, float]:
    """``acc`` and the reference's per-type log values.

    The reference averages per-type accuracies over its (shuffled) validation batches, weighted
    by each batch's count plus 1e-10; that is reproduced here (batches in the order of its sampler
    for ``seed``), so the values can differ from plain ratios in the 10th decimal. Plain ratios
    are in :func:`per_type_accuracy`.
    """
    correct = {r["index"]: r["prediction"] == r["answer"] for r in rows}
    stats = {"acc": sum(correct.values()) / len(rows)}
    groups = QTYPE_GROUPS.get(dataset)
    if not groups:
        return stats
    ep = 1e-10
    g = torch.Generator()
    g.manual_seed(seed)
    order = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    num = dict.fromkeys([*groups, "Total"], 0.0)
    den = dict.fromkeys([*groups, "Total"], 0.0)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for name, types in [*groups.items(), ("Total", None)]:
            sel = [correct[r["index"]] for r in chunk if types is None or r["qtype"] in types]
            den[name] += len(sel) + ep
            if dataset == "nextqa" and types is not None:
                num[name] += sum(sel)  # logged as correct / (count + ep)
            elif sel:
                num[name] += sum(sel) / len(sel) * (len(sel) + ep)  # logged as correct / count
    for name in num:
        stats[name] = num[name] / den[name]
    return stats


def per_type_accuracy(rows: list[dict], dataset: str) -> dict[str, float]:
    """Plain accuracy per question type and per group (for reports)."""
    out = {}
    names = QTYPE_NAMES.get(dataset, {})
    for code, name in names.items():
        sel = [r for r in rows if r["qtype"] == code]
        if sel:
            out[name] = sum(r["prediction"] == r["answer"] for r in sel) / len(sel)
    for g, types in QTYPE_GROUPS.get(dataset, {}).items():
        sel = [r for r in rows if r["qtype"] in types]
        if sel and len(types) > 1:
            out[g] = sum(r["prediction"] == r["answer"] for r in sel) / len(sel)
    return out
