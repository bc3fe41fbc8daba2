"""Any video-QA dataset: ``<data_path>/NAME/`` with ``{split}.jsonl`` or ``{split}.csv``,
``features.pth`` (else ``clipvitl14.pth``), optional ``meta.json`` and ``subtitles/<video>.srt``.

JSONL rows: ``video``, ``question``, ``options`` (2 to 26 strings), ``answer`` (a 0-based index, or
the text of one option); a row without ``options`` is an open-ended question, whose ``answer`` is
a string or a list of acceptable strings (the first is trained on). Optionally ``qid``, ``type``,
``start``/``end`` (seconds) and ``subtitles`` (the dialogue itself). CSV: the same columns, with
the options as ``a0``, ``a1``, ... (empty cells at the end mean fewer options; none, an
open-ended question). The rules are chosen so that each built-in dataset written this way gives
its built-in numbers: the question is normalised as the built-in readers do; a window keeps
frames ``[round(start) * fps, (round(end) + 1) * fps)`` (STAR, VLEP, TVQA); an inline dialogue is
VLEP's ``Dialogue: {text}\\n``, an ``.srt`` file is windowed and joined as TVQA's.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Optional

from torch import Tensor

from ..errors import FlipVQAError
from ..io import read_json_object
from ..prompts import LETTERS, normalize_question
from .records import Record
from .store import packed_path
from .subtitles import tvqa_dialogue
from .table import RecordTable, TableBuilder

FEATURE_FILES = ("features.pth", "clipvitl14.pth")
OPTIONAL = ("qid", "type", "start", "end", "subtitles")


def split_file(root: Path, split: str) -> Optional[Path]:
    """``{split}.jsonl`` or ``{split}.csv`` (both is an error: which one was meant?)."""
    found = [root / f"{split}{ext}" for ext in (".jsonl", ".csv") if (root / f"{split}{ext}").is_file()]
    if len(found) > 1:
        raise FlipVQAError(f"{root}: both {split}.jsonl and {split}.csv exist; keep one")
    return found[0] if found else None


def splits(root: Path) -> list[str]:
    """The splits a folder holds, by file name."""
    return sorted({p.stem for p in root.iterdir() if p.suffix in (".jsonl", ".csv") and p.is_file()})


def features_file(root: Path) -> Path:
    """The first of :data:`FEATURE_FILES` there as a ``.pth`` or as its packed store (``.safetensors``)."""
    return next((root / n for n in FEATURE_FILES if (root / n).is_file() or packed_path(root / n).is_file()),
                root / FEATURE_FILES[0])


def fps_of(root: Path) -> int:
    """Frames per second of the features, from ``meta.json`` (default 1)."""
    path = root / "meta.json"
    if not path.is_file():
        return 1
    fps = read_json_object(path).get("fps", 1)
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise FlipVQAError(f"{path}: 'fps' must be a positive integer (got {fps!r})")
    return fps


def read(root: Path, split: str, features: Mapping[str, Tensor], sub: bool,
         errors: Optional[list[str]] = None) -> list[Record]:
    """The split's records. A malformed line raises, naming the file and the line; with
    ``errors``, it is appended there and skipped instead (``flipvqa data check``)."""
    records: list[Record] = []

    def keep(rec: Record, window: Optional[tuple[int, int]]) -> None:
        if rec.vid in features:
            rec.frames = features[rec.vid] if window is None else features[rec.vid][window[0]:window[1]]
        records.append(rec)

    _parse(root, split, sub, keep, errors)
    return records


def read_table(root: Path, split: str, features: Mapping[str, Tensor], sub: bool, key: str) -> RecordTable:
    """The split's records as one :class:`RecordTable` (the same questions as :func:`read`)."""
    builder = TableBuilder()
    _parse(root, split, sub, builder.add)
    return builder.finish(features, key)


def _parse(root: Path, split: str, sub: bool, keep: Callable[[Record, Optional[tuple[int, int]]], None],
           errors: Optional[list[str]] = None) -> None:
    """Hand each question's record (frames not set) and its window of frame rows to ``keep``."""
    path = split_file(root, split)
    if path is None:
        raise FlipVQAError(f"{root}: no {split}.jsonl or {split}.csv")
    fps = fps_of(root)
    answered, unanswered = 0, None
    for index, (line, row) in enumerate(_rows(path, errors)):  # index: the question's position in the file
        try:
            rec, window = _record(row, index, path, line, fps, sub, root)
        except FlipVQAError as exc:
            _fail(str(exc), errors)
            continue
        keep(rec, window)
        if rec.answered:
            answered += 1
        elif unanswered is None:
            unanswered = rec.index
    if answered and unanswered is not None:
        _fail(f"{path}: some questions have an answer and some do not (e.g. question {unanswered}); "
              f"a split used only for prediction has none", errors)


def _rows(path: Path, errors: Optional[list[str]]) -> Iterator[tuple[int, dict]]:
    """(line number, row) of every question, read as the file streams by (a million rows are
    never all held at once); CSV rows get their options gathered from a0, a1, ..."""
    try:
        # newline="\n": lines end at "\n" only (universal newlines would also cut at a lone "\r",
        # and str.splitlines at U+2028 and others, all legal inside a JSON string)
        with open(path, encoding="utf-8", newline="\n" if path.suffix == ".jsonl" else None) as f:
            yield from _jsonl_rows(f, path, errors) if path.suffix == ".jsonl" else _csv_rows(f, path)
    except (OSError, UnicodeDecodeError) as exc:
        raise FlipVQAError(f"{path}: cannot be read ({exc})") from None


def _jsonl_rows(lines: Iterable[str], path: Path, errors: Optional[list[str]]) -> Iterator[tuple[int, dict]]:
    for line, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as exc:
            _fail(f"{path}:{line}: not valid JSON ({exc.msg})", errors)


def _csv_rows(f: Iterable[str], path: Path) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(f)  # quoted cells may hold line breaks (read as "\n", as before)
    columns = reader.fieldnames or []
    for name in ("video", "question"):
        if name not in columns:
            raise FlipVQAError(f"{path}: no '{name}' column (columns: {', '.join(columns)})")
    option_columns = sorted((c for c in columns if c[:1] == "a" and c[1:].isdigit()), key=lambda c: int(c[1:]))
    for row in reader:
        options = [row.pop(c) or "" for c in option_columns]
        while options and options[-1] == "":
            options.pop()  # empty cells at the end: fewer options
        cells = {k: v for k, v in row.items() if v not in ("", None)}  # an empty cell is an absent field
        yield reader.line_num, {**cells, "options": options}


def _fail(message: str, errors: Optional[list[str]]) -> None:
    """Raise ``message``, or collect it when ``errors`` is a list."""
    if errors is None:
        raise FlipVQAError(message)
    errors.append(message)


def _record(row: Any, index: int, path: Path, line: int, fps: int, sub: bool,
            root: Path) -> tuple[Record, Optional[tuple[int, int]]]:
    """The row's record (its frames not set) and the frame rows its window keeps (None: all)."""
    where = f"{path}:{line}"
    if not isinstance(row, dict):
        raise FlipVQAError(f"{where}: expected a JSON object, got {type(row).__name__}")
    video, question = (_text(row, key, where) for key in ("video", "question"))
    video = sys.intern(video)  # questions of one video share its id string
    options = row.get("options", [])  # none at all: an open-ended question
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise FlipVQAError(f"{where}: 'options' must be a list of strings (got {options!r})")
    if options and not 2 <= len(options) <= len(LETTERS):
        raise FlipVQAError(f"{where}: {len(options)} options; 2 to {len(LETTERS)} are supported "
                           f"(or none, for an open-ended question)")
    if "" in options:
        raise FlipVQAError(f"{where}: option {options.index('')} is empty")
    window = _window(row, where)
    rows = None if window is None else (round(window[0]) * fps, (round(window[1]) + 1) * fps)
    dialogue, no_subtitles = "", False
    if sub:
        dialogue, no_subtitles = _dialogue(row, root, video, window, where)
    qtype = row.get("type")
    if qtype is not None and not isinstance(qtype, str):
        qtype = str(qtype)
    answer, answers = (None, _open_answers(row.get("answer"), where)) if not options else \
        (_answer(row.get("answer"), options, where), None)
    return Record(index=index, vid=video, question=normalize_question(question), options=options,
                  answer=answer, qtype=qtype if qtype else -1,
                  qid=None if row.get("qid") is None else str(row["qid"]), dialogue=dialogue,
                  subtitles_missing=no_subtitles, answers=answers), rows


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise FlipVQAError(f"{where}: '{key}' is missing or not a non-empty string")
    return value


def _answer(value: Any, options: list[str], where: str) -> Optional[int]:
    """A value that parses as an integer is a 0-based index; anything else is an option's text."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise FlipVQAError(f"{where}: answer {value!r} is neither an index nor an option")
    try:
        index = int(str(value).strip())
    except ValueError:
        matches = [k for k, o in enumerate(options) if o == value]
        if len(matches) != 1:
            raise FlipVQAError(f"{where}: answer {value!r} is " + ("not among the options" if not matches
                               else f"the text of {len(matches)} options")) from None
        return matches[0]
    if not 0 <= index < len(options):
        raise FlipVQAError(f"{where}: answer {index} is outside 0..{len(options) - 1}")
    return index


def _open_answers(value: Any, where: str) -> Optional[list[str]]:
    """An open-ended question's acceptable answers (a string or a list of strings, stripped; the
    first is trained on); None when the row has none."""
    if value is None:
        return None
    answers = value if isinstance(value, list) else [value]
    if not answers:
        raise FlipVQAError(f"{where}: 'answer' is an empty list; give at least one acceptable answer")
    bad = next((a for a in answers if not isinstance(a, str)), None)
    if bad is not None or isinstance(value, bool):
        raise FlipVQAError(f"{where}: the answer of an open-ended question must be a string or a list of "
                           f"strings (got {value!r})")
    answers = [a.strip() for a in answers]
    if "" in answers:
        raise FlipVQAError(f"{where}: an answer is empty" + (f" (answer {answers.index('')} of the list)"
                                                             if isinstance(value, list) else ""))
    return answers


def _window(row: dict, where: str) -> Optional[tuple[float, float]]:
    if ("start" in row) != ("end" in row):
        raise FlipVQAError(f"{where}: give both 'start' and 'end' (seconds), or neither")
    if "start" not in row:
        return None
    try:
        start, end = float(row["start"]), float(row["end"])
    except (TypeError, ValueError):
        raise FlipVQAError(f"{where}: 'start' and 'end' must be numbers of seconds") from None
    if not (math.isfinite(start) and math.isfinite(end)) or end < start:
        raise FlipVQAError(f"{where}: the window {start}..{end} is not a time span")
    return start, end


def _dialogue(row: dict, root: Path, video: str, window: Optional[tuple[float, float]],
              where: str) -> tuple[str, bool]:
    """(dialogue, whether the video has no subtitles at all): an inline ``subtitles`` field as
    VLEP's, else ``subtitles/<video>.srt`` windowed and joined as TVQA's."""
    if "subtitles" in row:
        if not isinstance(row["subtitles"], str):
            raise FlipVQAError(f"{where}: 'subtitles' must be a string (the dialogue)")
        return f"Dialogue: {row['subtitles']}\n", False
    start, end = (round(window[0]), round(window[1])) if window else (-math.inf, math.inf)
    dialogue = tvqa_dialogue(root / "subtitles" / f"{video}.srt", start, end)
    return (dialogue or "", dialogue is None)
