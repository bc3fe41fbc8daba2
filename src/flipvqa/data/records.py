"""The common sample record and the file helpers every dataset reader shares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..errors import FlipVQAError
from ..io import load_tensors, read_json
from ..model.inputs import FEATURE_DIM
from . import store



@dataclass(slots=True)  # no per-record __dict__: 70 bytes less a question, 70 MB at a million
class Record:
    """One question, as every reader produces it: multiple-choice (``options``, ``answer``) or
    open-ended (no options; ``answers``, the acceptable answer texts)."""

    index: int  # 0-based position in the split's annotation file (the reference's "qid")
    vid: str
    question: str  # already normalised ("Why ...?")
    options: list[str]  # [] for an open-ended question
    answer: Optional[int]  # 0-based; None in a split used only for prediction (and when open-ended)
    qtype: int | str = -1  # the reader's QTYPES code, a generic dataset's type name; -1: none
    qid: Optional[str] = None  # the dataset's own question id, where it has one
    dialogue: str = ""  # "Dialogue: ...\n" with --sub, else ""
    subtitles_missing: bool = False  # --sub but the video has no subtitles at all
    frames: Optional[Tensor] = field(default=None, repr=False)  # [n, width]; None: no features
    answers: Optional[list[str]] = None  # open-ended: the acceptable answers, the first trained on

    @property
    def open_ended(self) -> bool:
        return not self.options

    @property
    def answered(self) -> bool:
        """Whether the question has its answer (a split used only for prediction has none)."""
        return self.answers is not None if self.open_ended else self.answer is not None

    @property
    def target(self) -> int | str:
        """What training predicts: the correct option's index, or the first acceptable answer."""
        if not self.answered:
            raise FlipVQAError(f"question {self.index} (video {self.vid}) has no answer")
        return self.answers[0] if self.open_ended else self.answer


def read_list(path: Path) -> list:
    """A JSON file holding a list of questions (STAR, DramaQA)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise FlipVQAError(f"{path}: expected a list of questions")
    return data


def field_of(row: dict, key: str, path: Path, n: int, convert: Callable = lambda x: x) -> Any:
    """``convert(row[key])``, or a one-line error naming the file, the row and the key."""
    if not isinstance(row, dict) or key not in row:
        raise FlipVQAError(f"{path}: entry {n} has no '{key}' field")
    try:
        return convert(row[key])
    except (TypeError, ValueError):
        raise FlipVQAError(f"{path}: entry {n} has a malformed '{key}': {row[key]!r}") from None


def options_of(row: dict, key: str, path: Path, n: int, count: int) -> list:
    """The list ``row[key]`` of exactly ``count`` options."""
    options = field_of(row, key, path, n)
    if not isinstance(options, list):
        raise FlipVQAError(f"{path}: entry {n} has a malformed '{key}' (not a list): {options!r}")
    if len(options) != count:
        raise FlipVQAError(f"{path}: entry {n} has {len(options)} {key}, expected {count}")
    return options


def check_answer(answer: int, n_options: int, path: Path, n: int) -> int:
    if not 0 <= answer < n_options:
        raise FlipVQAError(f"{path}: entry {n} has answer {answer}, outside 0..{n_options - 1}")
    return answer


def load_features(path: Path) -> Mapping[str, Tensor]:
    """{video id: float16 [frames, 768]} of a features file: its packed store
    (:mod:`flipvqa.data.store`, ``clipvitl14.safetensors``) where there is one, else the ``.pth``."""
    chosen = store.preferred(path)
    return store.open_store(chosen) if store.is_packed(chosen) else load_pth(Path(path))


def load_pth(path: Path) -> dict[str, Tensor]:
    """``clipvitl14.pth``: {video id: float16 [frames, 768]}, memory-mapped where possible."""
    features = load_tensors(path, "features")
    if not isinstance(features, dict):
        raise FlipVQAError(f"{path}: expected a dict of video id -> tensor, got {type(features).__name__}")
    bad = next((k for k, v in features.items() if not torch.is_tensor(v) or v.dim() != 2), None)
    if bad is not None:
        raise FlipVQAError(f"{path}: video {bad!r} is not a [frames, width] tensor")
    return {str(k): v for k, v in features.items()}


def feature_width(features: Mapping[str, Tensor], path: Path) -> Optional[int]:
    """The common width of every video's features (None for an empty file); mixed widths are an
    error naming two videos."""
    if isinstance(features, store.PackedFeatures):  # one width by construction: no need to look
        return features.width if len(features) else None
    widths: dict[int, str] = {}
    for vid, v in features.items():
        widths.setdefault(int(v.shape[1]), vid)
    if len(widths) > 1:
        (w1, v1), (w2, v2) = list(widths.items())[:2]
        raise FlipVQAError(f"{path}: features of different widths: {v1!r} is {w1}-d, {v2!r} is {w2}-d")
    return next(iter(widths), None)


def slot_sources(n: int, max_feats: int) -> list[Optional[int]]:
    """Which of ``n`` frames fills each slot: uniform ``(j*n)//max_feats`` when there are more
    frames than slots, else the frames in order and None (a zero row) after them."""
    if n > max_feats:
        return [(j * n) // max_feats for j in range(max_feats)]
    return list(range(n)) + [None] * (max_feats - n)


def frames_to_slots(frames: Optional[Tensor], max_feats: int, width: int = FEATURE_DIM) -> tuple[Tensor, int]:
    """Exactly ``max_feats`` rows: uniform rows ``(j*n)//max_feats`` of a longer video, zero rows
    after a shorter one. A missing video is one zero row of ``width``. Returns (rows, video_len)."""
    if frames is None:
        frames = torch.zeros(1, width)
    frames = frames.float()
    n = frames.shape[0]
    if n > max_feats:
        return frames[slot_sources(n, max_feats)], max_feats
    if n < max_feats:
        return torch.cat([frames, torch.zeros(max_feats - n, frames.shape[1])]), n
    return frames, n
