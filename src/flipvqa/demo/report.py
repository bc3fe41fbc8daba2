"""The demo's figures: per kind of question (multiple-choice accuracy, open-ended exact match) and
per group of types, for every trained model, next to chance; the table and the ``--json`` summary.

Chance: multiple-choice, one over the number of options; open-ended, the expected exact match of a
guess drawn uniformly from the answers that the training split gives questions of the same type
(ten activities for "what does the person do after X?", "one" to "five" for counting, ...; a
"what does the person do in the video?" question accepts several of them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..openended import exact_match, normalize_answer
from .synthetic import DATASET, N_OPTIONS

GROUPS = ("C", "T", "D")  # NExT-QA's groups: the first letter of the type code
KINDS = ("multiple_choice", "open_ended")
LEGEND = ("C: causal (why, how), T: temporal (after, before, first, last), D: descriptive (how many, what)\n"
          "open-ended: correct when the answer in words equals an acceptable one (SQuAD exact match: case, "
          "punctuation\nand articles aside); chance there: a guess among the train answers of the question's type")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def kind(row: dict) -> str:
    """A prediction row's kind: open-ended rows carry ``correct``."""
    return "open_ended" if "correct" in row else "multiple_choice"


def _correct(row: dict) -> float:
    return float(row["correct"]) if "correct" in row else float(row["prediction"] == row["answer"])


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def breakdown(values: list[tuple[str, str, float]]) -> dict[str, dict[str, Optional[float]]]:
    """(kind, type, value) triples -> {kind: {"all", "C", "T", "D": mean value}}."""
    out = {}
    for k in KINDS:
        mine = [(t, v) for kk, t, v in values if kk == k]
        out[k] = {"all": _mean([v for _, v in mine]),
                  **{g: _mean([v for t, v in mine if str(t).startswith(g)]) for g in GROUPS}}
    return out


def scores(predictions: Optional[str]) -> dict[str, dict[str, Optional[float]]]:
    """Multiple-choice accuracy and open-ended exact match, overall and per group, of a
    ``predictions_val.jsonl`` (all None without one)."""
    rows = read_jsonl(Path(predictions)) if predictions else []
    return breakdown([(kind(r), r["qtype"], _correct(r)) for r in rows])


def chance(data_path: Path) -> dict[str, dict[str, Optional[float]]]:
    """Chance per kind and group on the validation split (see the module's docstring)."""
    root = Path(data_path) / DATASET
    space: dict[str, set[str]] = {}
    for r in read_jsonl(root / "train.jsonl"):
        answer = r["options"][r["answer"]] if "options" in r else r["answer"][0]
        space.setdefault(r["type"], set()).add(normalize_answer(answer))
    values = []
    for r in read_jsonl(root / "val.jsonl"):
        if "options" in r:
            values.append(("multiple_choice", r["type"], 1.0 / len(r["options"])))
        else:
            guesses = space.get(r["type"], set())
            hits = sum(exact_match(g, r["answer"]) for g in guesses)
            values.append(("open_ended", r["type"], hits / len(guesses) if guesses else 0.0))
    return {k: {g: None if v is None else round(v, 6) for g, v in by.items()} for k, by in breakdown(values).items()}


def summary(results: dict, data_path: Path, seconds: float, output_dir: str) -> dict:
    """The ``--json`` object; ``results``: {"full"|"blind"|"vqa": train_and_evaluate's result}."""
    full = results["full"]
    per = {key: scores(r["eval"]["predictions"]) for key, r in results.items()}
    odds = chance(data_path)
    counts = {k: sum(kind(r) == k for r in read_jsonl(Path(full["eval"]["predictions"])))
              if full["eval"]["predictions"] else 0 for k in KINDS}
    out = {"accuracy": full["eval"]["accuracy"],
           "question_only_accuracy": results["blind"]["eval"]["accuracy"],
           "multiple_choice_accuracy": per["full"]["multiple_choice"]["all"],
           "open_ended_exact_match": per["full"]["open_ended"]["all"],
           "question_only": {k: per["blind"][k]["all"] for k in KINDS},
           "chance": {k: odds[k]["all"] for k in KINDS},
           "per_type": {k: {g: per["full"][k][g] for g in GROUPS} for k in KINDS},
           "per_model": per, "chance_per_type": odds,
           "seconds": round(seconds, 1),
           "n_questions": full["eval"]["n"], "n_multiple_choice": counts["multiple_choice"],
           "n_open_ended": counts["open_ended"],
           "first_epoch_accuracy": {k: r["train"]["log"][0]["val_acc"] for k, r in results.items()},
           "losses": {k: _losses(r["train"]["log"]) for k, r in results.items()},
           "checkpoint": full["checkpoint"], "predictions": full["eval"]["predictions"],
           "output_dir": output_dir}
    if "vqa" in results:
        out["vqa_only_accuracy"] = results["vqa"]["eval"]["accuracy"]
        out["vqa_only"] = {k: per["vqa"][k]["all"] for k in KINDS}
    return out


def _losses(history: list[dict]) -> dict[str, list[float]]:
    """Per objective, the epoch means of the training loss, first epoch to last."""
    return {k: [round(e[f"train_{k}_loss"], 4) for e in history] for k in ("vqa", "vaq", "qav")}


def print_table(labels: dict[str, str], summary: dict) -> None:
    """The table: per model, multiple-choice accuracy and open-ended exact match (all, C, T, D), and
    the accuracy over all questions at the best and the first epoch."""
    per, first = summary["per_model"], summary["first_epoch_accuracy"]

    def cells(values: dict) -> str:
        return "".join(f"{_pct(values[g]):>6}" for g in ("all", *GROUPS))

    def row(label: str, values: dict, best: Optional[float], first: Optional[float]) -> str:
        return (f"{label:<27}{cells(values['multiple_choice'])}   {cells(values['open_ended'])}"
                f"   {_pct(best):>6}{_pct(first):>8}")

    print(f"\nvalidation, % ({summary['n_questions']} questions: {summary['n_multiple_choice']} multiple-choice "
          f"with {N_OPTIONS} options, {summary['n_open_ended']} open-ended; best epoch)")
    print(f"{'':<27}{'multiple-choice accuracy':>24}   {'open-ended exact match':>24}   {'all questions':>14}")
    print(f"{'':<27}" + "".join(f"{h:>6}" for h in ("all", *GROUPS)) + "   "
          + "".join(f"{h:>6}" for h in ("all", *GROUPS)) + f"   {'best':>6}{'1st ep.':>8}")
    for key in per:
        print(row(labels[key], per[key], _overall(summary, key), first[key]))
    print(row("chance", summary["chance_per_type"], None, None))
    print(LEGEND)
    losses = summary["losses"]["full"]
    print("Flipped-VQA training losses, first -> last epoch: "
          + ", ".join(f"{k} {v[0]:.3f} -> {v[-1]:.3f}" for k, v in losses.items()))
    print(f"\ncheckpoint:  {summary['checkpoint']}\npredictions: {summary['predictions']}")
    print(f"every run:   {summary['output_dir']}/<run>/ (log.txt, checkpoint, predictions); "
          f"data: {summary['output_dir']}/data/")
    print(f"time: {summary['seconds']:.0f} s")


def _overall(summary: dict, key: str) -> Optional[float]:
    return {"full": summary["accuracy"], "blind": summary["question_only_accuracy"]}.get(
        key, summary.get("vqa_only_accuracy"))


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"
