"""``--fsdp`` under torchrun (gloo, 2-3 CPU processes): the frozen backbone is sharded, the
numbers are those of one process; every question is scored once, also when the ranks have
different numbers of batches; an FSDP checkpoint evaluates without FSDP to the same scores."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import case_dir, case_flags, expected_val, TORCHRUN_PORT

# tvqa's case: 4 training questions; one epoch, 2 optimizer steps of a global batch of 2.
TRAIN = {"epochs": 1, "warmup_epochs": 1, "blr": 20.0, "weight_decay": 0.14, "batch_size": 1, "save_every": 1}


def flipvqa(*argv, nproc=1, timeout=300):
    launcher = ["-m", "torch.distributed.run", *TORCHRUN_PORT(), "--nproc_per_node", str(nproc)] if nproc > 1 else []
    env = {k: v for k, v in os.environ.items() if k != "FLIPVQA_CRASH_AT"}
    run = subprocess.run([sys.executable, *launcher, "-m", "flipvqa", "-q", *argv], capture_output=True,
                         text=True, timeout=timeout, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def rows(path):
    return [json.loads(line) for line in open(path)]


def weights(path):
    return torch.load(path, weights_only=False)["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (accumulating 2 batches) and two FSDP processes (one batch each): the same
    global batch of 2 and the same learning rate."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("fsdp")
    flipvqa("train", *case_flags("tvqa", output_dir=one, accum_iter=2, **TRAIN))
    run = flipvqa("train", *case_flags("tvqa", output_dir=two, accum_iter=1, **TRAIN), "--fsdp", nproc=2)
    return one, two, run


def test_fsdp_training_equals_one_process(runs):
    one, two, run = runs
    ref, ours = rows(one / "log.txt"), rows(two / "log.txt")
    assert len(ref) == len(ours) == 1 and ref[0].keys() == ours[0].keys()
    for key, value in ref[0].items():
        assert ours[0][key] == pytest.approx(value, abs=1e-4), key
    a, b = weights(one / "checkpoint_last.pth"), weights(two / "checkpoint_last.pth")
    assert a.keys() == b.keys()
    assert all(not k.startswith("backbone.") for k in b)  # trainable weights only, gathered whole
    for k in a:
        assert b[k].shape == a[k].shape
        torch.testing.assert_close(b[k], a[k], atol=1e-3, rtol=0, msg=k)


def test_fsdp_checkpoint_scores_the_same_with_and_without_fsdp(runs, tmp_path):
    _, two, _ = runs
    ckpt = two / "checkpoint_last.pth"
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    flipvqa("eval", *case_flags("tvqa", resume=ckpt, output_dir=plain, batch_size=2))
    flipvqa("eval", *case_flags("tvqa", resume=ckpt, output_dir=sharded, batch_size=1), "--fsdp", nproc=3)
    a, b = rows(plain / "predictions_val.jsonl"), rows(sharded / "predictions_val.jsonl")
    assert [r["index"] for r in b] == list(range(6))  # 2 questions per rank, each once
    for x, y in zip(a, b):
        assert y["scores"] == pytest.approx(x["scores"], abs=1e-5)
        assert y["prediction"] == x["prediction"]


@pytest.mark.parametrize("nproc,batch", [(2, 3), (3, 1)], ids=["2-ranks", "3-ranks-uneven"])
def test_fsdp_eval_matches_the_reference_and_scores_each_question_once(nproc, batch, tmp_path):
    """8 questions at batch 1 on 3 ranks: 3, 3 and 2 batches; the short rank keeps pace."""
    flags = case_flags("nextqa", resume=case_dir("nextqa") / "checkpoint.pth", output_dir=tmp_path,
                       batch_size=batch)
    run = flipvqa("eval", *flags, "--fsdp", nproc=nproc)
    got = rows(tmp_path / "predictions_val.jsonl")
    assert [r["index"] for r in got] == list(range(8))
    want = {i: scores for i, (scores, _) in expected_val("nextqa").items()}
    for r in got:
        assert r["scores"] == pytest.approx(want[r["index"]], abs=1e-4)
    assert "Traceback" not in run.stderr and "destroy_process_group" not in run.stderr


def test_fsdp_with_one_process_warns_and_runs(tmp_path):
    flags = case_flags("nextqa", resume=case_dir("nextqa") / "checkpoint.pth", output_dir=tmp_path)
    run = subprocess.run([sys.executable, "-m", "flipvqa", "eval", *flags, "--fsdp"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--fsdp without torchrun" in run.stderr


def test_fsdp_stages_the_backbone_on_the_cpu():
    """Under --fsdp the weights are put together on the CPU, in the dtype meant for the GPU, and
    fully_shard moves each block's shard: building for CUDA touches no GPU at all."""
    from flipvqa.checkpoints import build_backbone

    from conftest import REF

    backbone = build_backbone(REF / "llama" / "tiny", torch.device("cuda"), stage_on_cpu=True)
    tensors = [*backbone.parameters(), backbone.inv_freq]
    assert {t.device.type for t in tensors} == {"cpu"}
    file_dtype = torch.load(next((REF / "llama" / "tiny").glob("consolidated.*.pth")))["tok_embeddings.weight"].dtype
    assert backbone.tok_embeddings.weight.dtype == file_dtype


def test_fsdp_answers_in_words_as_one_process(tmp_path):
    """A mixed open-ended / multiple-choice split on 3 ranks at batch 1: a rank whose batch has only
    one kind runs a stand-in of the other, so every collective call is matched; each question is
    answered once, with what one process without --fsdp answers."""
    from test_open_ended import write_open_dataset

    name = write_open_dataset(tmp_path / "data", splits=("val",))
    flags = case_flags("nextqa", resume=case_dir("nextqa") / "checkpoint.pth", batch_size=1) + \
        ["--dataset", name, "--data_path", str(tmp_path / "data"), "--max_new_tokens", "6"]
    flipvqa("eval", *flags, "--output_dir", str(tmp_path / "one"))
    flipvqa("eval", *flags, "--fsdp", "--output_dir", str(tmp_path / "fsdp"), nproc=3)
    one, sharded = rows(tmp_path / "one" / "predictions_val.jsonl"), rows(tmp_path / "fsdp" / "predictions_val.jsonl")
    assert [r["index"] for r in sharded] == list(range(8))
    assert any("correct" in r for r in one) and any("scores" in r for r in one)
    for x, y in zip(one, sharded):
        assert y["prediction"] == x["prediction"]
        if "scores" in x:
            assert y["scores"] == pytest.approx(x["scores"], abs=1e-5)
