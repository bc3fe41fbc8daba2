"""``flipvqa eval``: score every option of every question of a split, report accuracy and write
``predictions_<split>.jsonl``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .engine import eval_loader, per_type_accuracy, score_split
from .runtime import autocast, build_dataset, build_model, init_distributed, load_trainable, seed_everything

log = logging.getLogger(__name__)


def write_predictions(path: Path, rows: list[dict]) -> None:
    """One JSON object per question: index (0-based position in the split file), qid (the
    dataset's own id), vid, answer, prediction, scores (mean cross-entropy per option, lower is
    better), qtype."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def evaluate(args: argparse.Namespace) -> dict:
    """Returns {"accuracy", "per_type", "n", "predictions": path or None}."""
    dist, device = init_distributed(args.device)
    seed_everything(args.seed)
    model, tokenizer = build_model(args, device)
    if args.resume:
        load_trainable(model, args.resume)
    else:
        log.warning("no --resume checkpoint: evaluating freshly initialised Flipped-VQA weights")
    dataset = build_dataset(args, tokenizer, args.split, train=False)
    amp = autocast(device, model.backbone.tok_embeddings.weight.dtype)
    rows = score_split(model, eval_loader(dataset, args.batch_size, args.num_workers, dist), device, amp, dist,
                       desc=f"eval {args.split}")
    correct = sum(r["prediction"] == r["answer"] for r in rows)
    result = {"accuracy": correct / len(rows), "per_type": per_type_accuracy(rows, args.dataset), "n": len(rows),
              "predictions": None}
    if dist.is_main and args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"predictions_{args.split}.jsonl"
        write_predictions(path, rows)
        result["predictions"] = str(path)
    return result
