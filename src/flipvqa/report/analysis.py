"""What the report computes from a run's predictions: per-type accuracy, the most confident
mistakes, the answer-position bias, and the questions' text from the val split."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import data
from ..config import PAPER_ACCURACY
from ..errors import FlipVQAError
from ..io import first_line
from ..metrics import accuracy, per_type_accuracy
from .runs import Run

TOP_MISTAKES = 10


def letter(k: int) -> str:
    """Option ``k``'s letter: A, B, ... Z (then its number: generic datasets stop at 26)."""
    return chr(ord("A") + k) if k < 26 else str(k + 1)


def probabilities(scores: list[float]) -> list[float]:
    """``softmax(-scores)``: the scores are mean cross-entropies, lower is better."""
    low = min(scores)
    weights = [math.exp(low - s) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def answered(run: Run) -> list[dict]:
    return [r for r in run.predictions or [] if r["answer"] is not None]


# ---------------------------------------------------------------------------- per type
@dataclass
class TypeRow:
    name: str
    accuracy: float  # a fraction
    count: int
    group: bool  # a group of several types (NExT-QA's C, T, D)


def type_table(run: Run) -> list[TypeRow]:
    """flipvqa.metrics.per_type_accuracy of the answered predictions, with question counts;
    [] when the dataset is unknown or has no types."""
    rows = answered(run)
    if not rows or run.dataset is None:
        return []
    names = data.type_names(run.dataset, (r["qtype"] for r in rows))
    groups = data.type_groups(run.dataset)
    codes = {name: code for code, name in names.items()}
    table = []
    for name, acc in per_type_accuracy(rows, names, groups).items():
        if name in codes:
            table.append(TypeRow(name, acc, sum(r["qtype"] == codes[name] for r in rows), False))
        else:
            table.append(TypeRow(name, acc, sum(r["qtype"] in groups[name] for r in rows), True))
    return table


def overall(run: Run) -> Optional[float]:
    """The predictions' accuracy (a fraction), None without answered predictions."""
    rows = answered(run)
    return accuracy(rows) if rows else None


def paper_accuracy(run: Run) -> Optional[tuple[str, float]]:
    """(preset, the paper's accuracy in %) when the run's options name a preset."""
    preset = run.args.get("preset")
    return (preset, PAPER_ACCURACY[preset]) if isinstance(preset, str) and preset in PAPER_ACCURACY else None


# ---------------------------------------------------------------------------- mistakes
@dataclass
class Mistake:
    row: dict  # the prediction
    probs: list[float]  # softmax(-scores)
    record: Optional[data.Record] = None  # the question, when the val split could be read

    @property
    def confidence(self) -> float:
        return self.probs[self.row["prediction"]]


def top_mistakes(run: Run, k: int = TOP_MISTAKES) -> list[Mistake]:
    """The ``k`` wrong predictions with the highest probability on the chosen option (ties: by index)."""
    wrong = [Mistake(r, probabilities(r["scores"])) for r in answered(run) if r["prediction"] != r["answer"]]
    wrong.sort(key=lambda m: (-m.confidence, m.row["index"]))
    return wrong[:k]


def attach_questions(run: Run, mistakes: list[Mistake]) -> Optional[str]:
    """Give each mistake its val-split record; returns why not (one line), or None when done."""
    records, why = val_records(run)
    if records is None:
        return why
    for m in mistakes:
        m.record = records[m.row["index"]]
    return None


def val_records(run: Run) -> tuple[Optional[list[data.Record]], Optional[str]]:
    """The run's val split (its questions and options), or (None, why it cannot be read).

    Only the annotations are read: no frame features (``features={}``) and no subtitles
    (``sub=False``); neither changes a question's text or options."""
    if run.dataset is None:
        return None, "the run's dataset is unknown (no run.json and no checkpoint_best.pth with its options)"
    given = run.args.get("data_path")
    if not isinstance(given, str) or not given:
        return None, "the run's options name no data_path"
    candidates = [Path(given)]
    if not Path(given).is_absolute():
        candidates.append(run.path.resolve().parent / given)
    root = next((c for c in candidates if (c / run.dataset).is_dir()), None)
    if root is None:
        tried = " nor ".join(str(c / run.dataset) for c in candidates)
        return None, f"the dataset folder is not there: neither {tried} exists"
    quiet = logging.getLogger("flipvqa.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # without features every question "has no video features"
    try:
        records = data.load_split(root, run.dataset, "val", False, features={})
    except (FlipVQAError, OSError) as exc:
        return None, f"the val split cannot be read: {first_line(exc)}"
    finally:
        quiet.setLevel(level)
    for r in run.predictions or []:
        if r["index"] >= len(records) or records[r["index"]].vid != r["vid"]:
            there = repr(records[r["index"]].vid) if r["index"] < len(records) else "no question"
            return None, (f"the val split in {root / run.dataset} does not match predictions_val.jsonl "
                          f"(question {r['index']}: {there} there, video {r['vid']!r} in the predictions)")
    return records, None


# ---------------------------------------------------------------------------- position bias
def position_bias(run: Run) -> tuple[list[str], list[list[int]]]:
    """(letters, counts[right][chosen]) over the answered predictions."""
    rows = answered(run)
    n = max((len(r["scores"]) for r in rows), default=0)
    counts = [[0] * n for _ in range(n)]
    for r in rows:
        counts[r["answer"]][r["prediction"]] += 1
    return [letter(k) for k in range(n)], counts
