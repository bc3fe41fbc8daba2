"""Runs that survive: killed anywhere (SIGKILL) or stopped (SIGTERM) and resumed with
``--resume auto``, a run ends with the log, weights and predictions of an uninterrupted one;
resuming into an earlier run's folder; non-finite losses; metrics.jsonl and TensorBoard."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from flipvqa.cli import main

from conftest import case_dir, case_flags, TORCHRUN_PORT

# tvqa's case: 4 train questions, batch 1, accumulation 2: 2 optimizer steps per epoch
FLAGS = {"epochs": 3, "warmup_epochs": 1, "blr": 20.0, "weight_decay": 0.14, "batch_size": 1, "accum_iter": 2,
         "save_every": 1}


def train_args(out, **extra):
    """The run starts from the seeded initial weights (a --resume file would be replaced by
    --resume auto on the resumed runs)."""
    return ["train", *case_flags("tvqa", output_dir=out, **{**FLAGS, **extra})]


def run(out, crash=None, resume_auto=False, **extra) -> subprocess.CompletedProcess:
    argv = train_args(out, **extra) + (["--resume", "auto"] if resume_auto else [])
    env = {k: v for k, v in os.environ.items() if k != "FLIPVQA_CRASH_AT"}
    if crash:
        env["FLIPVQA_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "flipvqa", "-q", *argv], capture_output=True, text=True, env=env,
                          timeout=300)


def lines(path):
    return [json.loads(line) for line in open(path)]


def weights(path):
    return torch.load(path, weights_only=False)["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = run(out)
    assert done.returncode == 0, done.stderr
    return out


def assert_same_run(out, ref):
    assert lines(out / "log.txt") == lines(ref / "log.txt")  # every value, exactly (CPU)
    assert lines(out / "predictions_val.jsonl") == lines(ref / "predictions_val.jsonl")
    ours, theirs = weights(out / "checkpoint_best.pth"), weights(ref / "checkpoint_best.pth")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    last, ref_last = weights(out / "checkpoint_last.pth"), weights(ref / "checkpoint_last.pth")
    assert all(torch.equal(last[k], ref_last[k]) for k in last)
    steps = [m["step"] for m in lines(out / "metrics.jsonl")]
    assert steps == [m["step"] for m in lines(ref / "metrics.jsonl")] == list(range(1, len(steps) + 1))
    for ours_m, theirs_m in zip(lines(out / "metrics.jsonl"), lines(ref / "metrics.jsonl")):
        assert {k: v for k, v in ours_m.items() if k != "seconds"} == {k: v for k, v in theirs_m.items()
                                                                       if k != "seconds"}
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))


def test_uninterrupted_run_writes_one_line_per_step_and_epoch(uninterrupted):
    assert [e["epoch"] for e in lines(uninterrupted / "log.txt")] == [0, 1, 2]
    metrics = lines(uninterrupted / "metrics.jsonl")
    assert len(metrics) == 3 * 2  # 4 batches / accumulation 2, 3 epochs
    assert set(metrics[0]) == {"step", "epoch", "lr", "loss", "vqa_loss", "vaq_loss", "qav_loss", "grad_norm",
                               "seconds"}
    assert [m["epoch"] for m in metrics] == [0, 0, 1, 1, 2, 2] and all(m["grad_norm"] > 0 for m in metrics)
    state = torch.load(uninterrupted / "checkpoint_last.pth", weights_only=False)
    assert state["progress"]["epoch"] == 3 and state["progress"]["global_step"] == 6


@pytest.mark.parametrize("kills", [
    ["micro_batch:3"],  # mid-accumulation in epoch 1 (its first batch, after 2 saved steps)
    ["validation:2", "write:3"],  # during validation; then while a checkpoint is written
    ["micro_batch:2", "micro_batch:1", "validation:1", "micro_batch:4"],  # again and again
], ids=["mid-accumulation", "validation-then-write", "four-kills"])
def test_killed_anywhere_and_resumed_equals_uninterrupted(kills, uninterrupted, tmp_path):
    out = tmp_path / "run"
    first = run(out, crash=kills[0])
    assert first.returncode == -9, first.stderr  # SIGKILL
    for crash in kills[1:]:
        again = run(out, crash=crash, resume_auto=True)
        assert again.returncode == -9, again.stderr
    final = run(out, resume_auto=True)
    assert final.returncode == 0, final.stderr
    assert_same_run(out, uninterrupted)


def test_sigterm_saves_says_how_to_resume_and_resumes(uninterrupted, tmp_path):
    out = tmp_path / "run"
    stopped = run(out, crash="micro_batch:3:TERM")  # SLURM's SIGTERM, in the middle of an accumulation
    assert stopped.returncode == 143, stopped.stderr
    assert "stopped by SIGTERM" in stopped.stderr and "--resume auto" in stopped.stderr
    state = torch.load(out / "checkpoint_last.pth", weights_only=False)
    # batch 3 of epoch 0 is the first of its second accumulation: the state is at batch 2
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (0, 2)
    final = run(out, resume_auto=True)
    assert final.returncode == 0, final.stderr
    assert_same_run(out, uninterrupted)


def test_resume_into_the_same_folder_for_more_epochs(uninterrupted, tmp_path):
    out = tmp_path / "run"
    assert run(out).returncode == 0
    best = torch.load(out / "checkpoint_best.pth", weights_only=False)["epoch"]
    more = run(out, resume_auto=True, epochs=5)
    assert more.returncode == 0, more.stderr
    log = lines(out / "log.txt")
    assert [e["epoch"] for e in log] == [0, 1, 2, 3, 4]
    assert log[:3] == lines(uninterrupted / "log.txt")
    accs = [e["val_acc"] for e in log]
    want_best = max(range(5), key=lambda e: (accs[e], -e))  # strictly better replaces; ties keep the earlier
    assert torch.load(out / "checkpoint_best.pth", weights_only=False)["epoch"] == want_best
    assert want_best >= best
    assert [m["step"] for m in lines(out / "metrics.jsonl")] == list(range(1, 11))


def test_a_finished_run_resumed_uses_one_epoch_numbering(uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    again = subprocess.run([sys.executable, "-m", "flipvqa", *train_args(out), "--resume", "auto"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    resumed = re.search(r"resumed from \S+ at epoch (\d+)", again.stderr)
    nothing = re.search(r"nothing to train: the run resumes at epoch (\d+) \(epochs 0 to (\d+) are done\)",
                        again.stderr)
    assert resumed and nothing, again.stderr
    assert resumed.group(1) == nothing.group(1) == "3" and nothing.group(2) == "2"


def test_a_folder_with_a_run_needs_resume_auto_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["-q", *train_args(out, epochs=1)]) == 0
    args = train_args(out, epochs=1) + ["--resume", str(case_dir("tvqa") / "checkpoint.pth")]  # weights: epoch 0
    assert main(["-q", *args]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert main(["-q", *args, "--overwrite"]) == 0
    assert [e["epoch"] for e in lines(out / "log.txt")] == [0]


def test_resume_from_an_earlier_best_keeps_the_folders_best(tmp_path):
    """--resume of a best checkpoint that is not the last epoch, into its own folder: the later
    epochs are redone once each, and checkpoint_best.pth is replaced only by a better epoch."""
    out = tmp_path / "run"
    assert main(["-q", *train_args(out, epochs=3)]) == 0
    earlier = lines(out / "log.txt")
    best_epoch = torch.load(out / "checkpoint_best.pth", weights_only=False)["epoch"]
    args = train_args(out, epochs=3) + ["--resume", str(tmp_path / "best.pth")]
    (tmp_path / "best.pth").write_bytes((out / "checkpoint_best.pth").read_bytes())
    assert main(["-q", *args]) == 0
    log = lines(out / "log.txt")
    assert [e["epoch"] for e in log] == list(range(3)) and log[:best_epoch + 1] == earlier[:best_epoch + 1]
    best = torch.load(out / "checkpoint_best.pth", weights_only=False)
    assert best["epoch"] >= best_epoch and log[best["epoch"]]["val_acc"] >= earlier[best_epoch]["val_acc"]


def nan_features(tmp_path):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(case_dir("tvqa") / "data", data)
    path = data / "tvqa" / "clipvitl14.pth"
    feats = torch.load(path)
    vid = json.loads((data / "tvqa" / "tvqa_train.jsonl").read_text().splitlines()[1])["vid_name"]
    feats[vid] = torch.full_like(feats[vid], float("nan"))  # one train question's video
    torch.save(feats, path)
    return data, vid


def test_a_nonfinite_loss_stops_with_one_line_and_keeps_the_last_good_state(tmp_path, capsys):
    data, vid = nan_features(tmp_path)
    args = train_args(tmp_path / "run")
    args[args.index("--data_path") + 1] = str(data)
    assert main(["-q", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flipvqa: error:")]
    assert len(err) == 1
    line = err[0]
    assert "epoch 0 step" in line and "vqa_loss" in line and "not finite" in line and "--skip_nonfinite" in line
    assert "bf16" in line and "features" in line
    state = torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_skip_nonfinite_counts_the_skipped_batches(tmp_path, capsys):
    data, vid = nan_features(tmp_path)
    args = train_args(tmp_path / "run", skip_nonfinite=10)
    args[args.index("--data_path") + 1] = str(data)
    assert main(["-q", *args]) == 0
    log = lines(tmp_path / "run" / "log.txt")
    assert all(e["train_skipped_batches"] >= 1 for e in log)
    skipped = sum(e["train_skipped_batches"] for e in log)
    steps = lines(tmp_path / "run" / "metrics.jsonl")
    assert all(all(v == v for v in m.values()) for m in steps)  # no NaN reached a step
    assert len(steps) <= 3 * 2 and skipped <= 10
    state = torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    args = train_args(tmp_path / "run2", skip_nonfinite=1)
    args[args.index("--data_path") + 1] = str(data)
    assert main(["-q", *args]) == 2  # a second one is beyond the budget
    assert "not finite" in capsys.readouterr().err


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["-q", *train_args(out), "--tensorboard"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/vqa_loss", "train/lr", "train/grad_norm", "val/acc"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 7))
    accs = [e.value for e in events.Scalars("val/acc")]
    assert accs == pytest.approx([e["val_acc"] for e in lines(out / "log.txt")])


def test_torchrun_killed_and_resumed_equals_uninterrupted(tmp_path):
    """Two gloo processes: only rank 0 writes, both resume from the same checkpoint_last.pth."""
    def launch(out, crash=None, auto=False):
        env = {k: v for k, v in os.environ.items() if k != "FLIPVQA_CRASH_AT"}
        if crash:
            env["FLIPVQA_CRASH_AT"] = crash
        argv = [sys.executable, "-m", "torch.distributed.run", *TORCHRUN_PORT(), "--nproc_per_node", "2", "-m", "flipvqa", "-q",
                *train_args(out, epochs=2), *(["--resume", "auto"] if auto else [])]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)

    ref = launch(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert launch(tmp_path / "run", crash="micro_batch:3").returncode != 0  # epoch 1, mid-accumulation
    state = torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=False)
    assert state["progress"]["world_size"] == 2 and state["progress"]["epoch"] == 1
    done = launch(tmp_path / "run", auto=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert lines(tmp_path / "run" / "log.txt") == lines(tmp_path / "ref" / "log.txt")
    ours, theirs = weights(tmp_path / "run" / "checkpoint_last.pth"), weights(tmp_path / "ref" / "checkpoint_last.pth")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [m["step"] for m in lines(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
