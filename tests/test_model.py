"""The three training losses of every batch and every per-option validation score of the
reference cases (to 1e-4), with the cases' random non-zero gates."""

import pytest
import torch

from flipvqa import data
from flipvqa.checkpoints import build_backbone
from flipvqa.data.dataset import VQADataset, collate
from flipvqa.model import scoring
from flipvqa.model.flipped import FlipConfig, FlippedVQA
from flipvqa.checkpoints import load_trainable

from conftest import CASES, case_dir, expected


def reference_model(name):
    case = expected(name)["case"]
    root = case_dir(name)
    backbone = build_backbone(root / case["llama_model_path"] / case["model"], torch.device("cpu"))
    cfg = FlipConfig(case["adapter_len"], case["adapter_layer"], case["max_feats"], case["bias"], case["tau"],
                     vaq=True, qav=True)
    model = FlippedVQA(backbone, cfg)
    load_trainable(model, root / "checkpoint.pth")
    return model.eval(), case


def dataset(name, case, split, tokenizer):
    records = data.load_split(case_dir(name) / case["data_path"], name, split, case["sub"])
    return VQADataset(records, tokenizer, data.n_options(name), case["max_feats"], case["max_seq_len"], case["sub"],
                      train=split == "train", tasks=("vqa", "vaq", "qav") if split == "train" else ("vqa",))


@pytest.mark.parametrize("mode", ["fast", "no-prefix-cache", "naive"])
@pytest.mark.parametrize("name", CASES)
def test_losses_and_scores_match_reference(name, mode, llama_tokenizer):
    model, case = reference_model(name)
    naive = mode == "naive"
    model.naive = naive  # the reference's computation (padding to max_seq_len, all logits, ...)
    model.prefix_cache = mode == "fast"  # the shared instruction prefix run once (or per sequence)
    pad_to = case["max_seq_len"] if naive else None
    exp = expected(name)
    train = dataset(name, case, "train", llama_tokenizer)
    for batch in exp["train"]["batches"]:
        with torch.no_grad():
            vqa, vaq, qav = model(collate([train[i] for i in batch["index"]], pad_to))
        assert vqa.item() == pytest.approx(batch["vqa_loss"], abs=1e-4)
        assert vaq.item() == pytest.approx(batch["vaq_loss"], abs=1e-4)
        assert qav.item() == pytest.approx(batch["qav_loss"], abs=1e-4)
    val = dataset(name, case, "val", llama_tokenizer)
    correct = 0
    for batch in exp["val"]["batches"]:
        scores = model.score_options(collate([val[i] for i in batch["index"]], pad_to))
        torch.testing.assert_close(scores, torch.tensor(batch["scores"]), atol=1e-4, rtol=0)
        assert scores.argmin(-1).tolist() == batch["prediction"]
        correct += sum(int(p == val[i].record.answer) for p, i in zip(batch["prediction"], batch["index"]))
    assert correct / len(val) == pytest.approx(exp["val"]["accuracy"])


def test_padding_does_not_change_scores(llama_tokenizer):
    model, case = reference_model("star")
    val = dataset("star", case, "val", llama_tokenizer)
    items = [val[i] for i in range(len(val))]
    dynamic = model.score_options(collate(items))
    padded = model.score_options(collate(items, pad_to=case["max_seq_len"]))
    torch.testing.assert_close(dynamic, padded, atol=1e-5, rtol=0)


def test_every_trainable_part_changes_the_scores(llama_tokenizer):
    """Perturbing any trainable tensor moves the scores (none is silently unused)."""
    model, case = reference_model("nextqa")
    val = dataset("nextqa", case, "val", llama_tokenizer)
    batch = collate([val[i] for i in range(2)])
    base = model.score_options(batch)
    for name, p in model.trainable_parameters():
        with torch.no_grad():
            saved = p.clone()
            p.add_(0.5)
            moved = (model.score_options(batch) - base).abs().max().item()
            p.copy_(saved)
        assert moved > 1e-6, name


def test_qav_backward_reaches_all_trainable_parts(llama_tokenizer):
    model, case = reference_model("vlep")
    train = dataset("vlep", case, "train", llama_tokenizer)
    model.train()
    vqa, vaq, qav = model(collate([train[i] for i in range(2)]))
    (vqa + vaq + qav).backward()
    for name, p in model.trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", CASES)
def test_prefix_shared_scoring_equals_full_sequences(name, llama_tokenizer):
    model, case = reference_model(name)
    val = dataset(name, case, "val", llama_tokenizer)
    batch = collate([val[i] for i in range(len(val))])
    tb = batch.tasks["vqa"]
    n_opt = tb.ids.shape[0] // len(val)
    assert scoring.shared_prefix(model, tb, len(val), n_opt) is not None  # the shared path is taken
    fast = model.score_options(batch)
    model.naive = True
    naive = model.score_options(collate([val[i] for i in range(len(val))], pad_to=case["max_seq_len"]))
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)


def test_prefix_shared_scoring_with_options_of_different_lengths(llama_tokenizer):
    """Options whose answer tokens differ in number still score as full sequences would."""
    from flipvqa.prompts import Sequence

    model, case = reference_model("nextqa")
    val = dataset("nextqa", case, "val", llama_tokenizer)
    items = [val[i] for i in range(3)]
    for item in items:  # lengthen option 1's answer by two tokens
        seqs = item.sequences["vqa"]
        s = seqs[1]
        seqs[1] = Sequence(s.ids[:-1] + [1576, 29889] + s.ids[-1:], s.label_start, s.video_start)
    fast = model.score_options(collate(items))
    model.naive = True
    torch.testing.assert_close(fast, model.score_options(collate(items)), atol=1e-5, rtol=0)


def test_training_losses_same_with_gradient_checkpointing(llama_tokenizer):
    model, case = reference_model("tvqa")
    train = dataset("tvqa", case, "train", llama_tokenizer)
    batch = collate([train[i] for i in range(2)])
    model.train()
    plain = model(batch)
    sum(plain).backward()
    grads = [p.grad.clone() for _, p in model.trainable_parameters()]
    model.zero_grad()
    model.grad_checkpointing = True
    ckpt = model(batch)
    sum(ckpt).backward()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)
    for g, (_, p) in zip(grads, model.trainable_parameters()):
        torch.testing.assert_close(g, p.grad)


def test_bf16_backbone_scores_close_to_float32(llama_tokenizer):
    """Frozen weights in bf16 with autocast (the GPU path, here on the CPU) stay near float32."""
    from flipvqa.devices import autocast

    case = expected("star")["case"]
    root = case_dir("star")
    backbone = build_backbone(root / case["llama_model_path"] / case["model"], torch.device("cpu"), torch.bfloat16)
    model = FlippedVQA(backbone, FlipConfig(case["adapter_len"], case["adapter_layer"], case["max_feats"],
                                            case["bias"], case["tau"], vaq=True, qav=True))
    load_trainable(model, root / "checkpoint.pth")
    assert model.backbone.tok_embeddings.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for _, p in model.trainable_parameters())
    val = dataset("star", case, "val", llama_tokenizer)
    with autocast(torch.device("cpu"), torch.bfloat16):
        scores = model.eval().score_options(collate([val[i] for i in range(len(val))]))
    want = torch.tensor([s for b in expected("star")["val"]["batches"] for s in b["scores"]])
    torch.testing.assert_close(scores.float(), want, atol=0.1, rtol=0)


def test_attention_keeps_its_probabilities_without_changing_a_number(llama_tokenizer):
    """What ``ask --explain`` draws is the layer's own softmax: causal, video-biased, rows sum to 1."""
    from flipvqa.ask import frame_attention

    model, case = reference_model("nextqa")
    val = dataset("nextqa", case, "val", llama_tokenizer)
    batch = collate([val[0]])
    one = batch.tasks["vqa"].rows(slice(0, 1))
    frames = model.video_inputs(batch.video)[1]
    plain = model.hidden(one, model.embed(one, frames), video_bias=True)
    attention = model.backbone.layers[-1].attention
    attention.keep_probs = True
    kept = model.hidden(one, model.embed(one, frames), video_bias=True)
    probs = attention.probs
    attention.keep_probs = False
    torch.testing.assert_close(plain, kept, atol=1e-5, rtol=0)
    seqlen = one.ids.shape[1]
    assert probs.shape == (1, model.backbone.args.n_heads, seqlen, seqlen)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)
    assert probs.triu(1).abs().max() == 0  # causal
    per_slot = frame_attention(model, batch, 0)
    assert len(per_slot) == case["max_feats"] and 0 < sum(per_slot) <= 1 + 1e-6
    assert attention.probs is None and not attention.keep_probs  # switched off again


def test_checkpoints_of_the_authors_code_skip_unadapted_layers():
    """Their args have no skip_unadapted_layers: they ran only the adapted layers."""
    import argparse

    from flipvqa.config import resolve, with_stored_options

    authors = {"model": "13B", "adapter_layer": 32}
    assert resolve(with_stored_options(argparse.Namespace(), authors)).skip_unadapted_layers is True
    ours = {**authors, "skip_unadapted_layers": False}
    assert resolve(with_stored_options(argparse.Namespace(), ours)).skip_unadapted_layers is False
    explicit = argparse.Namespace(skip_unadapted_layers=False, adapter_layer=40)
    args = resolve(with_stored_options(explicit, authors))
    assert args.skip_unadapted_layers is False and args.adapter_layer == 40 and args.model == "13B"
