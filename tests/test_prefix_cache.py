"""The shared instruction prefix: run once per batch in training (gradients through it), cached
across batches in evaluation, rebuilt when the trainable weights change; same numbers as running
every sequence whole. The reference-case parity with the cache on and off is in test_model.py."""

import pytest
import torch

from flipvqa.data.dataset import collate

from conftest import CASES
from test_model import dataset, reference_model


def _train_batch(name, tokenizer, n=3):
    model, case = reference_model(name)
    train = dataset(name, case, "train", tokenizer)
    return model, collate([train[i] for i in range(min(n, len(train)))])


@pytest.mark.parametrize("name", CASES)
def test_every_task_shares_its_instruction_prefix(name, llama_tokenizer):
    """The path under test is taken: each task's rows share their first 15-22 tokens."""
    model, batch = _train_batch(name, llama_tokenizer)
    for task, tb in batch.tasks.items():
        needed = tb.video_start - 1 if task == "qav" else tb.label_start - 1
        shared = model._shared_length(tb, needed)
        assert 10 <= shared <= int(tb.video_start.min()), (task, shared)
        assert bool((tb.ids[:, :shared] == tb.ids[:1, :shared]).all())
    model.prefix_cache = False
    assert model._shared_length(batch.tasks["vqa"], batch.tasks["vqa"].label_start - 1) == 0


@pytest.mark.parametrize("name", ["nextqa", "tvqa"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_training_gradients_equal_with_and_without_sharing(name, checkpointing, llama_tokenizer):
    model, batch = _train_batch(name, llama_tokenizer)
    model.train()
    model.grad_checkpointing = checkpointing
    results = []
    for share in (True, False):
        model.prefix_cache = share
        model.zero_grad()
        losses = model(batch)
        sum(losses).backward()
        results.append((torch.stack(losses), [p.grad.clone() for _, p in model.trainable_parameters()]))
    (shared_losses, shared_grads), (plain_losses, plain_grads) = results
    torch.testing.assert_close(shared_losses, plain_losses, atol=1e-5, rtol=0)
    for (name_, _), a, b in zip(model.trainable_parameters(), shared_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name_)
    assert any(g.abs().sum() > 0 for g in shared_grads[:1])  # adapter_query: reached through the prefix


def test_eval_cache_is_built_once_and_rebuilt_when_weights_change(llama_tokenizer):
    model, case = reference_model("star")
    val = dataset("star", case, "val", llama_tokenizer)
    batches = [collate([val[i]]) for i in range(len(val))]
    calls = []
    run = model._run_prefix_kv
    model._run_prefix_kv = lambda ids: calls.append(ids.shape[1]) or run(ids)
    first = [model.score_options(b) for b in batches]
    assert calls == [18]  # one instruction prefix for every question
    with torch.no_grad():  # as an optimizer step does: in place
        model.adapter_query.weight.add_(0.3)
        model.layers[-1]["attention"].gate1.add_(0.5)
    moved = [model.score_options(b) for b in batches]
    assert calls == [18, 18]
    model.prefix_cache = False
    for a, b in zip(moved, (model.score_options(b) for b in batches)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # not the stale cache
    assert max((a - b).abs().max().item() for a, b in zip(first, moved)) > 1e-3


def test_cache_follows_loaded_weights(llama_tokenizer, tmp_path):
    """Loading a checkpoint into a model that has cached its prefix scores with the new weights."""
    from flipvqa.checkpoints import load_trainable

    model, case = reference_model("nextqa")
    val = dataset("nextqa", case, "val", llama_tokenizer)
    batch = collate([val[i] for i in range(len(val))])
    before = model.score_options(batch)
    saved = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    torch.save({"model": {k: v + 0.2 for k, v in saved.items()}}, tmp_path / "moved.pth")
    load_trainable(model, tmp_path / "moved.pth")
    after = model.score_options(batch)
    model.prefix_cache = False
    torch.testing.assert_close(after, model.score_options(batch), atol=1e-5, rtol=0)
    assert (after - before).abs().max().item() > 1e-3
