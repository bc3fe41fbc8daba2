"""``flipvqa data check``: read every split of a dataset, every line and every video's features,
and report all the problems at once instead of stopping at the first.

It encodes every question as evaluation does (each option, VQA) and, with ``--vaq``/``--qav``,
as training does, with the run's tokenizer; the backbone is never loaded. Errors (a malformed
line, an unreadable or mixed-width features file, a non-finite feature, a question that cannot
fit ``--max_seq_len``) make the exit status 2; missing features and truncation are warnings.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from .. import data
from ..config import add_run_arguments, resolve
from ..errors import FlipVQAError
from ..io import progress
from ..prompts import encode_sample, open_prompt_text, prompt_text
from . import generic, pack
from .records import load_features

# The run options the check uses (config.RunConfig's fields whose used_by has "check").
OPTIONS = ("dataset", "data_path", "model", "llama_model_path", "tokenizer_path", "max_seq_len", "max_feats",
           "sub", "vaq", "qav")

# Built-in dataset -> split -> its annotation file; a split is checked when its file exists.
SPLIT_FILES = {
    "nextqa": {s: f"{s}.csv" for s in ("train", "val", "test")},
    "star": {s: f"STAR_{s}.json" for s in ("train", "val")},
    "dramaqa": {s: f"AnotherMissOhQA_{s}_set.json" for s in ("train", "val")},
    "vlep": {"train": "vlep_train_release.jsonl", "val": "vlep_dev_release.jsonl",
             "test": "vlep_test_release.jsonl"},
    "tvqa": {s: f"tvqa_{s}.jsonl" for s in ("train", "val", "test")},
}
EXIT_ERRORS = 2  # the CLI's exit status for a user error


# ---------------------------------------------------------------------------- the command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``flipvqa data check``'s flags (``data`` takes a sub-command)."""
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    cmd = sub.add_parser("check", help="read every split and the features; report every problem",
                           description=__doc__.split("\n\n")[0].replace("``", "'"))
    add_run_arguments(cmd, "check")
    cmd.add_argument("--json", action="store_true", help="print the report as one JSON object")
    cmd.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="only warnings and errors, no progress bars")
    cmd.set_defaults(data_run=_run_check)
    pack.add_parser(sub)  # flipvqa data pack: src/flipvqa/data/pack.py


def run(ns: argparse.Namespace) -> int:
    return ns.data_run(ns)


def _run_check(ns: argparse.Namespace) -> int:
    args = resolve(argparse.Namespace(**{name: getattr(ns, name) for name in OPTIONS}))
    report = check(args)
    print(json.dumps(report) if ns.json else format_report(report, args.max_seq_len))
    return EXIT_ERRORS if report["errors"] else 0


# ---------------------------------------------------------------------------- the check
def split_names(dataset: str, root: Path) -> list[str]:
    """The splits of ``root``: a built-in dataset's whose annotation file exists, a generic
    folder's by file name."""
    if data.is_builtin(dataset):
        return [split for split, name in SPLIT_FILES[dataset].items() if (root / name).is_file()]
    return generic.splits(root)


def split_path(dataset: str, data_path: str, split: str) -> Path:
    """The annotation file of ``split``."""
    root = Path(data_path) / dataset
    if data.is_builtin(dataset):
        return root / SPLIT_FILES[dataset][split]
    return generic.split_file(root, split) or root / f"{split}.jsonl"


def check(args: argparse.Namespace) -> dict:
    """The report (``--json``'s object) of ``args.dataset`` under ``args.data_path``."""
    root = data.dataset_root(args.data_path, args.dataset)
    errors: list[str] = []
    features, feature_dim = check_features(data.features_file(args.dataset, root), errors)
    tokenizer = None
    try:
        from ..checkpoints import run_tokenizer

        tokenizer = run_tokenizer(args)
    except FlipVQAError as exc:
        errors.append(f"tokenizer: {exc} (no question was encoded)")
    splits = split_names(args.dataset, root)
    if not splits:
        expected = ", ".join(SPLIT_FILES[args.dataset].values()) if data.is_builtin(args.dataset) \
            else "{split}.jsonl or {split}.csv"
        errors.append(f"{root}: no split found (expected {expected})")
    report = {"dataset": args.dataset, "feature_dim": feature_dim, "splits": {}, "errors": errors,
              "warnings": []}
    for split in splits:
        report["splits"][split] = check_split(args, split, features, tokenizer, errors, report["warnings"])
    return report


def check_features(path: Path, errors: list[str]) -> tuple[dict, Optional[int]]:
    """Every video's features: (the features, their most common width); a missing or
    unreadable file, mixed widths and non-finite values are appended to ``errors``."""
    try:
        features = load_features(path)
    except FlipVQAError as exc:
        errors.append(str(exc))
        return {}, None
    widths = Counter(int(v.shape[1]) for v in features.values())
    if len(widths) > 1:
        by_width = {w: [vid for vid, v in features.items() if v.shape[1] == w] for w in widths}
        listed = ", ".join(f"{w}-d: {_count(len(vids), 'video')} (e.g. {vids[0]!r})" for w, vids in by_width.items())
        errors.append(f"{path}: features of mixed widths ({listed})")
    for vid, v in progress(features.items(), "checking features", enabled=len(features) >= 2000):
        finite = torch.isfinite(v)
        if not bool(finite.all()):
            errors.append(f"{path}: video {vid!r} has {_count(int((~finite).sum()), 'non-finite value')} "
                          f"(NaN or inf) in its {_count(v.shape[0], 'frame')}")
    return features, (widths.most_common(1)[0][0] if widths else None)


def check_split(args: argparse.Namespace, split: str, features: dict, tokenizer, errors: list[str],
                warnings: list[str]) -> dict:
    """One split's counts; its problems are appended to ``errors`` and ``warnings``."""
    where = f"{args.dataset} {split}"
    records: list = []
    n_errors = len(errors)
    try:
        records = data.load_split(args.data_path, args.dataset, split, args.sub, features, errors=errors)
    except FlipVQAError as exc:  # a built-in reader stops at its first problem
        errors.append(str(exc))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        errors.append(f"{split_path(args.dataset, args.data_path, split)}: a malformed entry stopped the reader "
                      f"({type(exc).__name__}: {exc})")
    lengths: list[int] = []
    truncated = 0
    train_tasks = tuple(t for t in ("vaq", "qav") if getattr(args, t))
    for rec in progress(records if tokenizer else [], f"encoding {where}", enabled=len(records) >= 2000):
        try:
            encoded = _encode(args, tokenizer, rec, train_tasks)
        except FlipVQAError as exc:
            errors.append(f"{where}: question {rec.index} (video {rec.vid}): {exc}")
            continue
        seqs = [(task, s) for task, task_seqs in encoded for s in task_seqs]
        lengths += [s.full_length or len(s.ids) for s in encoded[0][1]]
        truncated += any(s.truncated for _, s in seqs)
        if not all(s.fits(args.max_feats, task) for task, s in seqs):
            needs = max(s.full_length or len(s.ids) for _, s in seqs)
            errors.append(f"{where}: question {rec.index} (video {rec.vid}) does not fit --max_seq_len "
                          f"{args.max_seq_len}: truncation leaves it no answer or not the whole video; "
                          f"it needs --max_seq_len {needs}")
    if split == "train":  # each question without an answer, named (a few, then a count)
        unanswered = [r for r in records if not r.answered]
        errors += [f"{where}: question {r.index} (video {r.vid}) has no answer; a training question needs one"
                   for r in unanswered[:10]]
        if len(unanswered) > 10:
            errors.append(f"{where}: {len(unanswered) - 10} more questions without an answer")
    if not records and len(errors) == n_errors:
        warnings.append(f"{where}: no questions")
    missing = sorted({r.vid for r in records if r.frames is None})
    n_missing = sum(r.frames is None for r in records)
    if n_missing:
        warnings.append(f"{where}: {n_missing} of {len(records)} questions have no video features "
                        f"({_count(len(missing), 'video')}, e.g. {', '.join(missing[:5])})")
    empty = sum(r.frames is not None and r.frames.shape[0] == 0 for r in records)
    if empty:
        warnings.append(f"{where}: {empty} questions have a time window that holds no frames of their video")
    if truncated:
        warnings.append(f"{where}: {truncated} of {len(records)} questions are longer than --max_seq_len "
                        f"{args.max_seq_len} and are truncated")
    return {"questions": len(records), "videos": len({r.vid for r in records}), "missing_features": n_missing,
            "truncated": truncated,
            "multiple_choice": sum(not r.open_ended for r in records),
            "open_ended": sum(r.open_ended for r in records),
            "options": {str(k): n for k, n in sorted(Counter(len(r.options) for r in records
                                                             if not r.open_ended).items())},
            "tokens": {"p50": _percentile(lengths, 50), "p95": _percentile(lengths, 95),
                       "max": max(lengths, default=None)}}


def _encode(args: argparse.Namespace, tokenizer, rec, train_tasks: tuple[str, ...]) -> list[tuple[str, list]]:
    """[(task, sequences)]: VQA for every option (an open-ended question: its generation prompt)
    first, then the training sequences of ``train_tasks`` (questions with an answer; an
    open-ended one also its VQA sequence, which holds the whole answer)."""
    text = open_prompt_text(rec.question, rec.dialogue) if rec.open_ended else \
        prompt_text(rec.question, rec.options, rec.dialogue)
    common = (len(rec.options), args.max_feats, args.max_seq_len, args.sub)
    unanswered = "" if rec.open_ended else 0
    encoded = list(encode_sample(tokenizer, text, rec.target if rec.answered else unanswered, *common, ("vqa",),
                                 all_options=True).items())
    if rec.answered and (train_tasks or rec.open_ended):  # an open answer's own VQA sequence too
        encoded += list(encode_sample(tokenizer, text, rec.target, *common, ("vqa", *train_tasks)
                                      if rec.open_ended else train_tasks).items())
    return encoded


def _percentile(values: list[int], p: float) -> Optional[int]:
    """The nearest-rank ``p``-th percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


# ---------------------------------------------------------------------------- the readable report
def format_report(report: dict, max_seq_len: int) -> str:
    """The table of splits, the warnings, the numbered errors and a last line: OK or the count."""
    lines = [f"dataset {report['dataset']}: features "
             + (f"{report['feature_dim']}-d" if report["feature_dim"] else "none")
             + f", --max_seq_len {max_seq_len}"]
    header = ["split", "questions", "open-ended", "videos", "no features", "truncated", "tokens p50", "p95", "max",
              "options"]
    rows = [header]
    for split, s in report["splits"].items():
        tokens = ["-" if s["tokens"][k] is None else str(s["tokens"][k]) for k in ("p50", "p95", "max")]
        options = " ".join(f"{k}:{n}" for k, n in s["options"].items()) or "-"
        rows.append([split, *(str(s[k]) for k in ("questions", "open_ended", "videos", "missing_features", "truncated")),
                     *tokens, options])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    for row in rows:  # names and the histogram left-aligned, numbers right-aligned
        cells = [cell.ljust(w) if c in (0, len(row) - 1) else cell.rjust(w)
                 for c, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    if report["warnings"]:
        lines += ["", "warnings:"] + [f"  {w}" for w in report["warnings"]]
    errors = report["errors"]
    if errors:
        grouped = group_errors(errors)
        lines += ["", "errors:"] + [f"  {k:>{len(str(len(grouped)))}}. {e}" for k, e in enumerate(grouped, 1)]
    lines += ["", "OK: no errors" if not errors else _count(len(errors), "error")]
    return "\n".join(lines)


# What tells errors of one kind apart: the question (and its video) or line they name, and numbers.
_SUBJECT = re.compile(r"question \d+ \(video [^)]*\)|line \d+")
SHOWN = 3  # examples named in a grouped line


def group_errors(errors: list[str]) -> list[str]:
    """Errors of one kind (the same message but for the question, line or numbers it names) as one
    line: the first in full, then the count and a few more of its subjects. ``--json`` keeps all."""
    groups: dict[str, list[str]] = {}
    for error in errors:
        groups.setdefault(re.sub(r"\d+", "#", _SUBJECT.sub("#", error)), []).append(error)
    lines = []
    for members in groups.values():
        if len(members) <= SHOWN + 1:
            lines += members
            continue
        subjects = [m.group(0) for m in map(_SUBJECT.search, members[1:SHOWN + 1]) if m]
        also = f", e.g. {', '.join(subjects)}" if subjects else ""
        needs = [int(n) for n in re.findall(r"needs --max_seq_len (\d+)", " ".join(members))]
        if needs:  # the first one's need is not the group's
            also += f"; the longest needs --max_seq_len {max(needs)}"
        lines.append(f"{members[0]} [and {len(members) - 1} more of this kind{also}; --json lists each]")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
