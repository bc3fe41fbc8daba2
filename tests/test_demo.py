"""``flipvqa demo``: the synthetic data generator, a shortened (``--quick``) end-to-end run, and
the demo model that ships for ``flipvqa serve``."""

import argparse
import json

import pytest
import torch

from flipvqa import data
from flipvqa.demo import ASSETS, VARIANTS, add_arguments, report, run
from flipvqa.demo.synthetic import DATASET, EVENTS, MAX_FEATS, DemoSpec, generate, narration, write_generic
from flipvqa.openended import exact_match

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
    # Which questions are open-ended is a stream of its own: the questions stay the same.
    closed = generate(3, DemoSpec(train_videos=12, val_videos=5, open_ended=0.0))["train"].questions
    assert [q.question for q in closed] == [q.question for q in a["train"].questions]
    assert not any(q.open_ended for q in closed)


def test_written_files_are_generic_with_both_kinds(tmp_path):
    root = write_generic(tmp_path, 0, SMALL)
    assert sorted(p.name for p in root.iterdir()) == ["features.pth", "train.jsonl", "val.jsonl"]
    features = torch.load(root / "features.pth")
    for split in ("train", "val"):
        records = data.load_split(tmp_path, DATASET, split)
        assert len(records) == len(generate(0, SMALL)[split].questions) > 0
        for r in records:
            if r.open_ended:
                assert r.answer is None and r.answers and all(isinstance(a, str) for a in r.answers)
            else:
                assert len(r.options) == 5 and 0 <= r.answer < 5 and r.answers is None
            assert r.qtype in ("CW", "CH", "TN", "TP", "TC", "DC", "DO")
            assert r.frames is not None and r.frames.dtype == torch.float16
            assert r.frames.shape[1] == 768 and MAX_FEATS <= r.frames.shape[0] <= 16
            assert 8 < r.frames.float().norm(dim=1).mean() < 25  # CLIP-like norms
    train = data.load_split(tmp_path, DATASET, "train")
    assert 0.3 < sum(r.open_ended for r in train) / len(train) < 0.7
    assert set(features) == {r.vid for s in ("train", "val") for r in data.load_split(tmp_path, DATASET, s)}
    blind = write_generic(tmp_path / "blind", 0, SMALL, blind=True)
    assert all(not x.any() for x in torch.load(blind / "features.pth").values())
    assert (blind / "val.jsonl").read_text() == (root / "val.jsonl").read_text()


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
        assert q.answers[0] == q.options[q.answer]
        if q.qtype in ("TN", "TP", "TC", "DO"):
            assert q.options[q.answer] in told
        if q.qtype == "DO":
            assert sum(o in told for o in q.options) == 1
            assert sorted(q.answers) == sorted(set(told))  # in words, any activity of the video
        else:
            assert len(q.answers) == 1


def test_quick_demo_trains_on_both_kinds_and_reports_both(tmp_path, capsys):
    assert run(demo_args("--quick", "--json", "--output_dir", str(tmp_path))) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name, (first, *_, last) in summary["losses"]["full"].items():
        assert last < first, (name, summary["losses"]["full"])
    train_rows = report.read_jsonl(next((tmp_path / "data").glob(f"*/{DATASET}/train.jsonl")))
    assert {("options" in r) for r in train_rows} == {True, False}  # trained on both kinds
    assert summary["n_multiple_choice"] > 0 and summary["n_open_ended"] > 0
    assert summary["n_multiple_choice"] + summary["n_open_ended"] == summary["n_questions"]
    assert summary["multiple_choice_accuracy"] > summary["chance"]["multiple_choice"] == pytest.approx(0.2)
    assert 0 < summary["chance"]["open_ended"] < 0.5
    for value in (summary["open_ended_exact_match"], *summary["question_only"].values()):
        assert 0 <= value <= 1
    rows = report.read_jsonl(tmp_path / "flipped-vqa" / "predictions_val.jsonl")
    words = [r for r in rows if "correct" in r]
    assert len(words) == summary["n_open_ended"] and all(isinstance(r["prediction"], str) for r in words)
    assert summary["open_ended_exact_match"] == pytest.approx(sum(r["correct"] for r in words) / len(words))
    assert (tmp_path / "flipped-vqa" / "checkpoint_best.pth").is_file()
    report.print_table({k: v.label for k, v in VARIANTS.items()}, summary)
    table = capsys.readouterr().out
    assert "multiple-choice accuracy" in table and "open-ended exact match" in table
    assert "question only" in table and "\nchance" in table


@pytest.mark.skipif(not (ASSETS / "checkpoint.pth").is_file(), reason="the demo model is not built")
def test_shipped_model_answers_its_examples_in_words():
    from flipvqa.ask import Answerer

    answerer = Answerer(ASSETS / "checkpoint.pth", llama_model_path=str(ASSETS), model="demo-llama", device="cpu")
    examples = json.loads((ASSETS / "examples.json").read_text())
    features = torch.load(ASSETS / "examples.pth", weights_only=True)
    in_words = by_choice = 0
    for e in examples:
        video = features[e["video"]].float()
        said = answerer.generate(video, e["question"])
        assert not said.cut and said.answer
        in_words += exact_match(said.answer, e["answers"])
        by_choice += answerer.ask(video, e["question"], e["choices"]).index == e["answer"]
    assert in_words > len(examples) / 2 and by_choice > len(examples) / 2, (in_words, by_choice)
