"""VLEP: ``vlep_{train,dev,test}_release.jsonl`` (the val split reads dev) with {vid_name,
events[2], answer, ts}, and ``vlep_subtitles.jsonl`` with {vid_name, sub: [{start, end, text}]}."""

from pathlib import Path

from ..errors import FlipVQAError
from ..io import read_jsonl
from ..prompts import normalize_question
from .records import Record, check_answer, field_of, options_of
from .subtitles import vlep_dialogue

N_OPTIONS = 2
QUESTION = "Which event is more likely to happen right after?"


def read(root: Path, split: str, features: dict, sub: bool) -> list[Record]:
    path = root / f"vlep_{'dev' if split == 'val' else split}_release.jsonl"
    rows = read_jsonl(path)
    captions = {}
    if sub:
        sub_path = root / "vlep_subtitles.jsonl"
        for n, row in enumerate(read_jsonl(sub_path)):
            # The reference takes the first row of a video.
            captions.setdefault(str(field_of(row, "vid_name", sub_path, n)), field_of(row, "sub", sub_path, n, list))
    records = []
    for n, row in enumerate(rows):
        vid = str(field_of(row, "vid_name", path, n))
        options = options_of(row, "events", path, n, N_OPTIONS)
        ts = field_of(row, "ts", path, n, list)
        if len(ts) != 2:
            raise FlipVQAError(f"{path}: entry {n} has 'ts' {ts!r}, expected [start, end]")
        start, end = (field_of({"ts": t}, "ts", path, n, lambda x: round(float(x))) for t in ts)
        dialogue = vlep_dialogue(captions.get(vid, []), start, end) if sub else ""
        records.append(Record(
            index=n, vid=vid, qid=str(row["example_id"]) if "example_id" in row else None,
            question=normalize_question(QUESTION), options=options, dialogue=dialogue,
            answer=check_answer(field_of(row, "answer", path, n, int), N_OPTIONS, path, n),
            frames=features[vid][start:end + 1] if vid in features else None,
            subtitles_missing=sub and vid not in captions))
    return records
