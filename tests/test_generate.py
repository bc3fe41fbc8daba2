"""Generation (flipvqa.model.generate): the cached engine gives, token by token, what recomputing
the whole sequence at every step gives, on the five reference backbones and checkpoints in
float32; batches of prompts of different lengths give what each prompt gives alone; sampling is
reproducible from its seed."""

import pytest
import torch

from flipvqa import data
from flipvqa.data.dataset import VQADataset, collate
from flipvqa.model.generate import Sampling, generate

from conftest import CASES, case_dir
from test_model import reference_model


def open_val(name, llama_tokenizer, max_seq_len=None):
    """The case's val questions asked without their choices (so each has a generation prompt)."""
    model, case = reference_model(name)
    records = data.load_split(case_dir(name) / case["data_path"], name, "val", case["sub"])
    for rec in records:
        rec.answers, rec.options, rec.answer = [rec.options[rec.answer]], [], None
    ds = VQADataset(records, llama_tokenizer, None, case["max_feats"], max_seq_len or case["max_seq_len"],
                    case["sub"], train=False, tasks=("vqa",))
    return model, ds


def prompts_of(ds, indices):
    part = collate([ds[i] for i in indices]).part("prompt")
    return part.video, part.tasks["prompt"]


@pytest.mark.parametrize("name", CASES)
def test_cached_generation_equals_recomputing_every_step(name, llama_tokenizer):
    model, ds = open_val(name, llama_tokenizer)
    video, prompts = prompts_of(ds, range(len(ds)))
    assert len(set(prompts.length.tolist())) > 1  # prompts of different lengths share the batch
    sampling = Sampling(max_new_tokens=10, stop_ids=(llama_tokenizer.eos_id,))
    cached = generate(model, video, prompts, sampling)
    recomputed = generate(model, video, prompts, sampling, cache=False)
    assert cached.tokens == recomputed.tokens
    assert all(len(t) == 10 for t in cached.tokens) or any(cached.stopped)
    for p, q in zip(cached.probs, recomputed.probs):
        assert p == pytest.approx(q, abs=1e-4)
    model.naive = True  # the reference's hand-written attention: the same tokens
    assert generate(model, video, prompts, sampling).tokens == cached.tokens


@pytest.mark.parametrize("name", ["nextqa", "tvqa"])
def test_batched_generation_equals_one_at_a_time(name, llama_tokenizer):
    model, ds = open_val(name, llama_tokenizer)
    sampling = Sampling(max_new_tokens=8, stop_ids=(llama_tokenizer.eos_id,))
    batched = generate(model, *prompts_of(ds, range(len(ds))), sampling)
    for i in range(len(ds)):
        alone = generate(model, *prompts_of(ds, [i]), sampling)
        assert alone.tokens[0] == batched.tokens[i]
        assert alone.probs[0] == pytest.approx(batched.probs[i], abs=1e-5)


def test_each_row_stops_at_its_own_stop_token(llama_tokenizer):
    """A row stops after a stop token (not part of its answer); the others go on."""
    model, ds = open_val("nextqa", llama_tokenizer)
    video, prompts = prompts_of(ds, range(len(ds)))
    free = generate(model, video, prompts, Sampling(max_new_tokens=6, stop_ids=()))
    stop = free.tokens[0][2]  # make row 0's third token a stop token
    out = generate(model, video, prompts, Sampling(max_new_tokens=6, stop_ids=(stop,)))
    assert out.tokens[0] == free.tokens[0][:2] and out.stopped[0]
    for row, tokens in enumerate(free.tokens):
        if stop not in tokens:  # rows without it run to max_new_tokens, unchanged
            assert out.tokens[row] == tokens and not out.stopped[row]


def test_greedy_is_the_first_arg_max_and_sampling_follows_its_seed(llama_tokenizer):
    from flipvqa.model.generate import _pick

    tied = torch.tensor([[0.0, 2.0, 2.0, 1.0]])
    assert _pick(tied, Sampling(), None).tolist() == [1]
    model, ds = open_val("star", llama_tokenizer)
    video, prompts = prompts_of(ds, range(len(ds)))
    hot = Sampling(max_new_tokens=6, temperature=1.5, top_p=0.9, seed=3)
    first, again = generate(model, video, prompts, hot), generate(model, video, prompts, hot)
    assert first.tokens == again.tokens
    other = generate(model, video, prompts, Sampling(max_new_tokens=6, temperature=1.5, top_p=0.9, seed=4))
    greedy = generate(model, video, prompts, Sampling(max_new_tokens=6))
    assert other.tokens != first.tokens or greedy.tokens != first.tokens
    # a tiny top_p keeps only the most likely token: sampling is then greedy
    narrow = generate(model, video, prompts, Sampling(max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=5))
    assert narrow.tokens == greedy.tokens


def test_generation_prompt_is_the_vqa_sequence_before_its_first_target(llama_tokenizer):
    """The prompt is what the open-ended VQA training sequence holds before its first target
    (for answers whose tokens do not merge with 'is')."""
    from flipvqa.prompts import build, generation_prompt, open_prompt_text

    text = open_prompt_text("Why did the boy run?")
    prompt = generation_prompt(llama_tokenizer, text, 4, 200, False)
    for answer in ("to catch a bus", "5", "3 times", "Question", "Video"):
        seq = build(llama_tokenizer, "vqa", text, answer, 4, 200, False)
        assert seq.ids[:seq.label_start] == prompt.ids
        assert llama_tokenizer.decode(seq.ids[seq.label_start:-1]).strip() == answer
        assert seq.ids[-1] == llama_tokenizer.eos_id


def test_prompt_too_long_is_an_error_naming_max_seq_len(llama_tokenizer):
    from flipvqa.errors import FlipVQAError

    with pytest.raises(FlipVQAError, match="needs --max_seq_len"):
        open_val("nextqa", llama_tokenizer, max_seq_len=30)


@pytest.mark.parametrize("variant", ["gqa", "gqa-skip-unadapted", "int8"])
def test_cached_equals_recomputed_with_gqa_skipped_layers_and_int8(variant, llama_tokenizer):
    """Grouped-query attention (the adapter through the narrow wk/wv), the reference's skipping of
    unadapted layers, and an int8 backbone: still the tokens of recomputing every step."""
    import argparse

    from flipvqa.checkpoints import random_backbone, wrap_backbone
    from flipvqa.config import resolve
    from flipvqa.model.llama import ModelArgs

    shape = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2 if variant != "int8" else 4, multiple_of=32)
    backbone = random_backbone(shape, llama_tokenizer.n_words, torch.device("cpu"), torch.float32, 0)
    if variant == "int8":
        pytest.importorskip("torchao")
        from flipvqa.quantize import quantize_backbone

        quantize_backbone(backbone, "int8", torch.device("cpu"))
    skip = variant == "gqa-skip-unadapted"
    args = resolve(argparse.Namespace(adapter_layer=2, skip_unadapted_layers=skip or None, max_seq_len=128))
    model = wrap_backbone(backbone, args, torch.device("cpu")).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # gates away from their start, so that the adapter and the bias matter
        for _, p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    _, ds = open_val("nextqa", llama_tokenizer)
    video, prompts = prompts_of(ds, range(len(ds)))
    sampling = Sampling(max_new_tokens=8, stop_ids=(llama_tokenizer.eos_id,))
    assert generate(model, video, prompts, sampling).tokens == \
        generate(model, video, prompts, sampling, cache=False).tokens
