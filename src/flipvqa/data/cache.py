"""A split's records and encoded prompts, cached on disk so that a second run skips reading and
encoding.

A cache file is ``<folder>/.flipvqa-cache/<label>.<key><suffix>`` (an array file,
:mod:`flipvqa.data.arrayfile`), first in the dataset's folder, else (read-only data) under the
output dir: ``<split>-records.<key>.rec`` holds a generic split's :class:`RecordTable` (its key
hashes the annotation file's bytes, the subtitles and the reading code), and
``<split>-<train|eval>.<key>.enc`` its encoding (its key hashes everything the tokens depend on: the
records' text, the tokenizer's file, special ids and library version, the encoding options and the
encoding code itself). A file for other inputs is therefore never read: it is named in a note and
replaced. A damaged one is named in a warning and rebuilt.

Under torchrun rank 0 builds a missing file while the other ranks wait at a barrier; then every
rank memory-maps the same file."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, TypeVar

import torch.distributed as torch_dist

from .. import hf_tokenizer, prompts
from .. import tokenizer as tokenizer_module
from ..devices import Dist
from ..errors import FlipVQAError
from ..io import first_line
from ..tokenizer import Tokenizer
from . import encoded as encoded_module
from . import generic
from . import records as records_module
from . import subtitles as subtitles_module
from . import table as table_module
from .arrayfile import read_meta, write_arrays
from .encoded import EncodedSplit
from .records import Record
from .table import RecordTable

log = logging.getLogger(__name__)

ENCODING_VERSION = 1  # raise when the stored arrays change meaning
FOLDER = ".flipvqa-cache"
SUFFIX = ".enc"
# The code that decides the tokens, and the code that decides a generic split's records.
SOURCES = (prompts, tokenizer_module, hf_tokenizer, encoded_module)
RECORD_SOURCES = (generic, records_module, subtitles_module, prompts, table_module)
HASHED_PER_UPDATE = 20_000  # records serialised per hash update
# How long the other ranks wait for rank 0's encoding. Their wait has a gloo group of its own:
# the run's NCCL timeout (10 minutes by default) could end a wait for a million questions.
RANK_WAIT = timedelta(hours=3)
_groups: dict[str, Any] = {}
T = TypeVar("T")
LEFTOVER_AGE_S = 24 * 3600  # a temporary file this old is no write in progress


@dataclass
class CachePlace:
    """Where a split's records or encoding are cached: ``folders`` are tried in order (the data's,
    then the output dir's); ``label`` names the split and what is kept, e.g. ``train-records``,
    ``train-train`` (training's encoding)."""

    folders: list[Path]
    label: str
    dist: Dist = field(default_factory=Dist)


@dataclass(frozen=True)
class Kind:
    """What a kind of cache file holds: its ``suffix``, ``what`` (in messages), ``again`` (what
    a miss does, in words), and how an object is written to a file and read from one (memory-mapped;
    ``verify``: check its checksum; a damaged file raises FlipVQAError or ValueError)."""

    suffix: str
    what: str
    again: str
    write: Callable[[Any, Path, dict[str, Any]], None]
    load: Callable[[Path, bool], Any]


ENCODED = Kind(SUFFIX, "encoded prompts", "encoding the prompts again",
               lambda split, path, meta: write_arrays(path, split.arrays(), meta),
               lambda path, verify: EncodedSplit.load(path, verify)[1])


def cached_encoding(records: Sequence[Record], tok: Tokenizer, options: dict[str, Any], place: CachePlace,
                    encode: Callable[[], EncodedSplit], name: str) -> EncodedSplit:
    """The split's encoding from the cache, else ``encode()`` written to the cache. Under
    torchrun only rank 0 encodes; the others wait for its file."""
    key = encoding_key(records, tok, options)
    if key is None:
        log.info("%s: the tokenizer has no file to identify it by: the prompts are not cached", name)
        return encode()
    return cached(place, key, ENCODED, encode, name, len(records))


def cached(place: CachePlace, key: dict[str, Any], kind: Kind, build: Callable[[], T], name: str,
           length: Optional[int] = None) -> T:
    """The object cached under ``key`` in ``place``, else ``build()`` written there and mapped
    back. ``length``: what a loaded object's len() must be (a file that disagrees is damaged).
    Under torchrun only rank 0 builds; the others wait for its file, and build themselves only
    when there is none (the cache could not be written, or rank 0 failed: they then fail alike
    instead of waiting for ever)."""
    file_name = f"{place.label}.{digest(key)}{kind.suffix}"
    dist = place.dist
    if dist.enabled and not dist.is_main:
        _wait_for_rank_0()  # rank 0 writes the file meanwhile
        found = _load(place.folders, file_name, kind, length)
        if found is None:
            log.warning("%s: rank %d found no cache %s: %s here", name, dist.rank, file_name, kind.again)
            return build()
        return found
    found = _load(place.folders, file_name, kind, length)
    if found is not None:
        log.info("%s: %s read from %s", name, kind.what, found.path)
    else:
        stale = _stale(place, file_name, key, kind)
        try:
            built = build()
        except Exception:
            if dist.enabled:
                _wait_for_rank_0()  # release the other ranks, which then meet the same error
            raise
        found = _store(place, file_name, built, key, stale, kind, name) or built
    if dist.enabled:
        _wait_for_rank_0()  # the file is there: the other ranks read it
    return found


def _wait_for_rank_0() -> None:
    """A barrier of every rank (each calls it once per split, in the same order)."""
    world = torch_dist.group.WORLD
    if _groups.get("world") is not world:  # made once per process group, by every rank together
        _groups.update(world=world, wait=torch_dist.new_group(backend="gloo", timeout=RANK_WAIT))
    torch_dist.barrier(group=_groups["wait"])


def encoding_key(records: Sequence[Record], tok: Tokenizer, options: dict[str, Any]) -> Optional[dict[str, Any]]:
    """What the tokens depend on, each part hashed; None when the tokenizer has no file."""
    path = getattr(tok, "path", None)
    if path is None or not Path(path).is_file():
        return None
    tok_hash = hashlib.blake2b(Path(path).read_bytes(), digest_size=16)
    tok_hash.update(json.dumps([type(tok).__name__, tok.bos_id, tok.eos_id, tok.newline_id, tok.n_words,
                                _versions()]).encode())
    data = records.key if isinstance(records, RecordTable) else _records_digest(records)
    return {"version": ENCODING_VERSION, "options": options, "data": data,
            "tokenizer": tok_hash.hexdigest(), "tokenizer_file": str(path), "code": _code_digest(SOURCES)}


def records_key(root: Path, split: str, sub: bool) -> dict[str, Any]:
    """What a generic split's records depend on, each part hashed: the annotation file's bytes,
    the fps, with ``sub`` every subtitles file's name, size and time, and the reading code."""
    path = generic.split_file(root, split)
    if path is None:
        raise FlipVQAError(f"{root}: no {split}.jsonl or {split}.csv")
    data = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                data.update(chunk)
    except OSError as exc:
        raise FlipVQAError(f"{path}: cannot be read ({exc})") from None
    subtitles = hashlib.blake2b(digest_size=16)
    if sub and (root / "subtitles").is_dir():
        for entry in sorted(os.scandir(root / "subtitles"), key=lambda e: e.name):
            stat = entry.stat()
            subtitles.update(f"{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogatepass"))
    return {"data": data.hexdigest(), "file": path.name, "options": {"sub": sub, "fps": generic.fps_of(root)},
            "subtitles": subtitles.hexdigest(), "code": _code_digest(RECORD_SOURCES)}


def _code_digest(modules: tuple) -> str:
    """A hash of the modules' source files: a change there (even a comment) means rebuilding."""
    code = hashlib.blake2b(digest_size=16)
    for module in modules:
        code.update(Path(module.__file__).read_bytes())
    return code.hexdigest()


def _records_digest(records: list[Record]) -> str:
    """A hash of every record's text that goes into a prompt, with its answer. The texts are
    hashed back to back and their lengths beside them, which keeps the fields apart (2.5 s for
    1 M questions; json.dumps of the same took twice that)."""
    h = hashlib.blake2b(digest_size=16)
    for start in range(0, len(records), HASHED_PER_UPDATE):
        parts: list[str] = []
        for r in records[start:start + HASHED_PER_UPDATE]:
            counts = (r.answer, len(r.options), None if r.answers is None else len(r.answers))
            parts += (r.question, r.dialogue, repr(counts), *r.options, *(r.answers or ()))
        h.update("".join(parts).encode("utf-8", "surrogatepass"))
        h.update(array("q", map(len, parts)).tobytes())
    return h.hexdigest()


def _versions() -> dict[str, Optional[str]]:
    """The tokenizer libraries' versions: a new release may split some text differently."""
    found = {}
    for package in ("sentencepiece", "tokenizers"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def digest(key: dict[str, Any]) -> str:
    # The file name carries the hash of all of it but the tokenizer's path (a moved file is the same)
    parts = {k: v for k, v in key.items() if k != "tokenizer_file"}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=8).hexdigest()


def _load(folders: list[Path], file_name: str, kind: Kind, length: Optional[int]) -> Any:
    """The object in the first folder that has the file (None: none has); a damaged file, or one
    whose len() is not ``length``, is a warning (and then rebuilt by the caller), never an error."""
    for folder in folders:
        path = folder / file_name
        if not path.is_file():
            continue
        try:
            found = kind.load(path, True)
            if length is not None and len(found) != length:
                raise ValueError(f"{len(found)} questions, not {length}")
            return found
        except (FlipVQAError, ValueError, OSError) as exc:
            if not path.exists():  # removed meanwhile as stale by a run with other options: a miss
                continue
            reason = first_line(exc)
            log.warning("%s; %s", reason if str(path) in reason else f"{path}: {reason}", kind.again)
    return None


def _stale(place: CachePlace, file_name: str, key: dict[str, Any], kind: Kind) -> list[Path]:
    """The folders' cache files of the same split and kind made for other inputs, each named in
    a note with what changed."""
    stale = []
    for folder in place.folders:
        for path in sorted(folder.glob(f"{place.label}.*{kind.suffix}")) if folder.is_dir() else []:
            if path.name == file_name:
                continue
            stale.append(path)
            try:
                old = read_meta(path)[0].get("key", {})
            except FlipVQAError:
                old = {}
            log.info("%s: made for %s; %s into %s", path, _changes(old, key), kind.again, file_name)
    return stale


def _changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two keys, in words."""
    words = {"data": "other questions (their text, options, answers or dialogues changed)",
             "tokenizer": "another tokenizer",
             "subtitles": "other subtitles files", "file": "another annotation file",
             "code": "another version of flipvqa's code", "version": "another cache format"}
    changed = [words[k] for k in words if old.get(k) != new.get(k)]
    options = [f"{k} {old.get('options', {}).get(k)!r} (now {v!r})" for k, v in new["options"].items()
               if old.get("options", {}).get(k) != v]
    if options:
        changed.append("other options: " + ", ".join(options))
    return " and ".join(changed) or "other inputs"


def _store(place: CachePlace, file_name: str, built: Any, key: dict[str, Any], stale: list[Path], kind: Kind,
           name: str) -> Any:
    """Write ``built`` into the first writable folder, drop that folder's stale files and return
    it memory-mapped from the file (its buffers freed); None when no folder is writable."""
    errors = []
    for folder in place.folders:
        path = folder / file_name
        try:
            _prepare(folder)
            kind.write(built, path, {"key": key, "questions": len(built)})
        except OSError as exc:  # a read-only data folder: try the next one
            errors.append(f"{folder}: {first_line(exc)}")
            continue
        for old in stale:
            if old.parent == folder:
                try:
                    old.unlink(missing_ok=True)
                except OSError:  # in use where that forbids removing (Windows): left for a later run
                    pass
        log.info("%s: %s cached in %s", name, kind.what, path)
        return kind.load(path, False)
    log.info("%s: the %s cannot be cached (%s); the next run makes them again",
             name, kind.what, "; ".join(errors) or "no cache folder")
    return None


def _prepare(folder: Path) -> None:
    """Create the cache folder with a .gitignore of "*" (as pytest does for its cache): a dataset
    kept in git does not show the cache as new files."""
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# flipvqa's cache of records and encoded prompts (rebuilt when missing)\n*\n")
    for temp in folder.glob(".*.tmp"):  # what a killed write left (io.write_atomic); not one in progress
        try:
            if time.time() - temp.stat().st_mtime > LEFTOVER_AGE_S:
                temp.unlink()
        except OSError:  # gone meanwhile
            pass
