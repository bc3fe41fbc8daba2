"""Datasets: one small reader per released layout, all producing :class:`Record`; shared
encoding, batching and collation in :mod:`flipvqa.data.dataset`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import FlipVQAError
from ..prompts import TASKS
from ..tokenizer import Tokenizer
from . import dramaqa, nextqa, star, tvqa, vlep
from .dataset import VQADataset
from .records import Record, feature_width, load_features

log = logging.getLogger(__name__)

READERS = {"nextqa": nextqa, "star": star, "dramaqa": dramaqa, "vlep": vlep, "tvqa": tvqa}


def build_dataset(args: argparse.Namespace, tokenizer: Tokenizer, split: str, train: bool,
                  features: dict | None = None, feature_dim: tuple[int, str] | None = None) -> VQADataset:
    """``split`` of the run's dataset, encoded: training encodes only the objectives that are
    on; evaluation scores with VQA alone. ``feature_dim``: (the width the model's projection
    takes, who says so), checked against the features."""
    records = load_split(args.data_path, args.dataset, split, args.sub, features, feature_dim)
    tasks = tuple(t for t in TASKS if t == "vqa" or getattr(args, t)) if train else ("vqa",)
    return VQADataset(records, tokenizer, n_options(args.dataset), args.max_feats, args.max_seq_len,
                      args.sub, train=train, tasks=tasks, name=f"{args.dataset} {split}")


def n_options(dataset: str) -> int:
    return reader(dataset).N_OPTIONS


def type_names(dataset: str) -> dict[int, str]:
    """Question-type code -> name, as the dataset's reader defines them ({} when it has none)."""
    return {code: name for name, code in getattr(reader(dataset), "QTYPES", {}).items()}


def type_groups(dataset: str) -> dict[str, tuple[int, ...]]:
    """The groups of question-type codes that the reference's log reports ({} for none)."""
    return getattr(reader(dataset), "GROUPS", {})


def weighted_groups(dataset: str) -> bool:
    """Whether the reference's log weights this dataset's groups by count (NExT-QA) rather than
    averaging batch accuracies (STAR); see :func:`flipvqa.metrics.accuracy_stats`."""
    return getattr(reader(dataset), "WEIGHTED_GROUPS", False)


def reader(dataset: str):
    if dataset not in READERS:
        raise FlipVQAError(f"unknown dataset {dataset!r}; known: {', '.join(READERS)}")
    return READERS[dataset]


def load_split(data_path: str | Path, dataset: str, split: str, sub: bool = False,
               features: dict | None = None, feature_dim: tuple[int, str] | None = None) -> list[Record]:
    """Read ``<data_path>/<dataset>/`` for ``split`` into records, with their raw frame features.
    ``feature_dim``: (expected width, who expects it), checked against the features file."""
    module = reader(dataset)
    root = Path(data_path) / dataset
    if not root.is_dir():
        raise FlipVQAError(f"{root}: dataset folder not found (--data_path holds <dataset>/ folders)")
    path = root / "clipvitl14.pth"
    if features is None:
        features = load_features(path)
    width = feature_width(features, path)
    if feature_dim is not None and width is not None and width != feature_dim[0]:
        raise FlipVQAError(f"{path}: the features are {width}-d, but {feature_dim[1]} takes "
                           f"{feature_dim[0]}-d frame features")
    records = module.read(root, split, features, sub)
    if not records:
        raise FlipVQAError(f"{root}: the {split} split has no questions")
    missing = [r.vid for r in records if r.frames is None]
    if missing:
        log.warning("%s %s: %d of %d questions have no video features (a zero feature is used), e.g. %s",
                    dataset, split, len(missing), len(records), ", ".join(sorted(set(missing))[:5]))
    no_subs = [r.vid for r in records if r.subtitles_missing]
    if no_subs:
        log.warning("%s %s: %d questions have no subtitles file/entry (empty dialogue), e.g. %s",
                    dataset, split, len(no_subs), ", ".join(sorted(set(no_subs))[:5]))
    return records


__all__ = ["READERS", "Record", "build_dataset", "load_split", "n_options", "reader", "type_groups", "type_names",
           "weighted_groups"]
