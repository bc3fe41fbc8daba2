"""The common sample record and the file helpers every dataset reader shares."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..errors import FlipVQAError

FEATURE_DIM = 768  # CLIP ViT-L/14 image embeddings


@dataclass
class Record:
    """One multiple-choice question, as every reader produces it."""

    index: int  # 0-based position in the split's annotation file (the reference's "qid")
    vid: str
    question: str  # already normalised ("Why ...?")
    options: list[str]
    answer: int
    qtype: int = -1  # dataset-specific code (SPEC.md section 6); -1 when the dataset has none
    qid: Optional[str] = None  # the dataset's own question id, where it has one
    dialogue: str = ""  # "Dialogue: ...\n" with --sub, else ""
    subtitles_missing: bool = False  # --sub but the video has no subtitles at all
    frames: Optional[Tensor] = field(default=None, repr=False)  # [n, 768]; None: no features


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FlipVQAError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise FlipVQAError(f"{path}: not valid JSON ({exc})") from None


def read_jsonl(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except FileNotFoundError:
        raise FlipVQAError(f"{path}: file not found") from None
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise FlipVQAError(f"{path}: line {n} is not valid JSON ({exc})") from None
    return rows


def read_csv(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise FlipVQAError(f"{path}: file not found") from None


def field_of(row: dict, key: str, path: Path, n: int, convert: Callable = lambda x: x) -> Any:
    """``convert(row[key])``, or a one-line error naming the file, the row and the key."""
    if not isinstance(row, dict) or key not in row:
        raise FlipVQAError(f"{path}: entry {n} has no '{key}' field")
    try:
        return convert(row[key])
    except (TypeError, ValueError):
        raise FlipVQAError(f"{path}: entry {n} has a malformed '{key}': {row[key]!r}") from None


def check_answer(answer: int, n_options: int, path: Path, n: int) -> int:
    if not 0 <= answer < n_options:
        raise FlipVQAError(f"{path}: entry {n} has answer {answer}, outside 0..{n_options - 1}")
    return answer


def load_features(path: Path) -> dict[str, Tensor]:
    """``clipvitl14.pth``: {video id: float16 [frames, 768]}, memory-mapped where possible."""
    if not path.is_file():
        raise FlipVQAError(f"{path}: features file not found")
    try:
        features = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files written with the legacy (non-zip) format cannot be mapped
        try:
            features = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise FlipVQAError(f"{path}: cannot read features ({exc})") from None
    except Exception as exc:
        raise FlipVQAError(f"{path}: cannot read features ({exc})") from None
    if not isinstance(features, dict):
        raise FlipVQAError(f"{path}: expected a dict of video id -> tensor, got {type(features).__name__}")
    return {str(k): v for k, v in features.items()}


def slot_sources(n: int, max_feats: int) -> list[Optional[int]]:
    """Which of ``n`` frames fills each slot: uniform ``(j*n)//max_feats`` when there are more
    frames than slots, else the frames in order and None (a zero row) after them."""
    if n > max_feats:
        return [(j * n) // max_feats for j in range(max_feats)]
    return list(range(n)) + [None] * (max_feats - n)


def frames_to_slots(frames: Optional[Tensor], max_feats: int) -> tuple[Tensor, int]:
    """Exactly ``max_feats`` rows: uniform rows ``(j*n)//max_feats`` of a longer video, zero rows
    after a shorter one. A missing video is one zero row. Returns (rows, video_len)."""
    if frames is None:
        frames = torch.zeros(1, FEATURE_DIM)
    frames = frames.float()
    n = frames.shape[0]
    if n > max_feats:
        return frames[slot_sources(n, max_feats)], max_feats
    if n < max_feats:
        return torch.cat([frames, torch.zeros(max_feats - n, frames.shape[1])]), n
    return frames, n
