"""Per-GPU memory of a training step or an evaluation batch, counted from the backbone's shape.

A rough but honest estimate, in bytes, of what one GPU holds at its peak::

    weights      frozen backbone: bf16 (2 bytes/param); --fsdp on N GPUs: 1/N of every block, of the
                 embedding and of the output layer (flipvqa.parallel's units; the final norm stays
                 whole) plus two whole blocks (the one computing and the next, prefetched);
                 a quantized backbone (--quantize int8|nf4, flipvqa.quantize):
                 the block linears (wq wk wv wo w1 w2 w3) as torchao stores them -- int8: 1 byte/param
                 plus a float32 scale and an int8 zero point per output row; nf4: 4 bits/param plus
                 one int8 scale per block of 64 and one bf16 factor per 256 scales (double
                 quantization) -- plus one block linear dequantized to bf16 (the one being used);
                 embeddings, norms and output stay bf16
    trainable    the Flipped-VQA parts (float32): 4 bytes/param; training adds the gradient and
                 AdamW's two moments (16 bytes/param); replicated on every GPU in every mode
    activations  training: what autograd keeps for backward, per block and per sequence set of
                 n = batch sequences of L tokens (one set per objective: VQA, VAQ, QAV)
                   2 n L d * 4          both RMSNorm inputs, upcast to float32
                   3 n L F * 2          the FFN's w1 output (silu input), silu output, w3 output
                   n L H hd * 2         the query again, for the adaption-prompt scores
                   n H L P * (4 + 2)    the prompt softmax (float32) and its bf16 copy
                 plus for VQA and VAQ, whose mask carries gate2's gradient (math kernel, which
                 computes in float32)
                   3 n L H hd * 4       scaled q, k, v (k, v repeated to H heads under GQA)
                   n H L^2 * 4          the attention probabilities
                 or for QAV (mask without gradient: the fused kernel)
                   n L (2 H + 2 KV) hd * 2 + n H L * 4   q, k, v, output, log-sum-exp
                 times the layers; --grad_checkpointing keeps instead, per layer, the block inputs
                 (n L d * 2 per set; each layer's mask is made inside its checkpoint, so it is not
                 kept), and recomputes one block at a time. Both add one block's set (the largest)
                 as the working set of the block being computed or differentiated.
                 evaluation: no autograd; the prefix's keys/values in every layer
                 (2 n_layers n L KV hd * 2) plus one layer's working set (its input and output,
                 a float32 norm input, q, the FFN's three outputs, the float32 mask and its bf16 copy)
    overhead     the CUDA context and library workspaces, CUDA_CONTEXT_BYTES

with d = dim, F = hidden_dim, H = heads, KV = key/value heads, hd = head_dim, P = adapter_len.

Every sequence is counted at the full --max_seq_len (dynamic padding and the shared instruction
prefix make real batches smaller: an upper bound). Not counted: allocator fragmentation and caching,
gradients in flight beyond one block, the vocabulary logits (only target positions, tens of MB),
the options' answer tokens in evaluation (a few per option), the video projection's inputs, and
NCCL buffers. On CUDA, PyTorch may pick the memory-efficient kernel for VQA/VAQ, which keeps no
L x L probabilities: the attention terms are then an over-estimate. Whether an estimate "fits" a
card leaves FIT_MARGIN of it free for what is not counted.

``python -m flipvqa.bench.memory`` prints :func:`memory_table`, the table of docs/backbones.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import PRESETS
from ..model.flipped import FlipConfig
from ..model.llama import SHAPES, ModelArgs
from ..quantize import NF4_BLOCK, NF4_SCALER_BLOCK

BF16, F32 = 2, 4
GIB = 2 ** 30
CUDA_CONTEXT_BYTES = GIB // 2  # CUDA context + cuBLAS/cuDNN workspaces: about 0.5 GB on a recent GPU
CARDS_GB = (24, 40, 80)  # nominal card sizes; taken as GiB (A100 40/80 GB hold 40/80 GiB, H100 79.6)
FIT_MARGIN = 0.10  # a card must keep this fraction free: fragmentation and what is not counted
MODES = ("ddp", "fsdp", "int8", "nf4")
FSDP_UNSHARDED_BLOCKS = 2  # the block being computed and the one prefetched
TASKS = ("vqa", "vaq", "qav")
ADAPTER_LEN = FlipConfig.adapter_len  # the presets keep the default (10 prompt rows per layer)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU (see the module docstring for what each part counts)."""

    weights: int
    trainable: int
    activations: int
    overhead: int = CUDA_CONTEXT_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.overhead


# ---------------------------------------------------------------------------- parameters
def block_linears(shape: ModelArgs) -> list[tuple[int, int]]:
    """(out, in) of a block's wq, wk, wv, wo, w1, w2, w3."""
    d, q, kv, f = shape.dim, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim, shape.hidden_dim
    return [(q, d), (kv, d), (kv, d), (d, q), (f, d), (d, f), (f, d)]


def block_params(shape: ModelArgs) -> int:
    """The linears, the two RMSNorm weights, and Qwen2's q/k/v biases or Qwen3's q/k norms."""
    return sum(o * i for o, i in block_linears(shape)) + 2 * shape.dim + block_extras(shape)


def block_extras(shape: ModelArgs) -> int:
    """Qwen2's q/k/v biases and Qwen3's q/k norm weights: small, never quantized."""
    biases = (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim if shape.qkv_bias else 0
    return biases + (2 * shape.head_dim if shape.qk_norm else 0)


def outer_params(shape: ModelArgs) -> int:
    """tok_embeddings, the final norm and output (one matrix when the embeddings are tied)."""
    matrices = 1 if shape.tie_embeddings else 2
    return matrices * shape.vocab_size * shape.dim + shape.dim


def backbone_params(shape: ModelArgs) -> int:
    return shape.n_layers * block_params(shape) + outer_params(shape)


def trainable_params(shape: ModelArgs) -> int:
    """adapter_query, visual_proj, temporal_emb and two gates per layer, at the defaults: all layers
    adapted (flipvqa's --adapter_layer), adapter_len and max_feats 10, 768-wide frame features."""
    cfg = FlipConfig()
    return ((cfg.adapter_len * shape.n_layers + cfg.feature_dim + cfg.max_feats) * shape.dim
            + 2 * shape.n_layers * shape.n_heads)


def quantized_linear_bytes(out_features: int, in_features: int, mode: str) -> int:
    """Bytes of one weight as torchao 0.18 stores it (Int8Tensor, NF4Tensor)."""
    n = out_features * in_features
    if mode == "int8":
        return n + out_features * (F32 + 1)  # int8 data + a float32 scale and an int8 zero point per row
    if mode == "nf4":
        scalers = math.ceil(n / NF4_BLOCK)
        # 2 values a byte, an int8 scale per block, a bf16 factor per scaler block, a mean, the 16-entry table
        return math.ceil(n / 2) + scalers + BF16 * math.ceil(scalers / NF4_SCALER_BLOCK) + BF16 + 16 * BF16
    raise ValueError(f"not a quantized mode: {mode!r}")


def weight_bytes(shape: ModelArgs, mode: str, world_size: int = 1) -> int:
    """The frozen backbone's bytes on one GPU in ``mode`` (one of :data:`MODES`)."""
    if mode == "ddp":
        return BF16 * backbone_params(shape)
    if mode == "fsdp":  # as flipvqa.parallel shards: per block, and the embedding and output as units
        whole = outer_params(shape) if shape.tie_embeddings else shape.dim  # a tied embedding stays whole; the norm
        sharded = backbone_params(shape) - whole
        return BF16 * (math.ceil(sharded / world_size) + whole + FSDP_UNSHARDED_BLOCKS * block_params(shape))
    linears = block_linears(shape)
    quantized = sum(quantized_linear_bytes(o, i, mode) for o, i in linears)
    rest = BF16 * ((2 * shape.dim + block_extras(shape)) * shape.n_layers + outer_params(shape))  # norms, ...
    dequantized = BF16 * max(o * i for o, i in linears)  # the weight of the matmul running now
    return shape.n_layers * quantized + rest + dequantized


# ---------------------------------------------------------------------------- activations
def block_saved(shape: ModelArgs, n: int, seq_len: int, math_kernel: bool, adapter_len: int = ADAPTER_LEN) -> int:
    """Bytes autograd keeps for one block over ``n`` sequences of ``seq_len`` tokens in bf16."""
    d, f, h, kv, hd = shape.dim, shape.hidden_dim, shape.n_heads, shape.n_kv_heads, shape.head_dim
    tokens = n * seq_len
    kept = 2 * tokens * d * F32 + 3 * tokens * f * BF16  # norm inputs (float32), FFN
    kept += tokens * h * hd * BF16 + n * h * seq_len * adapter_len * (F32 + BF16)  # prompt attention
    if math_kernel:
        return kept + 3 * tokens * h * hd * F32 + n * h * seq_len * seq_len * F32
    return kept + tokens * (2 * h + 2 * kv) * hd * BF16 + n * h * seq_len * F32


def saved_activations(shape: ModelArgs, batch_size: int, seq_len: int, grad_checkpointing: bool = False,
                      tasks: tuple[str, ...] = TASKS, adapter_len: int = ADAPTER_LEN) -> int:
    """What autograd holds after a training forward, summed over the layers (no working set)."""
    layers = shape.n_layers
    if grad_checkpointing:  # the block inputs; masks are made inside the checkpoints
        return layers * len(tasks) * batch_size * seq_len * shape.dim * BF16
    per_layer = sum(block_saved(shape, batch_size, seq_len, task != "qav", adapter_len) for task in tasks)
    return layers * per_layer


def training_activations(shape: ModelArgs, batch_size: int, seq_len: int, grad_checkpointing: bool = False,
                         tasks: tuple[str, ...] = TASKS, adapter_len: int = ADAPTER_LEN) -> int:
    """:func:`saved_activations` plus one block's set, the block being computed or recomputed."""
    working = max(block_saved(shape, batch_size, seq_len, task != "qav", adapter_len) for task in tasks)
    return saved_activations(shape, batch_size, seq_len, grad_checkpointing, tasks, adapter_len) + working


def eval_activations(shape: ModelArgs, batch_size: int, seq_len: int) -> int:
    """Keys/values of the options' shared prefix in every layer, plus one layer's working set."""
    d, f, h, kv, hd = shape.dim, shape.hidden_dim, shape.n_heads, shape.n_kv_heads, shape.head_dim
    tokens = batch_size * seq_len
    cache = 2 * shape.n_layers * tokens * kv * hd * BF16
    working = tokens * (2 * d * BF16 + d * F32 + h * hd * BF16 + 3 * f * BF16) + h * seq_len * seq_len * (F32 + BF16)
    return cache + working


def estimate(shape: ModelArgs, mode: str, batch_size: int, seq_len: int, world_size: int = 1,
             training: bool = True, grad_checkpointing: bool = False,
             tasks: tuple[str, ...] = TASKS) -> MemoryEstimate:
    """Peak bytes on one GPU for ``mode`` (ddp, fsdp over ``world_size`` GPUs, int8, nf4)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    if world_size < 1 or batch_size < 1 or seq_len < 1:
        raise ValueError("world_size, batch_size and seq_len must be at least 1")
    params = trainable_params(shape)
    if training:
        return MemoryEstimate(weight_bytes(shape, mode, world_size), 4 * F32 * params,
                              training_activations(shape, batch_size, seq_len, grad_checkpointing, tasks))
    return MemoryEstimate(weight_bytes(shape, mode, world_size), F32 * params,
                          eval_activations(shape, batch_size, seq_len))


# ---------------------------------------------------------------------------- the table
ROWS = (("7B", "llama-7b"), ("13B", "llama-13b"), ("33B", "llama-33b"), ("70B", "llama-70b"),
        ("Qwen2.5-7B", "qwen2.5-7b"), ("Qwen3-8B", "qwen3-8b"), ("Qwen2.5-72B", "qwen2.5-72b"))
COLUMNS = (("DDP (per GPU)", "ddp", 1), ("FSDP, 8 GPUs", "fsdp", 8), ("int8, 1 GPU", "int8", 1),
           ("nf4, 1 GPU", "nf4", 1))


def smallest_card(total: int) -> str:
    """The smallest of :data:`CARDS_GB` that holds ``total`` with FIT_MARGIN to spare."""
    for gb in CARDS_GB:
        if total <= (1 - FIT_MARGIN) * gb * GIB:
            return f"{gb} GB"
    return f"> {CARDS_GB[-1]} GB"


def _preset_tasks(preset: dict) -> tuple[str, ...]:
    return ("vqa",) + (("vaq",) if preset.get("vaq") else ()) + (("qav",) if preset.get("qav") else ())


def _table(preset_name: str, training: bool) -> str:
    preset = PRESETS[preset_name]
    batch, length, tasks = preset["batch_size"], preset["max_seq_len"], _preset_tasks(preset)
    what = f"training ({', '.join(t.upper() for t in tasks)})" if training else "evaluation"
    lines = [f"**{preset_name} preset, {what}: batch {batch}, {length} tokens.** GiB per GPU "
             "(in parentheses: the smallest card it fits)", "",
             "| backbone | " + " | ".join(title for title, _, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for checkpointing in ((False, True) if training else (False,)):
        for label, name in ROWS:
            cells = []
            for _, mode, world in COLUMNS:
                total = estimate(SHAPES[name], mode, batch, length, world, training, checkpointing, tasks).total
                cells.append(f"{total / GIB:.1f} ({smallest_card(total)})")
            row = f"{label}, --grad_checkpointing" if checkpointing else label
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table() -> str:
    """The markdown tables of docs/backbones.md: NExT-QA and TVQA training, NExT-QA evaluation."""
    return "\n\n".join([_table("nextqa", True), _table("tvqa", True), _table("nextqa", False)]) + "\n"


def main() -> None:
    print(memory_table(), end="")


if __name__ == "__main__":
    main()
