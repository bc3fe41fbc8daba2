"""``flipvqa train``: the reference's training recipe, read top to bottom
(docs/faithfulness.md, "Training schedule and log"), in runs that survive being killed.

AdamW (0.9, 0.95) on the Flipped-VQA parts only, weight decay on tensors with ndim > 1,
``lr = blr * effective_batch / 256``, per-iteration warm-up then cosine, gradient accumulation,
validation after every epoch, ``checkpoint_best.pth`` by validation accuracy, ``log.txt``.
``checkpoint_last.pth`` (:mod:`flipvqa.runstate`) lets ``--resume auto`` continue a killed run
exactly where its last state was saved, mid-epoch included.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from . import data
from .checkpoints import build_model, load_checkpoint, load_trainable, run_tokenizer, save_checkpoint
from .checkpoints.trainable import expected_feature_dim, stored_args
from .data.dataset import collate
from .devices import Dist, autocast, init_distributed, seed_everything
from .errors import FlipVQAError
from .evaluate import write_predictions
from .loops import (EpochState, Hooks, NonFinite, Stop, answering, epoch_means, eval_loader, score_split,
                    train_one_epoch)
from .metrics import accuracy_stats, per_type_accuracy
from .optim import base_lr, make_optimizer
from .parallel import shard_backbone
from .runlog import RunLog
from .runstate import (BEST, LAST, PREDICTIONS, Interrupted, Progress, StopSignals, best_of, check_same_run,
                       cut_records, prepare_output_dir, progress_of, restore_rng, save_state, write_run_json)

log = logging.getLogger(__name__)


class _Skip(Sampler):
    """The first ``skip`` indices of a sampler left out: the rest of an epoch after a resume."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


def train(args: argparse.Namespace) -> dict:
    """Train; returns {"best_acc", "best_epoch", "log": [per-epoch dicts], "output_dir"}."""
    dist, device = init_distributed(args.device)
    out = Path(args.output_dir)
    resume = args.resume
    if resume == "auto":  # this folder's own state, if it has one; else a new run
        resume = str(out / LAST) if (out / LAST).is_file() else ""
    seed_everything(args.seed + dist.rank)
    # What is cheap to check comes first: the tokenizer, the data, the checkpoint file. The
    # backbone (13 GB for 7B) loads only once they are fine.
    tokenizer = run_tokenizer(args)
    ckpt = load_checkpoint(resume) if resume else None
    width = expected_feature_dim(ckpt, resume)
    train_set = data.build_dataset(args, tokenizer, "train", train=True, feature_dim=width, dist=dist)
    val_set = data.build_dataset(args, tokenizer, "val", train=False, feature_dim=width, dist=dist)
    model = build_model(args, device, tokenizer, train_set.feature_dim)
    sharded = args.fsdp and shard_backbone(model, device, dist)

    eff_batch = args.batch_size * args.accum_iter * dist.world_size
    if args.lr is None:
        args.lr = base_lr(args.blr, args.batch_size, args.accum_iter, dist.world_size)
    log.info("lr %.3e (effective batch %d); %d train / %d val questions",
             args.lr, eff_batch, len(train_set), len(val_set))
    dtype = model.backbone.tok_embeddings.weight.dtype
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and dtype == torch.float16 else None
    optimizer = make_optimizer(model, args.weight_decay, args.lr)
    prog = _restore(ckpt, resume, model, optimizer, scaler, args, dist)
    if dist.enabled:  # every rank starts from rank 0's weights (seeds differ per rank), as DDP does
        for _, p in model.trainable_parameters():
            torch_dist.broadcast(p.data, src=0)

    continued = ckpt is not None and progress_of(ckpt) is not None  # a checkpoint_last.pth state
    if dist.is_main:
        prepare_output_dir(out, fresh=prog.epoch == 0 and prog.step == 0 and not continued,
                           overwrite=args.overwrite)
        kept = cut_records(out, prog.epoch, prog.global_step)
        if not continued:  # the state does not carry this folder's best: keep the folder's own
            prog.best_acc, prog.best_epoch = best_of(kept, out)
        write_run_json(out, args)
    if dist.enabled:
        torch_dist.barrier()  # the folder is ready before any rank goes on
    if prog.epoch >= args.epochs:
        # One numbering with "resumed ... at epoch N": N is the next epoch to run (0-based).
        log.warning("nothing to train: the run resumes at epoch %d (epochs 0 to %d are done) and --epochs is %d; "
                    "give a larger --epochs to train on", prog.epoch, prog.epoch - 1, args.epochs)

    # The reference's sampler: shuffled with its default seed 0 whatever --seed is (--seed sets the
    # initial weights), the same order every epoch unless distributed.
    sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=0)
    loader_of = _loaders(train_set, sampler, args, device)
    val_loader = eval_loader(val_set, args.batch_size, args.num_workers, dist)
    amp = autocast(device, dtype)
    groups, weighted = data.type_groups(args.dataset), data.weighted_groups(args.dataset)
    type_names = data.type_names(args.dataset, data.qtypes(val_set.records))
    runlog = RunLog(out, dist.is_main, args.tensorboard, prog.global_step + 1)
    history = []

    def save(state: Optional[EpochState] = None) -> None:
        if dist.is_main:
            if state is not None:  # mid-epoch: at its last optimizer-step boundary
                prog.step, prog.sums, prog.skipped = state.at_boundary
            prog.world_size = dist.world_size
            save_state(out, model, optimizer, scaler, prog, args)

    with StopSignals() as signals:
        should_stop = _agreed(lambda: signals.requested is not None, dist, device)
        hooks = Hooks(on_update=lambda state, metrics: _on_update(state, metrics, prog, runlog, args, save),
                      should_stop=should_stop,
                      on_nonfinite=lambda state, error, batch: _on_nonfinite(state, error, batch, prog, args, save))
        try:
            for epoch in range(prog.epoch, args.epochs):
                t0 = time.time()
                if dist.enabled:
                    sampler.set_epoch(epoch)
                state = EpochState(epoch, len(loader_of(0)))
                if epoch == prog.epoch and prog.step:
                    state.step, state.sums, state.skipped = prog.step, dict(prog.sums), prog.skipped
                state.mark_boundary()
                prog.epoch = epoch
                if state.step < state.n_batches:
                    train_stats = train_one_epoch(model, loader_of(state.step), optimizer, state, args, device, amp,
                                                  dist, scaler, hooks)
                else:  # trained before the stop; its validation is what is left
                    train_stats = epoch_means(state, device, dist)
                # Under torchrun the ranks' validation batches differ in number: they cannot agree on
                # a stop in the middle, so a stop requested there waits for the epoch's end.
                rows = score_split(model, val_loader, device, amp, dist, desc=f"val {epoch}",
                                   should_stop=should_stop if not dist.enabled else lambda: False, lockstep=sharded,
                                   answering=answering(args, tokenizer))
                entry = _log_entry(train_stats, epoch, optimizer, rows, groups, weighted, args, state)
                history.append(entry)
                if dist.is_main and entry["val_acc"] > prog.best_acc:  # strictly better: ties keep the earlier
                    prog.best_acc, prog.best_epoch = entry["val_acc"], epoch
                    save_checkpoint(out / BEST, {
                        "model": {k: v.cpu() for k, v in model.trainable_state_dict().items()},
                        "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "scaler": scaler.state_dict() if scaler else {}, "args": args})
                    write_predictions(out / PREDICTIONS, rows)
                runlog.epoch(entry, per_type_accuracy(rows, type_names, groups), prog.global_step)
                prog.epoch, prog.step, prog.sums, prog.skipped = epoch + 1, 0, {}, 0
                save()
                if should_stop() and epoch + 1 < args.epochs:
                    state = EpochState(epoch + 1, state.n_batches)
                    raise Stop
                log.info("epoch %d: loss %.4f (vqa %.4f, vaq %.4f, qav %.4f), val acc %.4f%s [%.0fs]", epoch,
                         train_stats["loss"], train_stats["vqa_loss"], train_stats["vaq_loss"],
                         train_stats["qav_loss"], entry["val_acc"], " (best)" if prog.best_epoch == epoch else "",
                         time.time() - t0)
        except Stop:
            save(state)
            raise Interrupted(f"stopped by {signals.requested} at epoch {state.epoch}, batch {state.at_boundary[0]} "
                              f"of {state.n_batches}; saved {out / LAST}. Continue with the same command and "
                              f"--resume auto", signals.exit_code()) from None
        finally:
            runlog.close()
    return {"best_acc": prog.best_acc, "best_epoch": prog.best_epoch, "log": history, "output_dir": str(out)}


def _restore(ckpt: Optional[dict], path: str, model, optimizer, scaler, args, dist: Dist) -> Progress:
    """Load ``--resume``: weights; the optimizer and the next epoch when the file has them; and,
    from a ``checkpoint_last.pth``, the exact place in the run."""
    if ckpt is None:
        return Progress(world_size=dist.world_size)
    load_trainable(model, path, ckpt)
    prog = progress_of(ckpt)
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        return Progress(world_size=dist.world_size)  # weights only: a run from epoch 0
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as exc:
        raise FlipVQAError(f"{path}: its optimizer state does not fit this model ({exc})") from None
    if prog is None:
        log.info("resumed from %s at epoch %d", path, int(ckpt["epoch"]) + 1)
        return Progress(epoch=int(ckpt["epoch"]) + 1, world_size=dist.world_size)
    check_same_run(Path(path), stored_args(ckpt), args, dist.world_size, prog)
    if scaler and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt)
    log.info("resumed from %s at epoch %d, batch %d (optimizer step %d)", path, prog.epoch, prog.step,
             prog.global_step)
    return prog


def _loaders(train_set, sampler, args, device: torch.device):
    """``loader_of(skip)``: the epoch's batches without its first ``skip`` ones."""
    kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate,
              pin_memory=device.type == "cuda", drop_last=False)
    full = DataLoader(train_set, sampler=sampler, persistent_workers=args.num_workers > 0, **kw)

    def loader_of(skip: int) -> DataLoader:
        return full if skip == 0 else DataLoader(train_set, sampler=_Skip(sampler, skip * args.batch_size), **kw)

    return loader_of


def _agreed(flag, dist: Dist, device: torch.device):
    """``flag()``, the same on every rank (any rank's True)."""
    if not dist.enabled:
        return flag

    def agreed() -> bool:
        t = torch.tensor([1.0 if flag() else 0.0], device=device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    return agreed


def _on_update(state: EpochState, metrics: dict, prog: Progress, runlog: RunLog, args, save) -> None:
    prog.global_step += 1
    runlog.step(prog.global_step, state.epoch, metrics)
    if args.save_every and prog.global_step % args.save_every == 0:
        save(state)


def _on_nonfinite(state: EpochState, error: NonFinite, batch, prog: Progress, args, save) -> None:
    """Skip the batch (``--skip_nonfinite`` allows it), or save the last good state and stop."""
    questions = ", ".join(f"{r.index} (video {r.vid})" for r in batch.records[:4])
    where = f"epoch {state.epoch} step {state.step}: the loss is not finite ({', '.join(error.bad)}) for " \
            f"questions {questions}{' ...' if len(batch.records) > 4 else ''}"
    if prog.skipped_total < args.skip_nonfinite:
        prog.skipped_total += 1
        log.warning("%s; skipped (%d of --skip_nonfinite %d)", where, prog.skipped_total, args.skip_nonfinite)
        return
    save(state)
    raise FlipVQAError(f"{where}; stopping, checkpoint_last.pth keeps the last good state. Check: fp16 overflow "
                       f"(use --dtype bf16), a too high --blr/--lr, NaN in the features (flipvqa data check); "
                       f"--skip_nonfinite N skips up to N such batches")


def _log_entry(train_stats: dict, epoch: int, optimizer, rows: list[dict], groups, weighted: bool, args,
               state: EpochState) -> dict:
    """The epoch's log.txt line, with the reference's keys in its order (per-type values, then acc)."""
    stats = accuracy_stats(rows, groups, args.batch_size, weighted_groups=weighted)
    acc = stats.pop("acc")
    entry = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
             "val_lr": optimizer.param_groups[0]["lr"], **{f"val_{k}": v for k, v in stats.items()}, "val_acc": acc}
    if args.skip_nonfinite:
        entry["train_skipped_batches"] = state.skipped
    return entry
