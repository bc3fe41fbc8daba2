"""The packed feature store: every video's frame features in one memory-mapped file.

A features ``.pth`` (``torch.save`` of {video id: [frames, width]}) is unpickled whole before any
frame is read: for 60,000 videos that is half a minute. The packed store holds the same tensors
in one file that opens in milliseconds and reads, through the page cache, only the frames used.

It is a `safetensors <https://huggingface.co/docs/safetensors>`_ file named after the ``.pth``
(``clipvitl14.pth`` -> ``clipvitl14.safetensors``): an 8-byte little-endian header length, a JSON
header, then three tensors, back to back:

* ``offsets`` int64 [videos]: the first row of each video in ``frames``;
* ``counts`` int64 [videos]: its frame count (0 is allowed);
* ``frames`` [rows, width], float16 (bfloat16/float32/float64 also): all videos' frames.

The header's ``__metadata__`` holds ``format`` (:data:`FORMAT`), ``version``, ``videos`` (a JSON
list of the ids, in the order of ``offsets``/``counts``), ``width`` and ``encoder`` (a JSON
object: what extract-features records about its encoder, ``{}`` when unknown). Any safetensors
reader can open it; :func:`open_store` reads it with numpy instead, so that each video is a tensor
of its own small storage (pickling one video, as a DataLoader may, copies that video only).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import FlipVQAError
from ..io import progress, write_atomic

log = logging.getLogger(__name__)

FORMAT = "flipvqa-packed-features"
VERSION = "1"
SUFFIX = ".safetensors"
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
# safetensors dtype -> (torch dtype, how numpy maps it); numpy has no bfloat16: its bits as uint16
DTYPES = {"F16": (torch.float16, "<f2"), "BF16": (torch.bfloat16, "<u2"),
          "F32": (torch.float32, "<f4"), "F64": (torch.float64, "<f8")}
CODES = {dtype: code for code, (dtype, _) in DTYPES.items()}
TENSORS = ("offsets", "counts", "frames")  # in file order: the int64 index first keeps frames aligned


def is_packed(path: str | os.PathLike) -> bool:
    return Path(path).suffix == SUFFIX


def packed_path(path: str | os.PathLike) -> Path:
    """The packed store that stands for the features file ``path``: same folder, same stem."""
    return Path(path).with_suffix(SUFFIX)


def preferred(path: str | os.PathLike) -> Path:
    """The file to read for the features ``path``: its packed store when there is one, unless the
    ``.pth`` was written after it (then the ``.pth``, with a warning: the store is stale)."""
    path = Path(path)
    packed = packed_path(path)
    if is_packed(path) or not packed.is_file():
        return path
    if path.is_file() and path.stat().st_mtime > packed.stat().st_mtime:
        log.warning("%s is newer than its packed store %s: reading the .pth (refresh the store with "
                    "'flipvqa data pack %s')", path, packed.name, path)
        return path
    return packed


# ---------------------------------------------------------------------------- reading
class PackedFeatures(Mapping[str, Tensor]):
    """A packed store as the {video id: [frames, width]} mapping the dataset readers take. The
    frames stay on disk until used; pickling it pickles its path (a DataLoader worker reopens it)."""

    def __init__(self, path: Path, videos: list[str], offsets: np.ndarray, counts: np.ndarray,
                 frames: np.ndarray, dtype: torch.dtype, encoder: dict[str, Any], stamp: tuple[int, int]):
        self.path, self.dtype, self.encoder, self.width = path, dtype, encoder, int(frames.shape[1])
        self._videos, self._offsets, self._counts, self._frames = videos, offsets, counts, frames
        self._row = {vid: i for i, vid in enumerate(videos)}
        self._stamp = stamp

    def __getitem__(self, vid: str) -> Tensor:
        # A new view on every call, never kept: keeping one per video (tried) raised the anonymous
        # memory of `flipvqa eval` on 30 K questions by 700 MB, for reasons not pinned down; a
        # view made here lives for one batch.
        i = self._row[vid]
        start = int(self._offsets[i])
        # from_numpy of a slice: a tensor whose storage is this video's rows of the memory map
        tensor = torch.from_numpy(self._frames[start:start + int(self._counts[i])])
        return tensor.view(self.dtype) if tensor.dtype != self.dtype else tensor

    def __contains__(self, vid: object) -> bool:
        return vid in self._row

    def __iter__(self) -> Iterator[str]:
        return iter(self._videos)

    def __len__(self) -> int:
        return len(self._videos)

    @property
    def rows(self) -> int:
        return int(self._frames.shape[0])

    def __reduce__(self) -> tuple:
        return _reopen, (str(self.path), self._stamp)

    def __repr__(self) -> str:
        return f"PackedFeatures({str(self.path)!r}: {len(self)} videos, {self.rows} x {self.width} {self.dtype})"


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _reopen(path: str, stamp: tuple[int, int]) -> PackedFeatures:
    """Unpickling: open the file again, refusing one that changed since it was first opened."""
    store = open_store(path)
    if store._stamp != tuple(stamp):
        raise FlipVQAError(f"{path}: the packed store changed after it was opened; restart the run")
    return store


def open_store(path: str | os.PathLike) -> PackedFeatures:
    """Open and check a packed store; anything inconsistent is one line naming the file."""
    path = Path(path)
    header, data_start, size = _read_header(path)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FlipVQAError(f"{path}: a safetensors file, but not a packed feature store (no "
                           f"'{FORMAT}' in its metadata); write one with flipvqa data pack")
    if meta.get("version") != VERSION:
        raise FlipVQAError(f"{path}: packed store version {meta.get('version')!r}; this flipvqa reads "
                           f"version {VERSION} (pack the .pth again)")
    specs = {name: _spec(path, header, name) for name in TENSORS}
    _check_extent(path, specs, size - data_start)
    videos, width, encoder = _metadata(path, meta)
    (n_off,), (n_cnt,) = specs["offsets"][1], specs["counts"][1]
    offsets = _read_array(path, data_start + specs["offsets"][2], n_off)
    counts = _read_array(path, data_start + specs["counts"][2], n_cnt)
    code, shape, start, _ = specs["frames"]
    if len(shape) != 2 or shape[1] != width:
        raise FlipVQAError(f"{path}: its index says the frames are {width}-d, but the frames tensor is "
                           f"{'x'.join(map(str, shape))}; the file is damaged, pack it again")
    _check_index(path, videos, offsets, counts, shape[0])
    dtype, np_dtype = DTYPES[code]
    if shape[0] * shape[1] == 0:  # mmap cannot map 0 bytes
        frames = np.empty(shape, np_dtype)
    else:  # "c": copy-on-write, so tensors are writable (torch wants that) and the file never changes
        frames = np.memmap(path, dtype=np_dtype, mode="c", offset=data_start + start, shape=tuple(shape))
    return PackedFeatures(path, videos, offsets, counts, frames, dtype, encoder, _stamp(path))


def _read_header(path: Path) -> tuple[dict, int, int]:
    """(the JSON header, where the data starts, the file's size)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > MAX_HEADER or 8 + n > size:
                raise FlipVQAError(f"{path}: truncated or not a packed feature store ({size} bytes; its first "
                                   f"8 bytes give no header that fits); pack or copy it again")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise FlipVQAError(f"{path}: packed features file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FlipVQAError(f"{path}: not a packed feature store (its header is not JSON); pack or copy it "
                           "again") from None
    except OSError as exc:
        raise FlipVQAError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(header, dict):
        raise FlipVQAError(f"{path}: not a packed feature store (its header is not a JSON object)")
    return header, 8 + n, size


def _spec(path: Path, header: dict, name: str) -> tuple[str, list[int], int, int]:
    """One tensor's (dtype, shape, start, end) from the header, checked against itself."""
    entry = header.get(name)
    want = ("I64",) if name != "frames" else tuple(DTYPES)
    ok = isinstance(entry, dict) and entry.get("dtype") in want and _ints(entry.get("shape")) \
        and _ints(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2
    if not ok:
        raise FlipVQAError(f"{path}: its header has no valid '{name}' tensor ({'/'.join(want)}); "
                           "the file is damaged, pack it again")
    (start, end), shape = entry["data_offsets"], entry["shape"]
    itemsize = 8 if name != "frames" else np.dtype(DTYPES[entry["dtype"]][1]).itemsize
    if end - start != int(np.prod(shape, dtype=np.int64)) * itemsize or (name != "frames" and len(shape) != 1):
        raise FlipVQAError(f"{path}: its header gives '{name}' {end - start} bytes for shape {shape}; the "
                           "file is damaged, pack it again")
    return entry["dtype"], shape, start, end


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                           for v in value)


def _check_extent(path: Path, specs: dict[str, tuple], data_size: int) -> None:
    """The three tensors tile the data exactly: a shorter file is truncated, overlaps are damage."""
    spans = sorted((start, end) for _, _, start, end in specs.values())
    if spans[0][0] != 0 or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise FlipVQAError(f"{path}: its tensors overlap or leave gaps; the file is damaged, pack it again")
    wanted = spans[-1][1]
    if data_size < wanted:
        raise FlipVQAError(f"{path}: truncated: {data_size} bytes of data where its header describes "
                           f"{wanted} (a copy or pack that did not finish?); pack or copy it again")
    if data_size > wanted:
        raise FlipVQAError(f"{path}: {data_size - wanted} bytes more than its header describes; the file "
                           "is damaged, pack it again")


def _metadata(path: Path, meta: dict) -> tuple[list[str], int, dict[str, Any]]:
    """(the video ids, the width, the encoder record) from the header's metadata."""
    try:
        videos, width, encoder = json.loads(meta["videos"]), int(meta["width"]), json.loads(meta["encoder"])
    except (KeyError, TypeError, ValueError):
        raise FlipVQAError(f"{path}: its metadata lacks a valid videos/width/encoder; pack it again") from None
    if not isinstance(videos, list) or not all(isinstance(v, str) for v in videos) or not isinstance(encoder, dict):
        raise FlipVQAError(f"{path}: its metadata's videos are not a list of ids; pack it again")
    if len(set(videos)) != len(videos):
        raise FlipVQAError(f"{path}: its index lists a video twice; pack it again")
    dim = encoder.get("feature_dim")
    if dim is not None and dim != width:
        raise FlipVQAError(f"{path}: its encoder gives {dim}-d features but the index says {width}-d; pack it again")
    return videos, width, encoder


def _read_array(path: Path, offset: int, count: int) -> np.ndarray:
    return np.fromfile(path, dtype="<i8", count=count, offset=offset).astype(np.int64)


def _check_index(path: Path, videos: list[str], offsets: np.ndarray, counts: np.ndarray, rows: int) -> None:
    """Each video's rows lie inside the frames, and together they cover every row exactly once."""
    if not len(videos) == len(offsets) == len(counts):
        raise FlipVQAError(f"{path}: its index lists {len(videos)} videos but has {len(offsets)} offsets and "
                           f"{len(counts)} counts; pack it again")
    ends = offsets + counts
    beyond = np.flatnonzero((offsets < 0) | (counts < 0) | (ends > rows))
    if beyond.size:
        i = int(beyond[0])
        raise FlipVQAError(f"{path}: video {videos[i]!r} is at rows {offsets[i]}..{ends[i]}, beyond the {rows} "
                           "rows of frames; the index and the frames disagree, pack it again")
    order = np.lexsort((counts, offsets))  # by offset; an empty video before a full one at its offset
    starts, stops = offsets[order], ends[order]
    prev = np.concatenate([[0], stops[:-1]])
    wrong = np.flatnonzero(starts != prev)
    if wrong.size:
        k = int(wrong[0])
        what = f"rows {prev[k]}..{starts[k]} belong to no video" if starts[k] > prev[k] else \
            f"videos {videos[order[k - 1]]!r} and {videos[order[k]]!r} share rows"
        raise FlipVQAError(f"{path}: {what}; the index and the frames disagree, pack it again")
    covered = int(stops[-1]) if len(stops) else 0
    if covered != rows:
        raise FlipVQAError(f"{path}: rows {covered}..{rows} belong to no video; the index and the frames "
                           "disagree, pack it again")


# ---------------------------------------------------------------------------- writing
def write_store(path: str | os.PathLike, source: Mapping[str, Tensor], order: Optional[Sequence[str]] = None,
                encoder: Optional[dict[str, Any]] = None, name: str = "", desc: str = "pack") -> None:
    """Write ``source``'s videos (in ``order``, by default its own) as a packed store, atomically: a
    temporary file in the same folder renamed over ``path``, so readers never see half a store.
    ``name`` names the source in errors (a file, usually)."""
    order = list(source) if order is None else list(order)
    encoder = dict(encoder or {})
    counts, width, dtype = _layout(source, order, name or str(path), encoder.get("feature_dim", 0))
    if encoder.get("feature_dim", width) != width:
        raise FlipVQAError(f"{name or path}: its encoder record says {encoder['feature_dim']}-d features, "
                           f"the tensors are {width}-d; fix or remove the record")
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)[:-1]]) if counts else np.zeros(0, np.int64)
    rows, itemsize = int(sum(counts)), torch.tensor([], dtype=dtype).element_size()
    index_bytes = 8 * len(order)
    header = {"__metadata__": {"format": FORMAT, "version": VERSION, "videos": json.dumps(order),
                               "width": str(width), "encoder": json.dumps(encoder)},
              "offsets": {"dtype": "I64", "shape": [len(order)], "data_offsets": [0, index_bytes]},
              "counts": {"dtype": "I64", "shape": [len(order)], "data_offsets": [index_bytes, 2 * index_bytes]},
              "frames": {"dtype": CODES[dtype], "shape": [rows, width],
                         "data_offsets": [2 * index_bytes, 2 * index_bytes + rows * width * itemsize]}}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header so that the data is 8-byte aligned

    def write(f) -> None:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.write(np.asarray(offsets, "<i8").tobytes() + np.asarray(counts, "<i8").tobytes())
        for vid in progress(order, desc, enabled=len(order) >= 1000, unit="video"):
            f.write(source[vid].contiguous().view(torch.uint8).numpy().data)  # the raw bytes, no copy

    write_atomic(path, write)


def _layout(source: Mapping[str, Tensor], order: list[str], name: str,
            width: int) -> tuple[list[int], int, torch.dtype]:
    """(frame counts, width, dtype), refusing what one store cannot hold: mixed widths or dtypes."""
    counts: list[int] = []
    first: Optional[tuple[str, Tensor]] = None
    for vid in order:
        t = source[vid]
        if not torch.is_tensor(t) or t.dim() != 2 or t.dtype not in CODES:
            raise FlipVQAError(f"{name}: video {vid!r} is not a [frames, width] tensor of float16, bfloat16, "
                               "float32 or float64")
        if first is None:
            first = (vid, t)
        elif (t.shape[1], t.dtype) != (first[1].shape[1], first[1].dtype):
            raise FlipVQAError(f"{name}: videos {first[0]!r} ({first[1].shape[1]}-d {first[1].dtype}) and "
                               f"{vid!r} ({t.shape[1]}-d {t.dtype}) differ; a packed store holds one width "
                               "and dtype: convert or drop one")
        counts.append(int(t.shape[0]))
    if first is None:
        return counts, int(width), torch.float16
    return counts, int(first[1].shape[1]), first[1].dtype
