"""``flipvqa eval``: score every option of every question of a split, report accuracy and write
``predictions_<split>.jsonl``."""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Optional

from . import data
from .checkpoints import build_model, load_checkpoint, load_trainable, run_tokenizer
from .checkpoints.trainable import expected_feature_dim
from .devices import autocast, init_distributed, seed_everything
from .errors import FlipVQAError
from .io import write_jsonl
from .loops import answering, eval_loader, score_split
from .metrics import accuracy, per_type_accuracy
from .openended import load_wordnet, summarize
from .parallel import shard_backbone

log = logging.getLogger(__name__)


def write_predictions(path: Path, rows: list[dict]) -> None:
    """One JSON object per question: index (0-based position in the split file), qid (the
    dataset's own id), vid, answer, prediction, qtype; a multiple-choice question adds scores
    (mean cross-entropy per option, lower is better), an open-ended one has the answer's text as
    prediction, the acceptable answers as answer, correct (exact match) and cut (ended by
    --max_new_tokens)."""
    write_jsonl(path, rows)


@functools.cache
def _wordnet():
    """WordNet, read once per process (about 3 s; training validates every epoch)."""
    return load_wordnet()


def open_ended_summary(rows: list[dict]) -> dict | None:
    """Exact match, token F1 and WUPS of the open-ended questions, and how many answers
    --max_new_tokens cut (None when there are none)."""
    open_rows = [r for r in rows if "correct" in r]
    if not open_rows:
        return None
    answered = [r for r in open_rows if r["answer"] is not None]
    summary = {"n": len(open_rows), "cut": sum(r["cut"] for r in open_rows)}
    if answered:
        wordnet = _wordnet()
        if wordnet is None:
            log.warning("WordNet not found: WUPS is not computed (apt install wordnet-base, or "
                        "python -m nltk.downloader wordnet; pip install 'flipvqa[oe]')")
        summary.update(summarize(answered, wordnet))
    return summary


def check_outputs(args: argparse.Namespace, has_checkpoint: bool) -> None:
    """Before anything loads: scoring untrained weights must be asked for, and an earlier
    run's or evaluation's predictions are not replaced silently."""
    if not has_checkpoint and not args.untrained:
        raise FlipVQAError("no --resume checkpoint: give the checkpoint to evaluate, or --untrained to score "
                           "freshly initialised Flipped-VQA weights (a baseline, not a trained model)")
    path = Path(args.output_dir) / f"predictions_{args.split}.jsonl" if args.output_dir else None
    if path is not None and path.exists() and not args.overwrite:
        raise FlipVQAError(f"{path} exists (a finished run's or an earlier evaluation's predictions): pass "
                           f"--overwrite to replace it, or choose another --output_dir")


def evaluate(args: argparse.Namespace, ckpt: Optional[dict] = None) -> dict:
    """Returns {"accuracy" (None for a split without answers), "per_type", "n", "predictions":
    path or None, "open_ended": :func:`open_ended_summary`}. ``ckpt``: the ``--resume`` file's dict when it was read already."""
    check_outputs(args, has_checkpoint=bool(args.resume) or ckpt is not None)
    dist, device = init_distributed(args.device)
    seed_everything(args.seed)
    tokenizer = run_tokenizer(args)  # cheap checks before the backbone loads
    if args.resume and ckpt is None:
        ckpt = load_checkpoint(args.resume)
    width = expected_feature_dim(ckpt, args.resume)
    dataset = data.build_dataset(args, tokenizer, args.split, train=False, feature_dim=width, dist=dist)
    model = build_model(args, device, tokenizer, dataset.feature_dim)
    sharded = args.fsdp and shard_backbone(model, device, dist)
    if ckpt is not None:
        load_trainable(model, args.resume, ckpt)
    else:
        log.warning("--untrained: evaluating freshly initialised Flipped-VQA weights")
    amp = autocast(device, model.backbone.tok_embeddings.weight.dtype)
    rows = score_split(model, eval_loader(dataset, args.batch_size, args.num_workers, dist), device, amp, dist,
                       desc=f"eval {args.split}", lockstep=sharded, answering=answering(args, tokenizer))
    answered = all(r["answer"] is not None for r in rows)  # else a split for prediction only
    names = data.type_names(args.dataset, (r["qtype"] for r in rows))
    result = {"accuracy": accuracy(rows) if answered else None, "n": len(rows), "predictions": None,
              "per_type": per_type_accuracy(rows, names, data.type_groups(args.dataset)) if answered else {},
              "open_ended": open_ended_summary(rows) if dist.is_main else None}
    if result["open_ended"] and result["open_ended"]["cut"]:
        log.warning("%d open-ended answers were cut by --max_new_tokens %d", result["open_ended"]["cut"],
                    args.max_new_tokens)
    if dist.is_main and args.output_dir:
        path = Path(args.output_dir) / f"predictions_{args.split}.jsonl"
        write_predictions(path, rows)
        result["predictions"] = str(path)
    return result
