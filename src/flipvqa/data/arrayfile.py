"""One file of named 1-D numpy arrays and a JSON header, memory-mapped when read.

Layout: :data:`MAGIC`, the header's length (8 bytes, little-endian), the JSON header, then the
arrays, each at a 64-byte aligned offset. The header holds the caller's ``meta``, every array's
dtype, length and offset, the file's size and a CRC-32 of the arrays: a truncated or damaged file
is refused with one line instead of giving wrong numbers. Written atomically (:func:`write_atomic`).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import FlipVQAError
from ..io import write_atomic

MAGIC = b"FLIPVQA-ARRAYS-1"
ALIGN = 64
CHUNK = 1 << 24  # bytes read at a time when verifying


def write_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``arrays`` (1-D, any numeric dtype) and ``meta`` (JSON) to ``path`` atomically."""
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    layout, offset, crc = {}, 0, 0
    for name, a in arrays.items():
        layout[name] = {"dtype": a.dtype.str, "length": int(a.shape[0]), "offset": offset}
        offset = _aligned(offset + a.nbytes)
        crc = zlib.crc32(memoryview(a).cast("B"), crc)
    header = {"meta": meta, "arrays": layout, "crc32": crc, "start": 0, "size": 0}
    # The header's own length decides where the arrays start: leave room for the two numbers' digits.
    start = _aligned(len(MAGIC) + 8 + len(json.dumps(header).encode("utf-8")) + 48)
    header.update(start=start, size=start + offset)
    text = json.dumps(header).encode("utf-8")

    def write(f: IO[bytes]) -> None:
        f.write(MAGIC + len(text).to_bytes(8, "little") + text)
        for name, a in arrays.items():
            f.seek(start + layout[name]["offset"])
            f.write(memoryview(a).cast("B"))
        f.truncate(header["size"])  # the padding after the last array

    write_atomic(path, write)


def read_meta(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, full header) of ``path``, reading the header only; one-line FlipVQAError if it is
    not an array file or is shorter than its header says."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise FlipVQAError(f"{path}: not a flipvqa array file")
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length).decode("utf-8")) if 0 < length < 1 << 24 else None
            size = os.fstat(f.fileno()).st_size
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlipVQAError(f"{path}: unreadable header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), dict) or \
            not isinstance(header.get("start"), int) or not isinstance(header.get("size"), int):
        raise FlipVQAError(f"{path}: damaged header")
    if size != header["size"]:
        raise FlipVQAError(f"{path}: {size} bytes, {header['size']} expected (truncated?)")
    return header.get("meta", {}), header


def read_arrays(path: Path, verify: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) of ``path``, the arrays memory-mapped read-only. ``verify``: check the
    CRC-32 first (read through the page cache, so that it adds nothing to this process's memory)."""
    meta, header = read_meta(path)
    start = header["start"]
    try:
        if verify and _crc(path, start, header["arrays"]) != header.get("crc32"):
            raise FlipVQAError(f"{path}: damaged (its checksum does not match)")
        arrays = {name: _map(path, start, spec) for name, spec in header["arrays"].items()}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise FlipVQAError(f"{path}: damaged ({exc.__class__.__name__}: {exc})") from None
    return meta, arrays


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _map(path: Path, start: int, spec: dict) -> np.ndarray:
    dtype, length = np.dtype(spec["dtype"]), int(spec["length"])
    if length == 0:  # mmap refuses empty mappings
        return np.empty(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start + int(spec["offset"]), shape=(length,))


def _crc(path: Path, start: int, layout: dict) -> int:
    crc, buffer = 0, bytearray(CHUNK)
    with open(path, "rb") as f:
        for spec in layout.values():
            f.seek(start + int(spec["offset"]))
            left = int(spec["length"]) * np.dtype(spec["dtype"]).itemsize
            while left:
                n = f.readinto(memoryview(buffer)[:min(left, CHUNK)])
                if not n:
                    raise ValueError("unexpected end of file")
                crc, left = zlib.crc32(memoryview(buffer)[:n], crc), left - n
    return crc
