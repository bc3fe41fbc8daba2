"""Datasets: one small reader per released layout, all producing :class:`Record`; shared
encoding, batching and collation in :mod:`flipvqa.data.dataset`."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import FlipVQAError
from . import dramaqa, nextqa, star, tvqa, vlep
from .records import Record, load_features

log = logging.getLogger(__name__)

READERS = {"nextqa": nextqa, "star": star, "dramaqa": dramaqa, "vlep": vlep, "tvqa": tvqa}


def n_options(dataset: str) -> int:
    return reader(dataset).N_OPTIONS


def reader(dataset: str):
    if dataset not in READERS:
        raise FlipVQAError(f"unknown dataset {dataset!r}; known: {', '.join(READERS)}")
    return READERS[dataset]


def load_split(data_path: str | Path, dataset: str, split: str, sub: bool = False,
               features: dict | None = None) -> list[Record]:
    """Read ``<data_path>/<dataset>/`` for ``split`` into records, with their raw frame features."""
    module = reader(dataset)
    root = Path(data_path) / dataset
    if not root.is_dir():
        raise FlipVQAError(f"{root}: dataset folder not found (--data_path holds <dataset>/ folders)")
    if features is None:
        features = load_features(root / "clipvitl14.pth")
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


__all__ = ["READERS", "Record", "load_split", "n_options", "reader"]
