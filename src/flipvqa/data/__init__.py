"""Datasets: one small reader per released layout and the generic format
(:mod:`flipvqa.data.generic`, any other ``--dataset`` name), all producing :class:`Record`;
shared encoding, batching and collation in :mod:`flipvqa.data.dataset`."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from torch import Tensor

from ..devices import Dist
from ..errors import FlipVQAError
from ..prompts import TASKS
from ..tokenizer import Tokenizer
from . import dramaqa, generic, nextqa, star, tvqa, vlep
from .cache import FOLDER as CACHE_FOLDER
from .cache import CachePlace, Kind, cached, digest, records_key
from .dataset import VQADataset
from .records import FEATURE_DIM, Record, feature_width, load_features
from .table import RecordTable

log = logging.getLogger(__name__)

READERS = {"nextqa": nextqa, "star": star, "dramaqa": dramaqa, "vlep": vlep, "tvqa": tvqa}


def build_dataset(args: argparse.Namespace, tokenizer: Tokenizer, split: str, train: bool,
                  features: dict | None = None, feature_dim: tuple[int, str] | None = None,
                  dist: Dist | None = None) -> VQADataset:
    """``split`` of the run's dataset, encoded: training encodes only the objectives that are
    on; evaluation scores with VQA alone. ``feature_dim``: (the width the model's projection
    takes, who says so), checked against the features; None takes the features' own width.
    The encoding is cached in the dataset's folder (else under --output_dir); ``dist``: under
    torchrun, rank 0 encodes and the other ranks read its cache."""
    root = dataset_root(args.data_path, args.dataset)
    path = features_file(args.dataset, root)
    if features is None:
        features = load_features(path)
    path = getattr(features, "path", path)  # the packed store, where that was read
    width = feature_width(features, path)
    if feature_dim is not None and width is not None and width != feature_dim[0]:
        raise FlipVQAError(f"{path}: the features are {width}-d, but {feature_dim[1]} takes "
                           f"{feature_dim[0]}-d frame features")
    output = getattr(args, "output_dir", "")
    folders = [root / CACHE_FOLDER] + ([Path(output) / CACHE_FOLDER] if output else [])
    records = load_split(args.data_path, args.dataset, split, args.sub, features,
                         place=CachePlace(folders, f"{split}-records", dist or Dist()))
    tasks = tuple(t for t in TASKS if t == "vqa" or getattr(args, t)) if train else ("vqa",)
    cache = CachePlace(folders, f"{split}-{'train' if train else 'eval'}", dist or Dist())
    return VQADataset(records, tokenizer, n_options(args.dataset), args.max_feats, args.max_seq_len,
                      args.sub, train=train, tasks=tasks, name=f"{args.dataset} {split}",
                      feature_dim=width or (feature_dim[0] if feature_dim else FEATURE_DIM), cache=cache)


def is_builtin(dataset: str) -> bool:
    return dataset in READERS


def reader(dataset: str):
    """The reader module of a built-in dataset, else the generic format's."""
    return READERS.get(dataset, generic)


def n_options(dataset: str) -> int | None:
    """The option count of a built-in dataset; None for the generic format (each question's own)."""
    return getattr(reader(dataset), "N_OPTIONS", None)


def type_names(dataset: str, qtypes: Iterable = ()) -> dict:
    """Question-type code -> name: as a built-in reader defines them, or a generic dataset's own
    type names (those among ``qtypes``); {} when there are none."""
    if is_builtin(dataset):
        return {code: name for name, code in getattr(reader(dataset), "QTYPES", {}).items()}
    return {t: t for t in sorted({q for q in qtypes if isinstance(q, str)})}


def type_groups(dataset: str) -> dict[str, tuple[int, ...]]:
    """The groups of question-type codes that the reference's log reports ({} for none)."""
    return getattr(reader(dataset), "GROUPS", {})


def weighted_groups(dataset: str) -> bool:
    """Whether the reference's log weights this dataset's groups by count (NExT-QA) rather than
    averaging batch accuracies (STAR); see :func:`flipvqa.metrics.accuracy_stats`."""
    return getattr(reader(dataset), "WEIGHTED_GROUPS", False)


def dataset_root(data_path: str | Path, dataset: str) -> Path:
    """``<data_path>/<dataset>/``; a name that is neither built in nor a folder there is an error."""
    root = Path(data_path) / dataset
    if not Path(data_path).is_dir():
        raise FlipVQAError(f"{data_path}: --data_path folder not found (it holds one folder per dataset: "
                           f"{Path(data_path) / dataset}/ for --dataset {dataset})")
    if not root.is_dir():
        if not is_builtin(dataset):
            raise FlipVQAError(f"unknown dataset {dataset!r}: not one of the built-in {', '.join(READERS)}, "
                               f"and {root} is not a folder in the generic format")
        raise FlipVQAError(f"{root}: dataset folder not found (--data_path holds <dataset>/ folders)")
    return root


def features_file(dataset: str, root: Path) -> Path:
    """Where a dataset's frame features are: ``clipvitl14.pth`` for the built-in ones, the
    generic format's ``features.pth`` (else ``clipvitl14.pth``)."""
    return root / "clipvitl14.pth" if is_builtin(dataset) else generic.features_file(root)


def load_split(data_path: str | Path, dataset: str, split: str, sub: bool = False,
               features: Mapping[str, Tensor] | None = None, errors: list[str] | None = None,
               place: CachePlace | None = None) -> Sequence[Record]:
    """Read ``<data_path>/<dataset>/`` for ``split`` into records, with their raw frame features.
    ``errors`` (generic format): collect malformed lines there instead of stopping at the first.
    ``place`` (generic format): keep the records as a :class:`RecordTable` cached there."""
    root = dataset_root(data_path, dataset)
    if features is None:
        features = load_features(features_file(dataset, root))
    if is_builtin(dataset):
        records = READERS[dataset].read(root, split, features, sub)
    elif place is not None and errors is None:
        records = _cached_table(root, split, sub, features, place, f"{dataset} {split}")
    else:
        records = generic.read(root, split, features, sub, errors)
    if not records and errors is None:
        raise FlipVQAError(f"{root}: the {split} split has no questions")
    tabled = isinstance(records, RecordTable)
    missing = records.missing_features() if tabled else [r.vid for r in records if r.frames is None]
    if missing:
        log.warning("%s %s: %d of %d questions have no video features (a zero feature is used), e.g. %s",
                    dataset, split, len(missing), len(records), ", ".join(sorted(set(missing))[:5]))
    no_subs = records.missing_subtitles() if tabled else [r.vid for r in records if r.subtitles_missing]
    if no_subs:
        log.warning("%s %s: %d questions have no subtitles file/entry (empty dialogue), e.g. %s",
                    dataset, split, len(no_subs), ", ".join(sorted(set(no_subs))[:5]))
    return records


def _cached_table(root: Path, split: str, sub: bool, features: Mapping[str, Tensor], place: CachePlace,
                  name: str) -> RecordTable:
    """The split's records as a table, read from the cache (keyed by the annotation file's
    bytes, the subtitles, the options and the reading code), else parsed and cached."""
    key = records_key(root, split, sub)
    kind = Kind(".rec", "records", "reading the questions again", lambda table, path, meta: table.write(path, meta),
                lambda path, verify: RecordTable.load(path, features, verify))
    return cached(place, key, kind, lambda: generic.read_table(root, split, features, sub, digest(key)), name)


def qtypes(records: Sequence[Record]) -> set:
    """The distinct question types of ``records``."""
    return records.qtypes() if isinstance(records, RecordTable) else {r.qtype for r in records}


__all__ = ["READERS", "Record", "build_dataset", "load_split", "n_options", "reader", "type_groups", "type_names",
           "weighted_groups"]
