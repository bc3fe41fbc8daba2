"""``flipvqa demo``: the synthetic data generator and a shortened (``--quick``) end-to-end run."""

import argparse
import csv
import json

import pytest
import torch

from flipvqa import data
from flipvqa.demo import add_arguments, run
from flipvqa.demo.synthetic import CSV_COLUMNS, EVENTS, MAX_FEATS, DemoSpec, generate, narration, write_nextqa

SMALL = DemoSpec(train_videos=12, val_videos=5)


def demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_generator_is_deterministic_and_seeded():
    a, b, c = generate(3, SMALL), generate(3, SMALL), generate(4, SMALL)
    assert a["train"].questions == b["train"].questions and a["val"].questions == b["val"].questions
    assert all(torch.equal(a["val"].features[k], b["val"].features[k]) for k in a["val"].features)
    assert a["train"].questions != c["train"].questions
    # The splits have their own streams: a bigger train split leaves val as it was.
    assert generate(3, DemoSpec(train_videos=20, val_videos=5))["val"].questions == a["val"].questions


def test_written_files_are_nextqa(tmp_path):
    root = write_nextqa(tmp_path, 0, SMALL)
    with open(root / "train.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == CSV_COLUMNS
    features = torch.load(root / "clipvitl14.pth")
    for split in ("train", "val"):
        records = data.load_split(tmp_path, "nextqa", split)
        assert len(records) == len(generate(0, SMALL)[split].questions) > 0
        for r in records:
            assert len(r.options) == 5 and 0 <= r.answer < 5 and r.qtype in range(1, 9)
            assert r.frames is not None and r.frames.dtype == torch.float16
            assert r.frames.shape[1] == 768 and MAX_FEATS <= r.frames.shape[0] <= 16
            assert 8 < r.frames.float().norm(dim=1).mean() < 25  # CLIP-like norms
    assert set(features) == {r.vid for s in ("train", "val") for r in data.load_split(tmp_path, "nextqa", s)}
    blind = write_nextqa(tmp_path / "blind", 0, SMALL, blind=True)
    assert all(not x.any() for x in torch.load(blind / "clipvitl14.pth").values())
    assert (blind / "val.csv").read_text() == (root / "val.csv").read_text()


def test_questions_are_consistent_with_their_videos():
    split = generate(1, DemoSpec(train_videos=60, val_videos=1))["train"]
    videos = {v.vid: v for v in split.videos}
    words = {e.doing for e in EVENTS}
    for q in split.questions:
        told = narration(videos[q.vid])
        assert len(told) == MAX_FEATS and set(told) <= words
        # every run of the video survives the sampling to MAX_FEATS slots
        runs = [w for i, w in enumerate(told) if i == 0 or told[i - 1] != w]
        assert runs == [EVENTS[e].doing for e in videos[q.vid].events]
        if q.qtype in ("TN", "TP", "TC", "DO"):
            assert q.options[q.answer] in told
        if q.qtype == "DO":
            assert sum(o in told for o in q.options) == 1


def test_quick_demo_learns(tmp_path, capsys):
    assert run(demo_args("--quick", "--json", "--output_dir", str(tmp_path))) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name, (first, *_, last) in summary["losses"]["full"].items():
        assert last < first, (name, summary["losses"]["full"])
    assert summary["accuracy"] > summary["chance"] == pytest.approx(0.2)
    assert 0 <= summary["question_only_accuracy"] <= 1
    assert (tmp_path / "flipped-vqa" / "checkpoint_best.pth").is_file()
    assert (tmp_path / "flipped-vqa" / "predictions_val.jsonl").is_file()
