"""The small I/O layer every other module uses: reading JSON/JSONL/CSV and tensor files with a
one-line error, atomic writes, the first line of an exception, and progress bars.

It imports nothing of flipvqa but :mod:`flipvqa.errors`, so that anything may depend on it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, Optional

import torch
from tqdm.auto import tqdm

from .errors import FlipVQAError
from .faults import crash_point

def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ---------------------------------------------------------------------------- reading text
def read_json(path: str | os.PathLike) -> Any:
    """Parsed JSON of ``path``; a missing or malformed file is one line naming it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FlipVQAError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise FlipVQAError(f"{path}: not valid JSON ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FlipVQAError(f"{path}: cannot be read ({first_line(exc)})") from None


def read_json_object(path: str | os.PathLike) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise FlipVQAError(f"{path}: expected a JSON object")
    return data


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """One parsed value per non-blank line; an invalid line is reported with its number."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except FileNotFoundError:
        raise FlipVQAError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FlipVQAError(f"{path}: cannot be read ({first_line(exc)})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise FlipVQAError(f"{path}: line {n} is not valid JSON ({exc})") from None
    return rows


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a CSV file with a header line, as dicts."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise FlipVQAError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FlipVQAError(f"{path}: cannot be read as CSV ({first_line(exc)})") from None


# ---------------------------------------------------------------------------- reading tensors
def load_tensors(path: str | os.PathLike, what: str, allowed_globals: Optional[list] = None,
                 mmap: bool = True) -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors, containers, numbers and only the
    ``allowed_globals`` classes are unpickled), memory-mapped when the file allows it.

    ``what`` names the content in the error ("features", "LLaMA weights", ...)."""
    path = Path(path)
    if not path.is_file():
        raise FlipVQAError(f"{path}: {what} file not found")
    try:
        with torch.serialization.safe_globals(allowed_globals or []):
            if mmap:
                try:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
                    pass
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and I/O errors all mean "cannot read it safely"
        raise FlipVQAError(f"{path}: {_why_unreadable(path, what, exc)}") from None


def _why_unreadable(path: Path, what: str, exc: Exception) -> str:
    """What is wrong with a file ``torch.load`` refused, in words: empty, not a PyTorch file at all,
    Python objects beyond tensors (not unpickled, on purpose), or damaged."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return f"the {what} file is empty (0 bytes): a copy or download that did not finish?"
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or the legacy pickle
        shown = head[:24].decode("utf-8", "replace").split("\n")[0]
        return f"not a PyTorch file (it starts with {shown!r}); {what} files are written by torch.save"
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if found or "weights only" in str(exc).lower().replace("_", " "):
        name = f" ({found.group(1)})" if found else ""
        return (f"it holds Python objects other than tensors{name}, which are not unpickled (loading them "
                f"could run code); only tensors, numbers and containers are read")
    return f"cannot read {what}: the file looks damaged or truncated ({first_line(exc)[:160]})"


# ---------------------------------------------------------------------------- writing
def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, flush it to disk and rename
    it over ``path``: an interrupted write never leaves a truncated file, nor a temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp's private 0600 would otherwise stick to the file
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        crash_point("write")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` written atomically."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """One JSON value per line, written atomically."""
    write_atomic(path, lambda f: f.writelines((json.dumps(r) + "\n").encode("utf-8") for r in rows))


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------- progress
_bars = {"on": True}


def show_progress(on: bool) -> None:
    """Turn every progress bar on or off (the CLI's ``-q`` turns them off)."""
    _bars["on"] = on


def progress(iterable: Optional[Iterable] = None, desc: str = "", enabled: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar on stderr; hidden after ``show_progress(False)`` and where ``enabled`` is
    False (ranks other than 0 under torchrun)."""
    kw.setdefault("leave", False)
    return tqdm(iterable, desc=desc, disable=not (enabled and _bars["on"]), dynamic_ncols=True, **kw)
