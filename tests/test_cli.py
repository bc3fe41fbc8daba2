"""End to end from the command line: ``flipvqa eval`` and ``flipvqa train`` on the reference cases."""

import json
import subprocess
import sys

import pytest
import torch

from flipvqa.cli import main

from conftest import CASES, case_dir, case_flags, expected, TORCHRUN_PORT


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("name", CASES)
def test_eval_command_reproduces_expected_scores(name, tmp_path):
    flags = case_flags(name, resume=case_dir(name) / "checkpoint.pth", output_dir=tmp_path, batch_size=3)
    run = subprocess.run([sys.executable, "-m", "flipvqa", "eval", *flags], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = read_jsonl(tmp_path / "predictions_val.jsonl")
    exp = expected(name)["val"]
    want = {}
    for batch in exp["batches"]:
        for i, scores, pred in zip(batch["index"], batch["scores"], batch["prediction"]):
            want[i] = (scores, pred)
    assert [r["index"] for r in rows] == list(range(len(want)))
    for r in rows:
        assert r["scores"] == pytest.approx(want[r["index"]][0], abs=1e-4)
        assert r["prediction"] == want[r["index"]][1]
        assert set(r) == {"index", "qid", "vid", "answer", "prediction", "scores", "qtype"}
    acc = sum(r["prediction"] == r["answer"] for r in rows) / len(rows)
    assert acc == pytest.approx(exp["accuracy"])
    assert f"accuracy: {exp['accuracy']:.4f}" in run.stdout


def train_flags(name, out, resume):
    spec = json.loads((case_dir(name) / "train" / "train.json").read_text())
    return spec, ["train", *case_flags(name, resume=resume, output_dir=out, **spec["flags"])]


def assert_log_matches(log_lines, want_epochs):
    assert [e["epoch"] for e in log_lines] == [e["epoch"] for e in want_epochs]
    for got, want in zip(log_lines, want_epochs):
        want = want["log"]
        assert list(got) == list(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-4), (want["epoch"], key)
        assert got["val_acc"] == want["val_acc"]


@pytest.mark.parametrize("name", ["tvqa", "vlep", "nextqa"])
def test_train_reproduces_reference_log_and_checkpoint(name, tmp_path):
    spec, args = train_flags(name, tmp_path, case_dir(name) / "checkpoint.pth")
    assert main(["-q", *args]) == 0
    assert_log_matches(read_jsonl(tmp_path / "log.txt"), spec["epochs"])
    ours = _load(tmp_path / "checkpoint_best.pth")
    theirs = _load(case_dir(name) / "train" / "checkpoint_best.pth")
    assert ours["epoch"] == theirs["epoch"] == spec["best_epoch"]
    assert set(ours["model"]) == set(theirs["model"])
    for key, value in theirs["model"].items():
        torch.testing.assert_close(ours["model"][key], value, atol=1e-3, rtol=0)
    assert (tmp_path / "predictions_val.jsonl").is_file()


def test_resume_from_reference_checkpoint_repeats_last_epochs(tmp_path):
    spec, args = train_flags("tvqa", tmp_path, case_dir("tvqa") / "train" / "checkpoint_best.pth")
    assert main(["-q", *args]) == 0
    assert_log_matches(read_jsonl(tmp_path / "log.txt"), spec["epochs"][spec["best_epoch"] + 1:])


def test_resume_from_our_checkpoint(tmp_path):
    spec, args = train_flags("tvqa", tmp_path / "a", case_dir("tvqa") / "checkpoint.pth")
    assert main(["-q", *args]) == 0  # its best checkpoint is epoch 2's
    spec, args = train_flags("tvqa", tmp_path / "b", tmp_path / "a" / "checkpoint_best.pth")
    assert main(["-q", *args]) == 0
    assert_log_matches(read_jsonl(tmp_path / "b" / "log.txt"), spec["epochs"][3:])


def _load(path):
    from flipvqa.checkpoints import load_checkpoint

    return load_checkpoint(path)


def test_eval_under_torchrun_scores_every_question_once(tmp_path):
    flags = case_flags("nextqa", resume=case_dir("nextqa") / "checkpoint.pth", output_dir=tmp_path, batch_size=3)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", *TORCHRUN_PORT(), "--nproc_per_node", "2",
                          "-m", "flipvqa", "eval", *flags], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = read_jsonl(tmp_path / "predictions_val.jsonl")
    exp = expected("nextqa")["val"]
    assert [r["index"] for r in rows] == list(range(8))
    want = {i: s for b in exp["batches"] for i, s in zip(b["index"], b["scores"])}
    for r in rows:
        assert r["scores"] == pytest.approx(want[r["index"]], abs=1e-4)
    assert run.stdout.count("accuracy:") == 1
