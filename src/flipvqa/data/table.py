"""A split's records in columns, for the generic format at scale.

A million :class:`Record` objects cost about 900 MB in every process that holds them. A
:class:`RecordTable` keeps the same questions in a few flat arrays instead (every string's UTF-8
bytes back to back, one row of integers per question) and makes a question's ``Record`` only
when it is asked for. Its arrays can be written to the cache folder and memory-mapped
(:mod:`flipvqa.data.cache`): a second run, and every torchrun rank but the first, then read no
annotation file at all and share one copy of the table through the page cache.

Frames are not stored: a record's ``frames`` are looked up in the features when it is made,
from the video's id and the window of frame rows its question names.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch import Tensor

from .arrayfile import read_arrays, write_arrays
from .records import Record

FORMAT = "flipvqa-records"
# The integers of one question, in the order of the columns of RecordTable.rows
COLUMNS = ("vid", "question", "dialogue", "qid", "qtype", "answer", "options", "answers", "lo", "hi", "flags")
NONE = -1  # an absent qid, qtype, answer or answers
WINDOWED, NO_SUBTITLES = 1, 2  # flag bits
ENCODING = ("utf-8", "surrogatepass")  # JSON may hold lone surrogates: keep them as they were read


class TableBuilder:
    """Appends records (with their window of frame rows) to growing typed buffers."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.ends = array("q", [0, 0])  # string k is blob[ends[k]:ends[k + 1]]; string 0 is ""
        self.items = array("q")  # the string ids of every question's options, then its answers
        self.item_ends = array("q", [0])
        self.rows = array("q")
        self._vids: dict[str, int] = {}  # video id -> its number, in order of first use
        self._vid_strings = array("q")

    def _string(self, text: str) -> int:
        if not text:
            return 0
        self.blob += text.encode(*ENCODING)
        self.ends.append(len(self.blob))
        return len(self.ends) - 2

    def _list(self, texts: Optional[list[str]]) -> int:
        """The number of the list ``texts`` (NONE for None)."""
        if texts is None:
            return NONE
        self.items.extend(self._string(t) for t in texts)
        self.item_ends.append(len(self.items))
        return len(self.item_ends) - 2

    def add(self, rec: Record, window: Optional[tuple[int, int]]) -> None:
        vid = self._vids.get(rec.vid)
        if vid is None:
            vid = self._vids[rec.vid] = len(self._vids)
            self._vid_strings.append(self._string(rec.vid))
        flags = WINDOWED * (window is not None) | NO_SUBTITLES * rec.subtitles_missing
        lo, hi = window or (0, 0)
        self.rows.extend((vid, self._string(rec.question), self._string(rec.dialogue),
                          NONE if rec.qid is None else self._string(rec.qid),
                          NONE if rec.qtype == -1 else self._string(str(rec.qtype)),
                          NONE if rec.answer is None else rec.answer, self._list(rec.options),
                          self._list(rec.answers), lo, hi, flags))

    def arrays(self) -> dict[str, np.ndarray]:
        def view(buffer, dtype) -> np.ndarray:
            return np.frombuffer(buffer, dtype=dtype).copy() if len(buffer) else np.empty(0, dtype)

        return {"blob": view(self.blob, np.uint8), "ends": view(self.ends, np.int64),
                "items": view(self.items, np.int64), "item_ends": view(self.item_ends, np.int64),
                "rows": view(self.rows, np.int64), "vid_strings": view(self._vid_strings, np.int64)}

    def finish(self, features: Mapping[str, Tensor], key: str) -> "RecordTable":
        return RecordTable(self.arrays(), features, key)


class RecordTable(Sequence[Record]):
    """The records of a split, made on demand from its arrays (see the module's docstring).
    ``key`` identifies the content (what the encoding cache hashes instead of every text)."""

    def __init__(self, arrays: dict[str, np.ndarray], features: Mapping[str, Tensor], key: str,
                 path: Optional[Path] = None):
        self.arrays, self.features, self.key, self.path = arrays, features, key, path
        self._blob, self._ends, self._items = arrays["blob"], arrays["ends"], arrays["items"]
        self._item_ends = arrays["item_ends"]
        self.rows = arrays["rows"].reshape(-1, len(COLUMNS))
        self.videos = [self._text(int(k)) for k in arrays["vid_strings"]]

    @classmethod
    def load(cls, path: Path, features: Mapping[str, Tensor], verify: bool = True) -> "RecordTable":
        meta, arrays = read_arrays(path, verify)
        if meta.get("format") != FORMAT or set(arrays) != {"blob", "ends", "items", "item_ends", "rows",
                                                             "vid_strings"}:
            raise ValueError(f"{path}: not a table of records")
        table = cls(arrays, features, str(meta.get("digest")), path)
        if len(arrays["rows"]) % len(COLUMNS) or len(table) != meta.get("questions") or \
                int(table._ends[-1]) != len(table._blob) or int(table._item_ends[-1]) != len(table._items):
            raise ValueError(f"{path}: its arrays do not fit together")
        return table

    def write(self, path: Path, meta: dict[str, Any]) -> None:
        write_arrays(path, self.arrays, {**meta, "format": FORMAT, "questions": len(self), "digest": self.key})

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = int(i) % len(self)
        vid, question, dialogue, qid, qtype, answer, options, answers, lo, hi, flags = self.rows[i].tolist()
        name = self.videos[vid]
        frames = None
        if name in self.features:
            frames = self.features[name]
            if flags & WINDOWED:
                frames = frames[lo:hi]
        return Record(index=i, vid=name, question=self._text(question), options=self._list(options),
                      answer=None if answer == NONE else answer,
                      qtype=-1 if qtype == NONE else self._text(qtype),
                      qid=None if qid == NONE else self._text(qid), dialogue=self._text(dialogue),
                      subtitles_missing=bool(flags & NO_SUBTITLES), frames=frames, answers=self._list(answers))

    def __iter__(self) -> Iterator[Record]:
        return (self[i] for i in range(len(self)))

    def _text(self, k: int) -> str:
        return self._blob[self._ends[k]:self._ends[k + 1]].tobytes().decode(*ENCODING)

    def _list(self, k: int) -> Optional[list[str]]:
        if k == NONE:
            return None
        return [self._text(s) for s in self._items[self._item_ends[k]:self._item_ends[k + 1]].tolist()]

    # ------------------------------------------------------------------ whole columns at once
    def all_answered(self) -> bool:
        """Whether every question has its answer (an option's index, or acceptable answers)."""
        rows = self.rows
        open_ended = np.diff(self._item_ends)[rows[:, 6]] == 0  # no options
        return bool(np.where(open_ended, rows[:, 7] != NONE, rows[:, 5] != NONE).all())

    def missing_features(self) -> list[str]:
        """The video of every question whose video has no features."""
        absent = np.array([name not in self.features for name in self.videos], dtype=bool)
        return self._videos_of(np.flatnonzero(absent[self.rows[:, 0]]) if len(self) else [])

    def missing_subtitles(self) -> list[str]:
        """The video of every question marked as having no subtitles."""
        return self._videos_of(np.flatnonzero(self.rows[:, 10] & NO_SUBTITLES) if len(self) else [])

    def qtypes(self) -> set:
        """The distinct question types (-1: none)."""
        codes = np.unique(self.rows[:, 4]).tolist() if len(self) else []
        return {-1 if k == NONE else self._text(k) for k in codes}

    def _videos_of(self, questions) -> list[str]:
        return [self.videos[v] for v in self.rows[questions, 0].tolist()] if len(questions) else []

    def __getstate__(self) -> dict:
        # A DataLoader worker started by spawn gets the file's name, not a copy of the arrays.
        state = {"features": self.features, "key": self.key}
        return {**state, "path": self.path} if self.path is not None else {**state, "arrays": self.arrays}

    def __setstate__(self, state: dict) -> None:
        arrays = read_arrays(state["path"], verify=False)[1] if "arrays" not in state else state["arrays"]
        self.__init__(arrays, state["features"], state["key"], state.get("path"))
