"""``flipvqa train``: the reference's training recipe, read top to bottom
(docs/faithfulness.md, "Training schedule and log").

AdamW (0.9, 0.95) on the Flipped-VQA parts only, weight decay on tensors with ndim > 1,
``lr = blr * effective_batch / 256``, per-iteration warm-up then cosine, gradient accumulation,
validation after every epoch, ``checkpoint_best.pth`` by validation accuracy, ``log.txt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from . import data
from .checkpoints import build_model, load_checkpoint, load_trainable, run_tokenizer, save_checkpoint
from .checkpoints.trainable import expected_feature_dim
from .data.dataset import collate
from .devices import autocast, init_distributed, seed_everything
from .errors import FlipVQAError
from .evaluate import write_predictions
from .loops import eval_loader, score_split, train_one_epoch
from .metrics import accuracy_stats
from .optim import base_lr, make_optimizer

log = logging.getLogger(__name__)


def train(args: argparse.Namespace) -> dict:
    """Train; returns {"best_acc", "best_epoch", "log": [per-epoch dicts], "output_dir"}."""
    dist, device = init_distributed(args.device)
    seed_everything(args.seed + dist.rank)
    # What is cheap to check comes first: the tokenizer, the data, the checkpoint file. The
    # backbone (13 GB for 7B) loads only once they are fine.
    tokenizer = run_tokenizer(args)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    width = expected_feature_dim(ckpt, args.resume)
    train_set = data.build_dataset(args, tokenizer, "train", train=True, feature_dim=width)
    val_set = data.build_dataset(args, tokenizer, "val", train=False, feature_dim=width)
    model = build_model(args, device, tokenizer, train_set.feature_dim)

    eff_batch = args.batch_size * args.accum_iter * dist.world_size
    if args.lr is None:
        args.lr = base_lr(args.blr, args.batch_size, args.accum_iter, dist.world_size)
    log.info("lr %.3e (effective batch %d); %d train / %d val questions",
             args.lr, eff_batch, len(train_set), len(val_set))

    optimizer = make_optimizer(model, args.weight_decay, args.lr)
    start_epoch = 0
    if ckpt is not None:
        load_trainable(model, args.resume, ckpt)
        if "optimizer" in ckpt and "epoch" in ckpt:
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as exc:
                raise FlipVQAError(f"{args.resume}: its optimizer state does not fit this model ({exc})") from None
            start_epoch = int(ckpt["epoch"]) + 1
            log.info("resumed from %s at epoch %d", args.resume, start_epoch)
    if start_epoch >= args.epochs:
        log.warning("nothing to train: the checkpoint is at epoch %d and --epochs is %d", start_epoch - 1, args.epochs)

    # The reference's sampler: shuffled with its default seed 0 whatever --seed is (--seed sets the
    # initial weights), the same order every epoch unless distributed.
    sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        collate_fn=collate, pin_memory=device.type == "cuda", drop_last=False,
                        persistent_workers=args.num_workers > 0)
    val_loader = eval_loader(val_set, args.batch_size, args.num_workers, dist)
    dtype = model.backbone.tok_embeddings.weight.dtype
    amp = autocast(device, dtype)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and dtype == torch.float16 else None
    groups, weighted = data.type_groups(args.dataset), data.weighted_groups(args.dataset)

    out = Path(args.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    best_acc, best_epoch, history = 0.0, None, []
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        if dist.enabled:
            sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, loader, optimizer, epoch, args, device, amp, dist, scaler)
        rows = score_split(model, val_loader, device, amp, dist, desc=f"val {epoch}")
        val_stats = {"lr": optimizer.param_groups[0]["lr"],
                     **_ordered(accuracy_stats(rows, groups, args.batch_size, weighted_groups=weighted))}
        entry = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                 **{f"val_{k}": v for k, v in val_stats.items()}}
        history.append(entry)
        if dist.is_main:
            if val_stats["acc"] > best_acc:
                best_acc, best_epoch = val_stats["acc"], epoch
                save_checkpoint(out / "checkpoint_best.pth", {
                    "model": {k: v.cpu() for k, v in model.trainable_state_dict().items()},
                    "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "scaler": scaler.state_dict() if scaler else {}, "args": args})
                write_predictions(out / "predictions_val.jsonl", rows)
            with open(out / "log.txt", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            log.info("epoch %d: loss %.4f (vqa %.4f, vaq %.4f, qav %.4f), val acc %.4f%s [%.0fs]", epoch,
                     train_stats["loss"], train_stats["vqa_loss"], train_stats["vaq_loss"],
                     train_stats["qav_loss"], val_stats["acc"], " (best)" if best_epoch == epoch else "",
                     time.time() - t0)
    return {"best_acc": best_acc, "best_epoch": best_epoch, "log": history, "output_dir": str(out)}


def _ordered(stats: dict) -> dict:
    """The reference's key order: the per-type values, then acc."""
    acc = stats.pop("acc")
    return {**stats, "acc": acc}
