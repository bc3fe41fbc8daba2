"""Accuracy from scored questions: plain, per question type, and the reference's log values
(docs/faithfulness.md, "Training schedule and log")."""

from __future__ import annotations

import torch


def is_correct(row: dict) -> bool:
    """A multiple-choice row is correct when its prediction is the answer's index; an open-ended
    row carries ``correct`` (exact match against any acceptable answer)."""
    return bool(row["correct"]) if "correct" in row else row["prediction"] == row["answer"]


def accuracy(rows: list[dict]) -> float:
    return sum(is_correct(r) for r in rows) / len(rows)


def accuracy_stats(rows: list[dict], groups: dict[str, tuple[int, ...]], batch_size: int,
                   seed: int = 0, weighted_groups: bool = False) -> dict[str, float]:
    """``acc`` and the reference's per-group log values (``groups``: name -> question-type codes).

    The reference averages per-group accuracies over its (shuffled) validation batches, weighted
    by each batch's count plus 1e-10; that is reproduced here (batches in the order of its sampler
    for ``seed``), so the values can differ from plain ratios in the 10th decimal. NExT-QA's
    groups (``weighted_groups``) accumulate ``correct`` and log ``correct / (count + 1e-10)``;
    STAR's accumulate the batch accuracy. Plain ratios are in :func:`per_type_accuracy`.
    """
    correct = {r["index"]: is_correct(r) for r in rows}
    stats = {"acc": sum(correct.values()) / len(rows)}
    if not groups:
        return stats
    ep = 1e-10
    g = torch.Generator()
    g.manual_seed(seed)
    order = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    num = dict.fromkeys([*groups, "Total"], 0.0)
    den = dict.fromkeys([*groups, "Total"], 0.0)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for name, types in [*groups.items(), ("Total", None)]:
            sel = [correct[r["index"]] for r in chunk if types is None or r["qtype"] in types]
            den[name] += len(sel) + ep
            if weighted_groups and types is not None:
                num[name] += sum(sel)  # logged as correct / (count + ep)
            elif sel:
                num[name] += sum(sel) / len(sel) * (len(sel) + ep)  # logged as correct / count
    for name in num:
        stats[name] = num[name] / den[name]
    return stats


def per_type_accuracy(rows: list[dict], names: dict[int, str],
                      groups: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Plain accuracy per question type (``names``: code -> name) and per group of several types."""
    out = {}
    for code, name in names.items():
        sel = [r for r in rows if r["qtype"] == code]
        if sel:
            out[name] = accuracy(sel)
    for g, types in groups.items():
        sel = [r for r in rows if r["qtype"] in types]
        if sel and len(types) > 1:
            out[g] = accuracy(sel)
    return out
