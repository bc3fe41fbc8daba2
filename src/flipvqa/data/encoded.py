"""A split's token sequences in flat arrays.

Every id of every sequence is concatenated into one array (2 bytes a token for a vocabulary of at
most 65536 ids, else 4), with, per sequence, where it starts and its label start, video start, full
length and flags; per question, where its sequences start. A Python list of ints per sequence cost
about 36 bytes a token and one object per sequence; these arrays can also be memory-mapped from
the cache (:mod:`flipvqa.data.cache`). :meth:`EncodedSplit.sequences` gives back exactly the
:class:`Sequence` objects :func:`flipvqa.prompts.encode_sample` made.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..prompts import TASKS, Sequence
from .arrayfile import read_arrays

TASK_NAMES = TASKS + ("prompt",)  # a sequence's task is stored as its index here
TRUNCATED, LOST_ANSWER = 1, 2  # flag bits
NO_TARGET_NEEDED = tuple(TASK_NAMES.index(t) for t in ("qav", "prompt"))  # see Sequence.fits


def ids_dtype(n_words: int) -> np.dtype:
    return np.dtype(np.uint16) if n_words <= 1 << 16 else np.dtype(np.int32)


@dataclass(eq=False)  # arrays do not compare to one bool
class EncodedSplit:
    ids: np.ndarray  # every token id, the sequences one after the other
    starts: np.ndarray  # int64 [n_seq + 1]: sequence j is ids[starts[j]:starts[j + 1]]
    label_start: np.ndarray  # int32 [n_seq]
    video_start: np.ndarray  # int32 [n_seq]
    full_length: np.ndarray  # int32 [n_seq]: Sequence.full_length (0: not truncated)
    flags: np.ndarray  # uint8 [n_seq]: TRUNCATED | LOST_ANSWER
    task: np.ndarray  # uint8 [n_seq]: index into TASK_NAMES
    first: np.ndarray  # int64 [n_questions + 1]: question i's sequences are first[i]..first[i + 1] - 1
    path: Optional[Path] = None  # the file the arrays are memory-mapped from, if any

    def __len__(self) -> int:
        return len(self.first) - 1

    def sequences(self, i: int) -> dict[str, list[Sequence]]:
        """Question ``i``'s sequences by task, in the order encode_sample gave them."""
        a, b = int(self.first[i]), int(self.first[i + 1])
        starts = self.starts[a:b + 1].tolist()
        ids = self.ids[starts[0]:starts[-1]].tolist()
        out: dict[str, list[Sequence]] = {}
        rows = zip(self.task[a:b].tolist(), self.label_start[a:b].tolist(), self.video_start[a:b].tolist(),
                   self.full_length[a:b].tolist(), self.flags[a:b].tolist())
        for j, (task, label, video, full, flags) in enumerate(rows):
            seq_ids = ids[starts[j] - starts[0]:starts[j + 1] - starts[0]]
            out.setdefault(TASK_NAMES[task], []).append(
                Sequence(seq_ids, label, video, truncated=bool(flags & TRUNCATED), full_length=full,
                         lost_answer=bool(flags & LOST_ANSWER)))
        return out

    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def question_of(self, seqs: np.ndarray) -> np.ndarray:
        """The question each of the sequence indices ``seqs`` belongs to."""
        return np.searchsorted(self.first, seqs, side="right") - 1

    def unfit(self, max_feats: int) -> np.ndarray:
        """Indices of the sequences that :meth:`Sequence.fits` refuses, all at once."""
        n = self.lengths()
        bad = (self.video_start.astype(np.int64) + max_feats > n) | ((self.flags & LOST_ANSWER) != 0)
        bad |= ~np.isin(self.task, NO_TARGET_NEEDED) & (self.label_start >= n)
        return np.flatnonzero(bad)

    def longest(self) -> int:
        """The longest sequence before truncation (``full_length or len(ids)``)."""
        if not len(self.full_length):
            return 0
        return int(np.where(self.full_length != 0, self.full_length, self.lengths()).max())

    def n_truncated(self) -> int:
        """How many questions have at least one truncated sequence."""
        return len(np.unique(self.question_of(np.flatnonzero(self.flags & TRUNCATED))))

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "path"}

    @classmethod
    def load(cls, path: Path, verify: bool = True) -> tuple[dict[str, Any], "EncodedSplit"]:
        """(meta, split) of an array file written from :meth:`arrays`, memory-mapped."""
        meta, arrays = read_arrays(path, verify)
        missing = {f.name for f in fields(cls)} - {"path"} - set(arrays)
        if missing:
            raise ValueError(f"{path}: no {', '.join(sorted(missing))} array")
        split = cls(**arrays, path=path)
        if not split.consistent():
            raise ValueError(f"{path}: its arrays do not fit together")
        return meta, split

    def consistent(self) -> bool:
        """Whether the arrays' kinds and lengths fit together (a cheap check of a file's header)."""
        n_seq = len(self.label_start)
        per_seq = (self.video_start, self.full_length, self.flags, self.task)
        return (all(a.dtype.kind in "iu" for a in self.arrays().values()) and len(self.starts) == n_seq + 1
                and all(len(a) == n_seq for a in per_seq) and len(self.first) >= 1
                and int(self.first[-1]) == n_seq and int(self.starts[-1]) == len(self.ids))

    def __getstate__(self) -> dict:
        # A DataLoader worker started by spawn gets the file's name, not a copy of the arrays.
        return {"path": self.path} if self.path is not None else self.__dict__

    def __setstate__(self, state: dict) -> None:
        if set(state) == {"path"}:
            state = EncodedSplit.load(state["path"], verify=False)[1].__dict__
        self.__dict__.update(state)


class EncodedView:
    """``dataset.encoded``: question i's ``{task: [Sequence, ...]}``, made on demand."""

    def __init__(self, split: EncodedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, list[Sequence]]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.split.sequences(i % len(self))

    def __iter__(self) -> Iterator[dict[str, list[Sequence]]]:
        return (self.split.sequences(i) for i in range(len(self)))


class SplitBuilder:
    """Appends each question's encode_sample output to growing typed buffers (no per-token
    Python objects are kept)."""

    def __init__(self, n_words: int):
        self.dtype = ids_dtype(n_words)
        self.ids = array("H" if self.dtype == np.uint16 else "i")
        self.starts, self.first = array("q", [0]), array("q", [0])
        self.label_start, self.video_start, self.full_length = array("i"), array("i"), array("i")
        self.flags, self.task = array("B"), array("B")

    def add(self, encoded: dict[str, list[Sequence]]) -> None:
        for task, seqs in encoded.items():
            code = TASK_NAMES.index(task)
            for s in seqs:
                self.ids.extend(s.ids)
                self.starts.append(len(self.ids))
                self.label_start.append(s.label_start)
                self.video_start.append(s.video_start)
                self.full_length.append(s.full_length)
                self.flags.append(TRUNCATED * s.truncated | LOST_ANSWER * s.lost_answer)
                self.task.append(code)
        self.first.append(len(self.label_start))

    def finish(self) -> EncodedSplit:
        def view(buffer: array, dtype) -> np.ndarray:
            return np.frombuffer(buffer, dtype=dtype) if len(buffer) else np.empty(0, dtype)

        return EncodedSplit(view(self.ids, self.dtype), view(self.starts, np.int64),
                            view(self.label_start, np.int32), view(self.video_start, np.int32),
                            view(self.full_length, np.int32), view(self.flags, np.uint8),
                            view(self.task, np.uint8), view(self.first, np.int64))
