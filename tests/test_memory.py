"""The per-GPU memory estimate (flipvqa.bench.memory): hand counts, a measured cross-check on CPU
and the table in docs/backbones.md."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flipvqa.bench import memory
from flipvqa.bench.memory import (BF16, F32, GIB, block_params, estimate, saved_activations, trainable_params,
                                  weight_bytes)
from flipvqa.checkpoints import random_backbone, wrap_backbone
from flipvqa.model.flipped import FlipConfig, FlippedVQA
from flipvqa.model.inputs import Batch, TaskBatch
from flipvqa.model.llama import SHAPES, Transformer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "backbones.md"
BIG = ("llama-7b", "llama-13b", "llama-33b", "llama-70b", "qwen2.5-7b", "qwen3-8b", "qwen2.5-72b")


# ---------------------------------------------------------------------------- hand counts
def test_parameter_counts_are_the_published_ones_and_the_modules():
    assert memory.backbone_params(SHAPES["llama-7b"]) == 6_738_415_616
    assert memory.backbone_params(SHAPES["llama-70b"]) == 68_976_648_192
    assert memory.backbone_params(SHAPES["qwen2.5-7b"]) == 7_615_616_512  # the model cards' counts
    assert memory.backbone_params(SHAPES["qwen3-8b"]) == 8_190_735_360
    assert memory.backbone_params(SHAPES["qwen2.5-72b"]) == 72_706_203_648
    for name in BIG:  # the same count as the module itself (built on the meta device: no memory)
        with torch.device("meta"):
            backbone = Transformer(SHAPES[name])
        assert memory.backbone_params(SHAPES[name]) == sum(p.numel() for p in backbone.parameters()), name


def test_trainable_count_is_flipped_vqas():
    shape = SHAPES["llama-7b"]
    # adapter_query 10 x 32 rows, visual_proj 768 -> 4096, temporal_emb 10 rows, gate1 + gate2 32 heads x 32 layers
    assert trainable_params(shape) == 10 * 32 * 4096 + 768 * 4096 + 10 * 4096 + 2 * 32 * 32 == 4_499_456
    with torch.device("meta"):
        model = FlippedVQA(Transformer(shape), FlipConfig(adapter_layer=shape.n_layers))
    assert trainable_params(shape) == sum(p.numel() for _, p in model.trainable_parameters())
    train = estimate(shape, "ddp", 8, 128)
    assert train.trainable == 16 * 4_499_456  # float32 weight, gradient, AdamW's two moments
    assert estimate(shape, "ddp", 8, 128, training=False).trainable == 4 * 4_499_456


@pytest.mark.parametrize("name", BIG)
def test_weights_per_mode(name):
    shape = SHAPES[name]
    params = memory.backbone_params(shape)
    bf16 = weight_bytes(shape, "ddp")
    assert bf16 == 2 * params
    int8, nf4 = weight_bytes(shape, "int8"), weight_bytes(shape, "nf4")
    # embeddings, output and norms stay bf16 (7B: 4% of the parameters), so int8 saves a bit less than
    # half; Qwen's 152K-word embedding and output are 14% of Qwen2.5-7B
    saving = 1.85 if name.startswith("llama") else 1.65
    assert int8 < bf16 / saving and nf4 < int8 / (1.7 if name.startswith("llama") else 1.5)
    linears = memory.block_linears(shape)
    rest = params - shape.n_layers * sum(o * i for o, i in linears)
    largest = max(o * i for o, i in linears)  # dequantized to bf16 while its matmul runs
    int8_linears = sum(o * i + 5 * o for o, i in linears)  # int8 data, float32 scale + int8 zero point per row
    assert int8 == shape.n_layers * int8_linears + BF16 * rest + BF16 * largest
    # FSDP on 8: an eighth of everything (the final norm, 2*dim bytes, stays whole) plus two whole blocks
    fsdp = weight_bytes(shape, "fsdp", 8)
    expected = bf16 / 8 + 2 * BF16 * block_params(shape)
    assert abs(fsdp - expected) < 2 * BF16 * shape.dim
    assert weight_bytes(shape, "fsdp", 1) == bf16 + 2 * BF16 * block_params(shape)


def test_quantized_bytes_per_parameter():
    assert memory.quantized_linear_bytes(4096, 4096, "int8") == 4096 * 4096 + 4096 * 5
    nf4 = memory.quantized_linear_bytes(4096, 4096, "nf4")
    assert nf4 / 4096 ** 2 == pytest.approx(0.5 + 1 / 64 + 2 / (64 * 256), abs=1e-5)  # double-quantized scales


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_bytes_match_what_flipvqa_quantize_stores(mode):
    """The count is what a bf16 weight takes once flipvqa.quantize (torchao) has quantized it."""
    pytest.importorskip("torchao")
    from flipvqa import quantize

    layer = quantize._quantizer(mode)(torch.randn(512, 2048, dtype=torch.bfloat16), "w")
    assert quantize.weight_bytes(layer) == memory.quantized_linear_bytes(512, 2048, mode)


def test_activations_scale_with_batch_and_length():
    shape = SHAPES["llama-7b"]
    assert saved_activations(shape, 8, 128) == 2 * saved_activations(shape, 4, 128)  # linear in the batch
    # checkpointing: the block inputs grow with the batch
    four_more_rows = 32 * 3 * 4 * 128 * 4096 * BF16
    assert saved_activations(shape, 8, 128, True) - saved_activations(shape, 4, 128, True) == four_more_rows
    # in the length: linear terms plus the L^2 ones; doubling L leaves exactly their growth
    a, b = saved_activations(shape, 8, 128), saved_activations(shape, 8, 256)
    probs = 2 * shape.n_layers * 8 * shape.n_heads * F32  # VQA and VAQ: float32 probabilities, per L^2
    assert b - 2 * a == probs * (256 ** 2 - 2 * 128 ** 2)
    # checkpointing keeps the block inputs only (the masks are made inside the checkpoints): linear in L
    assert saved_activations(shape, 8, 256, True) == 2 * saved_activations(shape, 8, 128, True)


def test_grad_checkpointing_keeps_the_block_inputs_only():
    shape = SHAPES["llama-7b"]
    kept = saved_activations(shape, 8, 128, grad_checkpointing=True)
    assert kept == 32 * 3 * 8 * 128 * 4096 * BF16
    assert kept < saved_activations(shape, 8, 128) / 10
    plain = estimate(shape, "ddp", 8, 128).activations
    assert estimate(shape, "ddp", 8, 128, grad_checkpointing=True).activations < plain / 5


def test_estimate_rejects_unknown_modes_and_sizes():
    with pytest.raises(ValueError, match="mode"):
        estimate(SHAPES["llama-7b"], "fp8", 8, 128)
    with pytest.raises(ValueError):
        estimate(SHAPES["llama-7b"], "ddp", 0, 128)


def test_fits_leaves_a_margin():
    assert memory.smallest_card(int(0.9 * 24 * GIB)) == "24 GB"
    assert memory.smallest_card(int(0.9 * 24 * GIB) + 1) == "40 GB"
    assert memory.smallest_card(80 * GIB) == "> 80 GB"


# ---------------------------------------------------------------------------- measured on CPU
# bench-512 with 4 layers, random weights in bf16 with bf16 autocast: the dtypes of a GPU run (on
# CPU in float32 every activation would take 4 bytes). The sequences are whole (no padding, no shared
# prefix), as the estimate assumes. The count is high by about 1/(2 * n_layers): the last layer computes
# outputs only where a target reads them. Agreement is required within AGREEMENT.
SHAPE = dataclasses.replace(SHAPES["bench-512"], n_layers=4, vocab_size=256)
BATCH, LENGTH, AGREEMENT = 2, 64, (0.75, 1.33)


def small_model(grad_checkpointing: bool) -> FlippedVQA:
    backbone = random_backbone(SHAPE, SHAPE.vocab_size, torch.device("cpu"), torch.bfloat16, seed=0)
    args = argparse.Namespace(adapter_len=10, adapter_layer=None, max_feats=10, bias=3.0, tau=100.0, vaq=True,
                              qav=True, skip_unadapted_layers=False, grad_checkpointing=grad_checkpointing,
                              compile=False)
    return wrap_backbone(backbone, args, torch.device("cpu")).train()


def whole_sequences(frames: int = 10) -> Batch:
    """Every task's sequences LENGTH tokens long; video right after a 5-token head (VQA, VAQ) or at
    the end (QAV), as the prompts place it."""
    g = torch.Generator().manual_seed(0)

    def task(video_start: int, label_start: int) -> TaskBatch:
        return TaskBatch(torch.randint(1, SHAPE.vocab_size, (BATCH, LENGTH), generator=g),
                         torch.full((BATCH,), label_start), torch.full((BATCH,), LENGTH), torch.full((BATCH,), video_start))

    return Batch(torch.randn(BATCH, frames, 768, generator=g),
                 {"vqa": task(5, LENGTH - 4), "vaq": task(5, LENGTH - 20), "qav": task(LENGTH - frames - 1, 0)},
                 torch.zeros(BATCH, dtype=torch.long), torch.full((BATCH,), -1))


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def autograd_saved_bytes(model: FlippedVQA, batch: Batch) -> int:
    """Bytes of the distinct storages autograd saves during a forward, the weights left out."""
    weights = {_storage_key(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if _storage_key(t) not in weights:
            saved[_storage_key(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    assert all(loss.requires_grad for loss in losses)
    return sum(saved.values())


class LiveStorages(TorchDispatchMode):
    """Every storage an operator returns; :meth:`alive` sums those still referenced. Checkpointing
    keeps the arguments of each block in a closure, which saved-tensor hooks do not see."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                known = self.storages.get(s.data_ptr())
                if known is None or known[0]() is None:  # a freed storage's address comes back
                    self.storages[s.data_ptr()] = (weakref.ref(s), s.nbytes())
        return out

    def alive(self, leave_out: set[int]) -> int:
        gc.collect()
        return sum(n for key, (ref, n) in self.storages.items() if ref() is not None and key not in leave_out)


def test_estimate_agrees_with_what_autograd_saves():
    measured = autograd_saved_bytes(small_model(False), whole_sequences())
    counted = saved_activations(SHAPE, BATCH, LENGTH)
    assert AGREEMENT[0] <= measured / counted <= AGREEMENT[1], (measured, counted)


def test_checkpointed_estimate_agrees_with_what_stays_alive():
    model, batch = small_model(True), whole_sequences()
    live = LiveStorages()
    with torch.autocast("cpu", dtype=torch.bfloat16), live:
        losses = model(batch)
    measured = live.alive({_storage_key(p) for p in model.parameters()})  # views of the weights are not new
    counted = saved_activations(SHAPE, BATCH, LENGTH, grad_checkpointing=True)
    assert AGREEMENT[0] <= measured / counted <= AGREEMENT[1], (measured, counted)
    assert measured < autograd_saved_bytes(small_model(False), batch) / 4
    del losses


# ---------------------------------------------------------------------------- the table
def test_docs_hold_the_generated_table():
    assert memory.memory_table() in DOCS.read_text(), "regenerate with: python -m flipvqa.bench.memory"


def test_main_prints_the_table(capsys):
    memory.main()
    out = capsys.readouterr().out
    assert out == memory.memory_table()
    assert out.count("| 70B") == 5 and "nf4, 1 GPU" in out and "FSDP, 8 GPUs" in out
