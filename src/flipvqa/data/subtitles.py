"""Dialogue text for ``--sub`` (TVQA's ``.srt`` files, VLEP's ``vlep_subtitles.jsonl``).

A caption is kept when it lies in the question's window or overlaps its start, with the
reference's rule and its integer-second times (docs/faithfulness.md, "Subtitles").
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def in_window(st: float, et: float, start: float, end: float) -> bool:
    return (st >= start and et <= end) or (st <= start and et <= end and start <= et)


def tvqa_dialogue(srt_path: Path, start: int, end: int) -> Optional[str]:
    """``d_text`` from an .srt file (times as minutes*60 + seconds: hours and milliseconds are
    ignored, as in the reference); "" when no caption is kept; None when the file is missing."""
    import pysrt

    if not srt_path.is_file():
        return None
    dialogue = ""
    for caption in pysrt.open(str(srt_path)):
        st = caption.start.minutes * 60 + caption.start.seconds
        et = caption.end.minutes * 60 + caption.end.seconds
        if in_window(st, et, start, end):
            dialogue += " " + caption.text.replace("\n", " ")
    return f"Dialogue: {dialogue}\n" if dialogue else ""


def vlep_dialogue(captions: list[dict], start: int, end: int) -> str:
    """``d_text`` from one VLEP subtitle row's ``sub`` list; never empty (as in the reference)."""
    dialogue = ""
    for caption in captions:
        st, et = int(caption["start"]), int(caption["end"])
        if in_window(st, et, start, end):
            dialogue += caption["text"].replace("-", "")
    return f"Dialogue: {dialogue}\n"
