"""Reading a run folder (``--output_dir`` of ``flipvqa train``) for the report, with every
malformed file reported as one line naming it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import FlipVQAError
from ..io import read_json_object, read_jsonl

LOSSES = ("loss", "vqa_loss", "vaq_loss", "qav_loss")
STEP_REQUIRED = ("lr", *LOSSES)  # numbers (or null) in every metrics.jsonl entry
STEP_OPTIONAL = ("grad_norm", "seconds")


@dataclass
class Run:
    """One run folder's files, checked."""

    path: Path
    name: str  # what the page and the legends call it (the folder name, made unique)
    log: list[dict]  # log.txt: one entry per epoch, by epoch (the last entry of a repeated epoch)
    repeated: list[int] = field(default_factory=list)  # epochs that log.txt logs more than once
    steps: Optional[list[dict]] = None  # metrics.jsonl, by step; None without the file
    predictions: Optional[list[dict]] = None  # predictions_val.jsonl; None without the file
    args: dict = field(default_factory=dict)  # the run's options
    args_source: Optional[str] = None  # "run.json", "checkpoint_best.pth" or None (unknown)

    @property
    def dataset(self) -> Optional[str]:
        value = self.args.get("dataset")
        return value if isinstance(value, str) and value else None

    @property
    def best(self) -> tuple[float, int]:
        """(best val_acc, its epoch): the first epoch reaching the maximum, as train selects."""
        entry = max(self.log, key=lambda e: (e["val_acc"], -e["epoch"]))
        return entry["val_acc"], entry["epoch"]


def load_runs(dirs: list[str]) -> list[Run]:
    paths = [Path(d) for d in dirs]
    names = _unique_names(paths)
    return [load_run(p, n) for p, n in zip(paths, names)]


def load_run(path: Path, name: Optional[str] = None) -> Run:
    if not path.is_dir():
        raise FlipVQAError(f"{path}: not a folder (give the --output_dir of flipvqa train)")
    if not (path / "log.txt").is_file():
        raise FlipVQAError(f"{path}: holds no log.txt (not a flipvqa train --output_dir, or no epoch finished)")
    log, repeated = read_log(path / "log.txt")
    run = Run(path=path, name=name or _folder_name(path), log=log, repeated=repeated)
    if (path / "metrics.jsonl").is_file():
        run.steps = read_steps(path / "metrics.jsonl")
    if (path / "predictions_val.jsonl").is_file():
        run.predictions = read_predictions(path / "predictions_val.jsonl")
    run.args, run.args_source = read_args(path)
    return run


# ---------------------------------------------------------------------------- the files
def read_log(path: Path) -> tuple[list[dict], list[int]]:
    """log.txt's entries, one per epoch (a resumed run appends epochs again: the last one counts)."""
    by_epoch: dict[int, dict] = {}
    repeated = []
    for n, entry in enumerate(read_jsonl(path), 1):
        if not isinstance(entry, dict):
            raise FlipVQAError(f"{path}: entry {n} is not a JSON object")
        epoch = _int(entry, "epoch", path, n)
        acc = _number(entry, "val_acc", path, n)
        if acc is None or not 0 <= acc <= 1:
            raise FlipVQAError(f"{path}: entry {n} has val_acc {entry['val_acc']!r}, expected a fraction in 0..1")
        for key, value in entry.items():
            if key.startswith(("train_", "val_")) and key != "val_acc":
                _number(entry, key, path, n)
        if epoch in by_epoch and epoch not in repeated:
            repeated.append(epoch)
        by_epoch[epoch] = entry
    if not by_epoch:
        raise FlipVQAError(f"{path}: no epoch logged")
    return [by_epoch[e] for e in sorted(by_epoch)], sorted(repeated)


def read_steps(path: Path) -> list[dict]:
    """metrics.jsonl's entries, by step (the last entry of a step logged twice)."""
    by_step: dict[int, dict] = {}
    for n, entry in enumerate(read_jsonl(path), 1):
        if not isinstance(entry, dict):
            raise FlipVQAError(f"{path}: entry {n} is not a JSON object")
        step, epoch = _int(entry, "step", path, n), _int(entry, "epoch", path, n)
        row = {"step": step, "epoch": epoch}
        for key in (*STEP_REQUIRED, *STEP_OPTIONAL):
            if key not in entry and key in STEP_REQUIRED:
                raise FlipVQAError(f"{path}: entry {n} has no '{key}' field")
            value = _number(entry, key, path, n) if key in entry else None
            row[key] = math.nan if value is None else value
        by_step[step] = row
    return [by_step[s] for s in sorted(by_step)]


def read_predictions(path: Path) -> list[dict]:
    rows = []
    for n, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row, dict):
            raise FlipVQAError(f"{path}: entry {n} is not a JSON object")
        index, prediction = _int(row, "index", path, n), _int(row, "prediction", path, n)
        scores = row.get("scores")
        if not isinstance(scores, list) or not scores or not all(_is_number(s) for s in scores):
            raise FlipVQAError(f"{path}: entry {n} has malformed 'scores' (expected a list of numbers)")
        answer = row.get("answer")
        if answer is not None and (not isinstance(answer, int) or isinstance(answer, bool)):
            raise FlipVQAError(f"{path}: entry {n} has a malformed 'answer': {answer!r}")
        for key, value in (("prediction", prediction), ("answer", answer)):
            if value is not None and not 0 <= value < len(scores):
                raise FlipVQAError(f"{path}: entry {n} has {key} {value}, outside the "
                                   f"{len(scores)} scored options")
        qtype = row.get("qtype", -1)
        if not isinstance(qtype, (int, str)) or isinstance(qtype, bool):
            raise FlipVQAError(f"{path}: entry {n} has a malformed 'qtype': {qtype!r}")
        if index < 0:
            raise FlipVQAError(f"{path}: entry {n} has a negative 'index'")
        rows.append({"index": index, "qid": row.get("qid"), "vid": str(row.get("vid", "")), "answer": answer,
                     "prediction": prediction, "scores": [float(s) for s in scores], "qtype": qtype})
    return rows


def read_args(path: Path) -> tuple[dict, Optional[str]]:
    """The run's options: run.json's ``args``, else checkpoint_best.pth's stored args, else {}."""
    if (path / "run.json").is_file():
        args = read_json_object(path / "run.json").get("args")
        if not isinstance(args, dict):
            raise FlipVQAError(f"{path / 'run.json'}: no 'args' object")
        return args, "run.json"
    if (path / "checkpoint_best.pth").is_file():
        from ..checkpoints import load_checkpoint  # torch and the model code only when needed
        from ..checkpoints.trainable import stored_args

        return stored_args(load_checkpoint(path / "checkpoint_best.pth")), "checkpoint_best.pth"
    return {}, None


# ---------------------------------------------------------------------------- helpers
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(entry: dict, key: str, path: Path, n: int) -> Optional[float]:
    """``entry[key]`` as a float (None for null); a missing key or a non-number is an error."""
    if key not in entry:
        raise FlipVQAError(f"{path}: entry {n} has no '{key}' field")
    value = entry[key]
    if value is None:
        return None
    if not _is_number(value):
        raise FlipVQAError(f"{path}: entry {n} has a malformed '{key}': {value!r} (expected a number)")
    return float(value)


def _int(entry: dict, key: str, path: Path, n: int) -> int:
    if key not in entry:
        raise FlipVQAError(f"{path}: entry {n} has no '{key}' field")
    value = entry[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise FlipVQAError(f"{path}: entry {n} has a malformed '{key}': {value!r} (expected an integer)")
    return value


def _folder_name(path: Path) -> str:
    return path.resolve().name or str(path)


def _unique_names(paths: list[Path]) -> list[str]:
    """Folder names; where two runs share one, ``parent/name``, then a number."""
    names = [_folder_name(p) for p in paths]
    names = [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
    counts, seen = {n: names.count(n) for n in names}, {}
    for i, name in enumerate(names):
        if counts[name] > 1:
            seen[name] = seen.get(name, 0) + 1
            names[i] = f"{name} ({seen[name]})"
    return names
