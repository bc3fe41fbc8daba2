"""NExT-QA: ``{split}.csv`` with columns video, question, answer, type, a0..a4 (and qid)."""

from pathlib import Path

from ..errors import FlipVQAError
from ..io import read_csv
from ..prompts import normalize_question
from .records import Record, check_answer, field_of

N_OPTIONS = 5
# Question types: causal (CH, CW), temporal (TN, TC, TP), descriptive (DL, DC, DO); the codes
# are the reference's, and its log reports the three groups.
QTYPES = {"CH": 1, "CW": 2, "TN": 3, "TC": 4, "TP": 5, "DL": 6, "DC": 7, "DO": 8}
GROUPS = {"C": (1, 2), "T": (3, 4, 5), "D": (6, 7, 8)}
WEIGHTED_GROUPS = True  # the reference's log sums correct answers per group (metrics.accuracy_stats)


def read(root: Path, split: str, features: dict, sub: bool) -> list[Record]:
    path = root / f"{split}.csv"
    records = []
    for n, row in enumerate(read_csv(path)):
        vid = str(field_of(row, "video", path, n))
        qtype = field_of(row, "type", path, n)
        if qtype not in QTYPES:
            raise FlipVQAError(f"{path}: entry {n} has type {qtype!r}, not one of {', '.join(QTYPES)}")
        records.append(Record(
            index=n, vid=vid, qid=row.get("qid"), qtype=QTYPES[qtype],
            question=normalize_question(field_of(row, "question", path, n)),
            options=[field_of(row, f"a{k}", path, n) for k in range(N_OPTIONS)],
            answer=check_answer(field_of(row, "answer", path, n, int), N_OPTIONS, path, n),
            frames=features.get(vid)))
    return records
