"""Accuracy per question type: plain ratios, and the reference's batch-weighted log values,
checked against hand counts."""

import pytest

from flipvqa import data
from flipvqa.metrics import accuracy, accuracy_stats, per_type_accuracy

EP = 1e-10


def rows(spec):
    """spec: (qtype, correct) per question."""
    return [{"index": i, "qtype": t, "answer": 0, "prediction": 0 if ok else 1} for i, (t, ok) in enumerate(spec)]


NEXTQA = rows([(1, True), (2, False), (3, True), (4, True), (5, False), (6, True), (7, True), (8, False)])
STAR = rows([(1, True), (1, False), (2, True), (3, False), (4, True), (4, True)])


def test_plain_per_type_accuracy():
    got = per_type_accuracy(NEXTQA, data.type_names("nextqa"), data.type_groups("nextqa"))
    assert got["CH"] == 1.0 and got["CW"] == 0.0 and got["TP"] == 0.0
    assert got["C"] == 0.5 and got["T"] == pytest.approx(2 / 3) and got["D"] == pytest.approx(2 / 3)
    got = per_type_accuracy(STAR, data.type_names("star"), data.type_groups("star"))
    assert got == {"Interaction": 0.5, "Sequence": 1.0, "Prediction": 0.0, "Feasibility": 1.0}
    assert accuracy(STAR) == pytest.approx(4 / 6)


def test_nextqa_log_values_in_one_batch():
    # one batch: each group logs correct / (count + 1e-10)
    stats = accuracy_stats(NEXTQA, data.type_groups("nextqa"), batch_size=100, weighted_groups=True)
    assert stats["acc"] == 5 / 8
    assert stats["C"] == 1 / (2 + EP) and stats["T"] == 2 / (3 + EP) and stats["D"] == 2 / (3 + EP)
    assert stats["Total"] == pytest.approx(5 / 8, abs=1e-12)


def test_nextqa_log_values_one_question_per_batch():
    # eight batches of one: a group's denominator gains 1e-10 in every batch, also those without it
    stats = accuracy_stats(NEXTQA, data.type_groups("nextqa"), batch_size=1, weighted_groups=True)
    assert stats["C"] == 1 / (2 + 8 * EP)
    assert stats["T"] == 2 / (3 + 8 * EP)


def test_star_log_values_average_batch_accuracies():
    # STAR's groups accumulate the batch accuracy times (count + 1e-10)
    stats = accuracy_stats(STAR, data.type_groups("star"), batch_size=1)
    assert stats["In"] == pytest.approx(1 * (1 + EP) / (2 + 6 * EP), abs=0)
    assert stats["Seq"] == (1 + EP) / (1 + 6 * EP)
    assert stats["Pre"] == 0.0
    one_batch = accuracy_stats(STAR, data.type_groups("star"), batch_size=6)
    assert one_batch["In"] == pytest.approx(0.5, abs=1e-15) and one_batch["Feas"] == pytest.approx(1.0)


def test_datasets_without_types_log_only_acc():
    assert accuracy_stats(rows([(-1, True), (-1, False)]), data.type_groups("tvqa"), 2) == {"acc": 0.5}
