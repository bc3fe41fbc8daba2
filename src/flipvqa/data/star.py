"""STAR: ``STAR_{split}.json``, a list of {question_id, question, video_id, start, end, answer,
choices: [{choice_id, choice}]}; the answer is given as text."""

from pathlib import Path

from ..errors import FlipVQAError
from ..prompts import normalize_question
from .records import Record, field_of, read_list

N_OPTIONS = 4
# The type is the part of question_id before "_"; the reference logs each type as its own group.
QTYPES = {"Interaction": 1, "Sequence": 2, "Prediction": 3, "Feasibility": 4}
GROUPS = {"In": (1,), "Seq": (2,), "Pre": (3,), "Feas": (4,)}


def read(root: Path, split: str, features: dict, sub: bool) -> list[Record]:
    path = root / f"STAR_{split}.json"
    records = []
    for n, row in enumerate(read_list(path)):
        qid = str(field_of(row, "question_id", path, n))
        kind = qid.split("_")[0]
        if kind not in QTYPES:
            raise FlipVQAError(f"{path}: entry {n} has question_id {qid!r}, whose type is not one of "
                               f"{', '.join(QTYPES)}")
        choices = field_of(row, "choices", path, n)
        if not isinstance(choices, list) or not all(isinstance(c, dict) and {"choice_id", "choice"} <= set(c)
                                                    for c in choices):
            raise FlipVQAError(f"{path}: entry {n} has malformed 'choices' (a list of {{choice_id, choice}})")
        options = [c["choice"] for c in sorted(choices, key=lambda c: c["choice_id"])]
        if len(options) != N_OPTIONS:
            raise FlipVQAError(f"{path}: entry {n} has {len(options)} choices, expected {N_OPTIONS}")
        answer_text = field_of(row, "answer", path, n)
        if answer_text not in options:
            raise FlipVQAError(f"{path}: entry {n}: the answer {answer_text!r} is not among its choices")
        vid = str(field_of(row, "video_id", path, n))
        start = round(field_of(row, "start", path, n, float))
        end = round(field_of(row, "end", path, n, float))
        frames = features[vid][start:end + 1] if vid in features else None
        records.append(Record(
            index=n, vid=vid, qid=qid, qtype=QTYPES[kind],
            question=normalize_question(field_of(row, "question", path, n)),
            options=options, answer=options.index(answer_text), frames=frames))
    return records
