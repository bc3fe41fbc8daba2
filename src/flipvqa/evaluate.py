"""``flipvqa eval``: score every option of every question of a split, report accuracy and write
``predictions_<split>.jsonl``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

from . import data
from .checkpoints import build_model, load_checkpoint, load_trainable, run_tokenizer
from .checkpoints.trainable import expected_feature_dim
from .devices import autocast, init_distributed, seed_everything
from .io import write_jsonl
from .loops import eval_loader, score_split
from .metrics import accuracy, per_type_accuracy
from .parallel import shard_backbone

log = logging.getLogger(__name__)


def write_predictions(path: Path, rows: list[dict]) -> None:
    """One JSON object per question: index (0-based position in the split file), qid (the
    dataset's own id), vid, answer, prediction, scores (mean cross-entropy per option, lower is
    better), qtype."""
    write_jsonl(path, rows)


def evaluate(args: argparse.Namespace, ckpt: Optional[dict] = None) -> dict:
    """Returns {"accuracy" (None for a split without answers), "per_type", "n", "predictions":
    path or None}. ``ckpt``: the ``--resume`` file's dict when it was read already."""
    dist, device = init_distributed(args.device)
    seed_everything(args.seed)
    tokenizer = run_tokenizer(args)  # cheap checks before the backbone loads
    if args.resume and ckpt is None:
        ckpt = load_checkpoint(args.resume)
    width = expected_feature_dim(ckpt, args.resume)
    dataset = data.build_dataset(args, tokenizer, args.split, train=False, feature_dim=width)
    model = build_model(args, device, tokenizer, dataset.feature_dim)
    sharded = args.fsdp and shard_backbone(model, device, dist)
    if ckpt is not None:
        load_trainable(model, args.resume, ckpt)
    else:
        log.warning("no --resume checkpoint: evaluating freshly initialised Flipped-VQA weights")
    amp = autocast(device, model.backbone.tok_embeddings.weight.dtype)
    rows = score_split(model, eval_loader(dataset, args.batch_size, args.num_workers, dist), device, amp, dist,
                       desc=f"eval {args.split}", lockstep=sharded)
    answered = all(r["answer"] is not None for r in rows)  # else a split for prediction only
    names = data.type_names(args.dataset, (r["qtype"] for r in rows))
    result = {"accuracy": accuracy(rows) if answered else None, "n": len(rows), "predictions": None,
              "per_type": per_type_accuracy(rows, names, data.type_groups(args.dataset)) if answered else {}}
    if dist.is_main and args.output_dir:
        path = Path(args.output_dir) / f"predictions_{args.split}.jsonl"
        write_predictions(path, rows)
        result["predictions"] = str(path)
    return result
