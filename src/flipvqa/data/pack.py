"""``flipvqa data pack``: a features ``.pth`` as a packed store (:mod:`flipvqa.data.store`), and
``--merge``: the parts of a sharded ``extract-features`` (or any stores) as one.

``flipvqa data pack clipvitl14.pth`` writes ``clipvitl14.safetensors`` beside it, which the dataset
readers then open instead of the ``.pth``; the encoder recorded in ``clipvitl14.pth.json`` goes
into the store. ``flipvqa data pack --merge OUT.parts/ --output OUT.safetensors`` merges the
parts (folders stand for the ``.safetensors`` files in them) sorted by video id; parts that
disagree on width, dtype or encoder, or hold one video with different frames, are refused.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import FlipVQAError
from ..io import save_torch
from . import store
from .records import load_pth
from .sidecar import read_record, write_record

Source = tuple[str, Mapping[str, Tensor], dict[str, Any]]  # (its name, its videos, its encoder record)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``flipvqa data pack``'s flags, as a sub-command of ``flipvqa data``."""
    cmd = sub.add_parser("pack", help="write a features .pth as a packed, memory-mapped store; merge parts",
                         description="Write a features .pth as a packed store beside it (one memory-mapped "
                                     "file that the dataset readers open in milliseconds), or, with --merge, "
                                     "join packed parts into one store.")
    cmd.add_argument("features", nargs="+", metavar="FEATURES",
                     help="a features .pth; with --merge: packed parts, or folders of them")
    cmd.add_argument("--output", default=None,
                     help="the store to write (default: FEATURES with .safetensors for .pth); needed with --merge")
    cmd.add_argument("--merge", action="store_true", help="merge the given parts into --output, sorted by video id")
    cmd.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                     help="only warnings and errors, no progress bars")
    cmd.set_defaults(data_run=run)


def run(ns: argparse.Namespace) -> int:
    if ns.merge:
        if not ns.output:
            raise FlipVQAError("data pack --merge: name the merged store with --output")
        output, count = Path(ns.output), merge(part_files(ns.features), ns.output)
    elif len(ns.features) != 1:
        raise FlipVQAError(f"data pack: one features file at a time (got {len(ns.features)}); to merge "
                           "packed parts, add --merge")
    else:
        output = pack(ns.features[0], ns.output)
        count = len(store.open_store(output))
    print(f"{output}: {count} videos")
    return 0


def pack(source: str | Path, output: Optional[str | Path] = None) -> Path:
    """Write the ``.pth`` ``source`` as a packed store (by default beside it, same stem), in the
    ``.pth``'s own video order; returns the store's path."""
    source = Path(source)
    if store.is_packed(source):
        raise FlipVQAError(f"{source}: already a packed store")
    target = Path(output) if output else store.packed_path(source)
    _check_name(target)
    features = load_pth(source)  # not load_features: that would prefer an existing store
    store.write_store(target, features, encoder=read_record(source) or {}, name=str(source))
    store.open_store(target)  # read back what was written: a bad disk fails here, not in training
    return target


def part_files(specs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders as the packed stores in them (a temporary file of an interrupted
    write is hidden and ends in .tmp: never taken)."""
    files: list[Path] = []
    for spec in map(Path, specs):
        if spec.is_dir():
            found = sorted(spec.glob(f"*{store.SUFFIX}"))
            if not found:
                raise FlipVQAError(f"{spec}: folder holds no packed parts (*{store.SUFFIX})")
            files += found
        elif spec.is_file():
            files.append(spec)
        else:
            raise FlipVQAError(f"{spec}: no such file or folder")
    return files


def open_source(path: Path) -> Source:
    """A part to merge: a packed store, or a ``.pth`` with the record of its sidecar."""
    if store.is_packed(path):
        opened = store.open_store(path)
        return str(path), opened, opened.encoder
    return str(path), load_pth(path), read_record(path) or {}


def merge(parts: Sequence[Path | Source], output: str | Path) -> int:
    """Merge ``parts`` (paths, or already opened sources) into ``output`` (a packed store, or a
    ``.pth`` with its sidecar), sorted by video id; returns the video count."""
    sources = [p if isinstance(p, tuple) else open_source(Path(p)) for p in parts]
    encoder = agreed(sources)
    union: dict[str, Tensor] = {}
    owner: dict[str, str] = {}
    for name, videos, _ in sources:
        for vid in videos:
            frames = videos[vid]
            if vid in union:  # the same video twice: fine only if it is the very same frames
                if frames.shape != union[vid].shape or not torch.equal(frames, union[vid]):
                    raise FlipVQAError(f"{name}: video {vid!r} is also in {owner[vid]}, with other frames; "
                                       "merge refused: remove one of them")
                continue
            union[vid], owner[vid] = frames, name
    output = Path(output)
    order = sorted(union)
    if store.is_packed(output):
        store.write_store(output, union, order, encoder=encoder, name=", ".join(n for n, _, _ in sources),
                          desc="merge")
    else:
        if encoder:  # the sidecar first: features never stand without their record
            write_record(output, encoder)
        save_torch(output, {vid: union[vid].clone() for vid in order})  # clone: no view of a whole part
    return len(order)


def agreed(sources: Sequence[Source]) -> dict[str, Any]:
    """The encoder record the sources share ({} if none has one); different widths, dtypes or
    encoders are refused, naming the two files."""
    first_shape: Optional[tuple[str, int, torch.dtype]] = None
    first_record: Optional[tuple[str, dict[str, Any]]] = None
    for name, videos, record in sources:
        sample = next(iter(videos.values()), None)
        if sample is not None:
            shape = (name, int(sample.shape[-1]), sample.dtype)
            first_shape = first_shape or shape
            if shape[1:] != first_shape[1:]:
                raise FlipVQAError(f"{name}: {shape[1]}-d {shape[2]} features, but {first_shape[0]} has "
                                   f"{first_shape[1]}-d {first_shape[2]}; merge refused (another encoder?)")
        if record:
            first_record = first_record or (name, record)
            if record != first_record[1]:
                differ = sorted(k for k in {**record, **first_record[1]} if record.get(k) != first_record[1].get(k))
                raise FlipVQAError(f"{name}: made with another encoder than {first_record[0]} (they differ in "
                                   f"{', '.join(differ)}); merge refused")
    return dict(first_record[1]) if first_record else {}


def _check_name(target: Path) -> None:
    if not store.is_packed(target):
        raise FlipVQAError(f"{target}: a packed store's name ends in {store.SUFFIX} (the readers look for "
                           f"the .pth's name with {store.SUFFIX} in place of .pth)")
