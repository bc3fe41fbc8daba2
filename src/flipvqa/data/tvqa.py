"""TVQA: ``tvqa_{split}.jsonl`` with {vid_name, q, a0..a4, answer_idx, ts "start-end"} and
``tvqa_subtitles/<vid_name>.srt``. Features are 3 frames per second."""

import math
from pathlib import Path

from ..io import read_jsonl
from ..prompts import normalize_question
from .records import Record, check_answer, field_of
from .subtitles import tvqa_dialogue

N_OPTIONS = 5
FPS = 3


def parse_ts(ts: str) -> tuple[int, int]:
    """Rounded (start, end) seconds; ``NaN-NaN`` means the whole video, as -1000..1000."""
    start, end = map(float, str(ts).split("-"))
    if math.isnan(start) or math.isnan(end):
        return -1000, 1000
    return round(start), round(end)


def read(root: Path, split: str, features: dict, sub: bool) -> list[Record]:
    path = root / f"tvqa_{split}.jsonl"
    records = []
    for n, row in enumerate(read_jsonl(path)):
        vid = str(field_of(row, "vid_name", path, n))
        start, end = field_of(row, "ts", path, n, parse_ts)
        dialogue = tvqa_dialogue(root / "tvqa_subtitles" / f"{vid}.srt", start, end) if sub else ""
        records.append(Record(
            index=n, vid=vid, qid=str(row["qid"]) if "qid" in row else None,
            question=normalize_question(field_of(row, "q", path, n)),
            options=[field_of(row, f"a{k}", path, n) for k in range(N_OPTIONS)],
            answer=check_answer(field_of(row, "answer_idx", path, n, int), N_OPTIONS, path, n),
            dialogue=dialogue or "", subtitles_missing=dialogue is None,
            frames=features[vid][start * FPS:(end + 1) * FPS] if vid in features else None))
    return records
