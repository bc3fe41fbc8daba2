"""``flipvqa bench`` on the tiny real backbone (2 layers, dim 16) and synthetic questions."""

import argparse
import json

import pytest
import torch

from flipvqa import bench
from flipvqa.demo.synthetic import random_records
from flipvqa.cli import main

from conftest import REF

FLAGS = ["--llama_model_path", str(REF / "llama"), "--model", "tiny", "--vaq", "--qav", "--device", "cpu",
         "--steps", "2", "--warmup", "1", "--synthetic", "16", "--batch_size", "4", "--max_seq_len", "128"]
RATES = ("train_samples_per_s", "eval_questions_per_s", "tokens_per_s", "model_tflops_per_s",
         "matmul_peak_gflops", "fraction_of_matmul_peak")


def run_bench(capsys, *extra: str) -> dict:
    assert main(["bench", *FLAGS, *extra]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "bench prints exactly one line on stdout"
    return json.loads(lines[0])


@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
def test_bench_prints_one_json_line_with_positive_figures(capsys, naive):
    result = run_bench(capsys, *(["--naive"] if naive else []))
    for key in RATES:
        assert result[key] > 0, key
    for key in ("peak_memory_mb", "train_peak_memory_mb", "eval_peak_memory_mb"):
        assert result[key] >= 0, key
    assert "RSS" in result["memory_note"]
    cfg = result["config"]
    assert cfg["mode"] == ("naive" if naive else "fast")
    assert (cfg["dim"], cfg["n_layers"], cfg["n_heads"]) == (16, 2, 2)
    assert (cfg["batch_size"], cfg["max_seq_len"], cfg["device"]) == (4, 128, "cpu")
    assert cfg["objectives"] == ["vqa", "vaq", "qav"] and cfg["data"] == "synthetic 16"
    assert cfg["torch"] and cfg["threads"] >= 1


def test_generate_prints_the_three_rates(capsys):
    """bench --generate: tokens/s cached, recomputed and with transformers, in one line."""
    result = run_bench(capsys, "--generate", "--max_new_tokens", "4", "--steps", "1", "--warmup", "0")
    for key in ("cached_tokens_per_s", "naive_tokens_per_s", "transformers_tokens_per_s"):
        assert result[key] > 0, key
    assert result["speedup_vs_naive"] == pytest.approx(result["cached_tokens_per_s"] / result["naive_tokens_per_s"])
    assert result["config"]["mode"] == "generate" and result["config"]["max_new_tokens"] == 4


def test_hf_copy_of_the_backbone_gives_its_logits():
    """The transformers model bench --generate compares with is the same backbone."""
    from flipvqa.bench.generate import _hf_model
    from flipvqa.checkpoints import random_backbone, wrap_backbone
    from flipvqa.config import resolve
    from flipvqa.model.llama import SHAPES

    backbone = random_backbone(SHAPES["bench-128"], 300, torch.device("cpu"), torch.float32, 0)
    model = wrap_backbone(backbone, resolve(argparse.Namespace(adapter_layer=2)), torch.device("cpu"))
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(_hf_model(model, torch.device("cpu"), torch.float32)(ids).logits.float(),
                                   backbone(ids), atol=1e-4, rtol=1e-4)


def test_compare_children_get_the_same_flags():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    ns = parser.parse_args([*FLAGS, "--compare", "--lr", "0.5"])
    again = parser.parse_args(bench.child_argv(ns)[1:])
    assert not again.compare and not again.naive
    for key, value in vars(ns).items():
        if key != "compare":
            assert getattr(again, key) == value, key


def test_synthetic_records_are_nextqa_like_and_seeded():
    a, b = random_records(8, seed=3), random_records(8, seed=3)
    assert [r.question for r in a] == [r.question for r in b]
    assert all((ra.frames == rb.frames).all() for ra, rb in zip(a, b))
    for r in a:
        assert 8 <= len(r.question.split()) <= 12 and r.question.endswith("?")
        assert len(r.options) == 5 and all(2 <= len(o.split()) <= 5 for o in r.options)
        assert 10 <= r.frames.shape[0] <= 20 and r.frames.shape[1] == 768
    assert random_records(8, seed=4)[0].question != a[0].question


def test_flop_count_matches_a_hand_count():
    """train_flops on a 2-layer, dim-8 backbone and one VQA sequence of 5 tokens (targets from 3)."""
    import torch

    from flipvqa.bench.flops import count_tokens, train_flops
    from flipvqa.model.flipped import FlipConfig, FlippedVQA
    from flipvqa.model.inputs import Batch, TaskBatch
    from flipvqa.model.llama import ModelArgs, Transformer

    backbone = Transformer(ModelArgs(dim=8, n_layers=2, n_heads=2, vocab_size=16, hidden_dim=16))
    model = FlippedVQA(backbone, FlipConfig(adapter_len=1, adapter_layer=2, max_feats=2))
    vqa = TaskBatch(ids=torch.zeros(1, 7, dtype=torch.long), label_start=torch.tensor([3]),
                    length=torch.tensor([5]), video_start=torch.tensor([1]))  # 2 pads after the 5 tokens
    batch = Batch(video=torch.zeros(1, 2, 768), tasks={"vqa": vqa}, answer=torch.tensor([0]),
                  qtype=torch.tensor([-1]))
    assert count_tokens(batch, ("vqa",)) == (5, 15, 2)  # tokens, causal context 5*6/2, targets 5-3
    matmul_weights = 2 * (4 * 8 * 8 + 3 * 8 * 16)  # per layer: wq wk wv wo, w1 w2 w3
    forward = 2 * matmul_weights * 5 + 2 * 2 * 2 * 8 * 15 + 2 * 8 * 16 * 2
    assert train_flops(model, batch, ("vqa",)) == 2 * forward == 28544


def test_repeat_takes_each_rate_at_its_best_round(monkeypatch):
    """--compare --repeat 2: rates are the best of each mode's rounds, and both rounds are listed."""
    runs = iter([{"train_samples_per_s": 2.0, "eval_questions_per_s": 10.0, "tokens_per_s": 1.0,
                  "model_tflops_per_s": 0.1, "peak_memory_mb": 5.0},   # fast, round 1
                 {"train_samples_per_s": 1.0, "eval_questions_per_s": 1.0, "tokens_per_s": 1.0,
                  "model_tflops_per_s": 0.1, "peak_memory_mb": 10.0},  # naive, round 1
                 {"train_samples_per_s": 3.0, "eval_questions_per_s": 8.0, "tokens_per_s": 1.0,
                  "model_tflops_per_s": 0.2, "peak_memory_mb": 6.0},   # fast, round 2
                 {"train_samples_per_s": 1.5, "eval_questions_per_s": 0.5, "tokens_per_s": 1.0,
                  "model_tflops_per_s": 0.1, "peak_memory_mb": 10.0}])  # naive, round 2
    monkeypatch.setattr(bench, "_child", lambda argv, mode: next(runs))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    result = bench.compare(parser.parse_args([*FLAGS, "--compare", "--repeat", "2"]))
    assert result["fast"]["train_samples_per_s"] == 3.0 and result["fast"]["eval_questions_per_s"] == 10.0
    assert result["train_speedup"] == 2.0 and result["eval_speedup"] == 10.0
    assert result["memory_ratio"] == 0.5  # the first round's memory
    assert [r["fast"]["train_samples_per_s"] for r in result["rounds"]] == [2.0, 3.0]
