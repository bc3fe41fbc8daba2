"""The encoded prompts of a split, cached on disk so that a second run skips encoding.

A cache file is ``<folder>/.flipvqa-cache/<split>-<train|eval>.<key>.enc`` (an array file,
:mod:`flipvqa.data.arrayfile`), first in the dataset's folder, else (read-only data) under the
output dir. ``<key>`` hashes everything the tokens depend on: the records' text (question,
options, answers, dialogue), the tokenizer (its file, special ids and library version), the
encoding options and the encoding code itself. A file for other inputs is therefore never read:
it is named in a note and replaced. A damaged one is named in a warning and rebuilt.

Under torchrun rank 0 builds a missing cache while the other ranks wait at a barrier; then every
rank memory-maps the same file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch.distributed as torch_dist

from .. import hf_tokenizer, prompts
from .. import tokenizer as tokenizer_module
from ..devices import Dist
from ..errors import FlipVQAError
from ..io import first_line
from ..tokenizer import Tokenizer
from . import encoded as encoded_module
from .arrayfile import read_meta, write_arrays
from .encoded import EncodedSplit
from .records import Record

log = logging.getLogger(__name__)

ENCODING_VERSION = 1  # raise when the stored arrays change meaning
FOLDER = ".flipvqa-cache"
SUFFIX = ".enc"
# The code that decides the tokens: a change there (even a comment) means re-encoding.
SOURCES = (prompts, tokenizer_module, hf_tokenizer, encoded_module)
HASHED_PER_UPDATE = 20_000  # records serialised per hash update
# How long the other ranks wait for rank 0's encoding. Their wait has a gloo group of its own:
# the run's NCCL timeout (10 minutes by default) could end a wait for a million questions.
RANK_WAIT = timedelta(hours=3)
_groups: dict[str, Any] = {}
LEFTOVER_AGE_S = 24 * 3600  # a temporary file this old is no write in progress


@dataclass
class CachePlace:
    """Where a split's encoding is cached: ``folders`` are tried in order (the data's, then the
    output dir's); ``label`` names the split and the kind of encoding, e.g. ``train-train``."""

    folders: list[Path]
    label: str
    dist: Dist = field(default_factory=Dist)


def cached_encoding(records: list[Record], tok: Tokenizer, options: dict[str, Any], place: CachePlace,
                    encode: Callable[[], EncodedSplit], name: str) -> EncodedSplit:
    """The split's encoding from the cache, else ``encode()`` written to the cache. Under
    torchrun only rank 0 encodes; the others wait for its file."""
    key = encoding_key(records, tok, options)
    if key is None:
        log.info("%s: the tokenizer has no file to identify it by: the prompts are not cached", name)
        return encode()
    file_name = f"{place.label}.{_digest(key)}{SUFFIX}"
    dist = place.dist
    if dist.enabled and not dist.is_main:
        _wait_for_rank_0()  # rank 0 writes the file meanwhile
        found = _load(place.folders, file_name, len(records))
        if found is None:
            log.warning("%s: rank %d found no encoding cache %s: encoding here", name, dist.rank, file_name)
            return encode()
        return found
    found = _load(place.folders, file_name, len(records))
    if found is not None:
        log.info("%s: encoded prompts read from %s", name, found.path)
    else:
        stale = _stale(place, file_name, key)
        split = encode()
        found = _store(place, file_name, split, key, stale, name) or split
    if dist.enabled:
        _wait_for_rank_0()  # the file is there: the other ranks read it
    return found


def _wait_for_rank_0() -> None:
    """A barrier of every rank (each calls it once per split, in the same order)."""
    world = torch_dist.group.WORLD
    if _groups.get("world") is not world:  # made once per process group, by every rank together
        _groups.update(world=world, wait=torch_dist.new_group(backend="gloo", timeout=RANK_WAIT))
    torch_dist.barrier(group=_groups["wait"])


def encoding_key(records: list[Record], tok: Tokenizer, options: dict[str, Any]) -> Optional[dict[str, Any]]:
    """What the tokens depend on, each part hashed; None when the tokenizer has no file."""
    path = getattr(tok, "path", None)
    if path is None or not Path(path).is_file():
        return None
    tok_hash = hashlib.blake2b(Path(path).read_bytes(), digest_size=16)
    tok_hash.update(json.dumps([type(tok).__name__, tok.bos_id, tok.eos_id, tok.newline_id, tok.n_words,
                                _versions()]).encode())
    code = hashlib.blake2b(digest_size=16)
    for module in SOURCES:
        code.update(Path(module.__file__).read_bytes())
    return {"version": ENCODING_VERSION, "options": options, "data": _records_digest(records),
            "tokenizer": tok_hash.hexdigest(), "tokenizer_file": str(path), "code": code.hexdigest()}


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


def _digest(key: dict[str, Any]) -> str:
    # The file name carries the hash of all of it but the tokenizer's path (a moved file is the same)
    parts = {k: v for k, v in key.items() if k != "tokenizer_file"}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=8).hexdigest()


def _load(folders: list[Path], file_name: str, questions: int) -> Optional[EncodedSplit]:
    """The cached split of ``questions`` questions from the first folder that has the file; a
    damaged file is a warning (and then rebuilt by the caller), never an error."""
    for folder in folders:
        path = folder / file_name
        if not path.is_file():
            continue
        try:
            split = EncodedSplit.load(path)[1]
            if len(split) != questions:
                raise ValueError(f"{len(split)} questions, not {questions}")
            return split
        except (FlipVQAError, ValueError, OSError) as exc:
            if not path.exists():  # removed meanwhile as stale by a run with other options: a miss
                continue
            reason = first_line(exc)
            log.warning("%s; encoding the prompts again", reason if str(path) in reason else f"{path}: {reason}")
    return None


def _stale(place: CachePlace, file_name: str, key: dict[str, Any]) -> list[Path]:
    """The folders' cache files of the same split and kind made for other inputs, each named in
    a note with what changed."""
    stale = []
    for folder in place.folders:
        for path in sorted(folder.glob(f"{place.label}.*{SUFFIX}")) if folder.is_dir() else []:
            if path.name == file_name:
                continue
            stale.append(path)
            try:
                old = read_meta(path)[0].get("key", {})
            except FlipVQAError:
                old = {}
            log.info("%s: made for %s; encoding again into %s", path, _changes(old, key), file_name)
    return stale


def _changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two keys, in words."""
    words = {"data": "other questions (their text, options, answers or dialogues changed)",
             "tokenizer": "another tokenizer",
             "code": "another version of flipvqa's prompt code", "version": "another cache format"}
    changed = [words[k] for k in words if old.get(k) != new.get(k)]
    options = [f"{k} {old.get('options', {}).get(k)!r} (now {v!r})" for k, v in new["options"].items()
               if old.get("options", {}).get(k) != v]
    if options:
        changed.append("other options: " + ", ".join(options))
    return " and ".join(changed) or "other inputs"


def _store(place: CachePlace, file_name: str, split: EncodedSplit, key: dict[str, Any], stale: list[Path],
           name: str) -> Optional[EncodedSplit]:
    """Write ``split`` into the first writable folder, drop that folder's stale files and return
    the split memory-mapped from the file (its buffers freed); None when no folder is writable."""
    errors = []
    for folder in place.folders:
        path = folder / file_name
        try:
            _prepare(folder)
            write_arrays(path, split.arrays(), {"key": key, "questions": len(split)})
        except OSError as exc:  # a read-only data folder: try the next one
            errors.append(f"{folder}: {first_line(exc)}")
            continue
        for old in stale:
            if old.parent == folder:
                try:
                    old.unlink(missing_ok=True)
                except OSError:  # in use where that forbids removing (Windows): left for a later run
                    pass
        log.info("%s: encoded prompts cached in %s", name, path)
        return EncodedSplit.load(path, verify=False)[1]
    log.info("%s: the encoded prompts cannot be cached (%s); the next run encodes them again",
             name, "; ".join(errors) or "no cache folder")
    return None


def _prepare(folder: Path) -> None:
    """Create the cache folder with a .gitignore of "*" (as pytest does for its cache): a dataset
    kept in git does not show the cache as new files."""
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# flipvqa's cache of encoded prompts (rebuilt when missing)\n*\n")
    for temp in folder.glob(".*.tmp"):  # what a killed write left (io.write_atomic); not one in progress
        try:
            if time.time() - temp.stat().st_mtime > LEFTOVER_AGE_S:
                temp.unlink()
        except OSError:  # gone meanwhile
            pass
