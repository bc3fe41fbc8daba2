"""``--quantize int8|nf4``: the frozen block linears stored quantized (torchao), everything else
as without it; predictions agree with float32, gradients reach the trainable parts, and
checkpoints are the same files with or without quantization."""

import argparse
import json
import sys

import pytest
import torch

pytest.importorskip("torchao")

from flipvqa import bench, quantize  # noqa: E402
from flipvqa.cli import main  # noqa: E402
from flipvqa.config import resolve  # noqa: E402
from flipvqa.data.dataset import collate  # noqa: E402
from flipvqa.errors import FlipVQAError  # noqa: E402

from conftest import REF, case_dir, case_flags, expected_val  # noqa: E402

TOKENIZER = str(REF / "llama" / "tokenizer.model")


def bench_case(mode, questions=64):
    """The benchmark's model (bench-512, random weights, seed 0) and its synthetic questions."""
    args = resolve(argparse.Namespace(model="bench-512", tokenizer_path=TOKENIZER, device="cpu", max_seq_len=128,
                                      quantize=mode, seed=0, vaq=True, qav=True))
    model, tokenizer, _ = bench.bench_model(args, torch.device("cpu"))
    train_set, eval_set, _ = bench.bench_datasets(args, tokenizer, questions)
    return model, train_set, eval_set


def option_scores(model, dataset, questions=64):
    return bench.option_scores(model, dataset, questions, 8, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def fp32_case():
    model, train_set, eval_set = bench_case(None)
    return model, train_set, option_scores(model, eval_set)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_evaluation_agrees_with_float32_on_the_bench_case(fp32_case, mode):
    fp32_model, _, want = fp32_case
    model, _, eval_set = bench_case(mode)
    got = option_scores(model, eval_set)
    agree = (got.argmin(1) == want.argmin(1)).float().mean().item()
    assert agree >= 0.95
    assert (got - want).abs().max().item() < 0.15
    assert not torch.equal(got, want)  # the weights really are quantized
    # Only the block linears are quantized, and they shrink: int8 by about 4x, nf4 by about 7x.
    layer = model.backbone.layers[0]
    assert all(isinstance(layer.get_submodule(n), quantize.FrozenQuantizedLinear) for n in quantize.LINEARS)
    fp32_layer = quantize.weight_bytes(fp32_model.backbone.layers[0])
    assert quantize.weight_bytes(layer) < fp32_layer / {"int8": 3.5, "nf4": 6.0}[mode]
    assert model.backbone.tok_embeddings.weight.dtype == torch.float32
    assert model.trainable_state_dict().keys() == fp32_model.trainable_state_dict().keys()


def test_gradients_reach_the_trainable_parts_through_quantized_layers(fp32_case):
    fp32_model, train_set, _ = fp32_case
    model, _, _ = bench_case("int8")
    batch = collate([train_set[i] for i in range(4)])

    def grads(m):
        m.train()
        m.zero_grad(set_to_none=True)
        vqa, vaq, qav = m(batch)
        (vqa + vaq + qav).backward()
        return {name: p.grad.clone() for name, p in m.trainable_parameters()}

    want, got = grads(fp32_model), grads(model)
    assert want.keys() == got.keys()
    assert all(not p.requires_grad for p in model.backbone.parameters())
    moving = [name for name in want if want[name].norm() > 0]  # the adapters wait for their zero gates
    assert "visual_proj.weight" in moving and len(moving) >= len(want) // 2
    for name in want:
        assert (got[name] - want[name]).norm().item() <= 0.05 * want[name].norm().item(), name


def test_checkpoint_trained_quantized_loads_without_quantize(tmp_path):
    """One epoch of tvqa's case with --quantize int8; the checkpoint holds the trainable weights
    only and scores without --quantize (full-precision backbone) about as with it."""
    train = case_flags("tvqa", output_dir=tmp_path / "run", epochs=1, warmup_epochs=1, batch_size=2, blr=20.0)
    assert main(["-q", "train", *train, "--quantize", "int8"]) == 0
    ckpt = tmp_path / "run" / "checkpoint_last.pth"
    stored = torch.load(ckpt, weights_only=False)["model"]
    assert stored and all(not k.startswith("backbone.") for k in stored)
    scores = {}
    for mode in (None, "int8"):
        out = tmp_path / f"eval-{mode}"
        extra = ["--quantize", mode] if mode else []
        assert main(["-q", "eval", *case_flags("tvqa", resume=ckpt, output_dir=out, batch_size=2), *extra]) == 0
        scores[mode] = [json.loads(line)["scores"] for line in open(out / "predictions_val.jsonl")]
    assert len(scores[None]) == len(scores["int8"]) == 6
    diff = torch.tensor(scores[None]) - torch.tensor(scores["int8"])
    assert 0 < diff.abs().max().item() < 0.15


def test_reference_scores_hold_under_int8(tmp_path):
    flags = case_flags("nextqa", resume=case_dir("nextqa") / "checkpoint.pth", output_dir=tmp_path, batch_size=4)
    assert main(["-q", "eval", *flags, "--quantize", "int8"]) == 0
    want = {i: scores for i, (scores, _) in expected_val("nextqa").items()}
    got = [json.loads(line) for line in open(tmp_path / "predictions_val.jsonl")]
    assert len(got) == len(want)
    for row in got:
        assert row["scores"] == pytest.approx(want[row["index"]], abs=0.05)


def test_nf4_refuses_layers_that_do_not_fit_its_blocks():
    model, _, _ = bench_case(None, questions=8)
    tiny = torch.nn.Linear(32, 32, bias=False).weight.detach()
    with pytest.raises(FlipVQAError, match=r"layers.0.attention.wq has \(32, 32\) weights"):
        quantize._quantizer("nf4")(tiny, "layers.0.attention.wq")
    del model


def test_missing_torchao_is_one_line_naming_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    with pytest.raises(FlipVQAError, match=r"pip install 'flipvqa\[quant\]'"):
        quantize._quantizer("int8")


@pytest.mark.parametrize("flags,message", [
    (["--quantize", "int4"], "--quantize int4: choose one of int8, nf4"),
    (["--quantize", "int8", "--fsdp"], "--quantize and --fsdp cannot be combined"),
])
def test_bad_quantize_options_are_one_line(capsys, flags, message):
    argv = ["eval", *case_flags("nextqa", resume=case_dir("nextqa") / "checkpoint.pth"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"flipvqa: error: {message}")
