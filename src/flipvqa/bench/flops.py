"""The useful FLOPs of a training step, the count behind ``model_tflops_per_s`` and the MFU.

Per non-padding token of every enabled task sequence::

    forward = 2 * P                      # P: weights of the matmuls in the layers that run
            + 2 * 2 * L * d * ctx        # attention scores and values; ctx: causal context,
                                         #   summed over a sequence of n tokens: n (n + 1) / 2
    plus 2 * d * V per target token      # vocabulary projection, only where a target is (VQA, VAQ)
    training step = 2 * forward          # the backbone is frozen: backward needs input gradients
                                         #   only, about one more forward (no weight gradients)

with L layers, d = heads * head_dim, V the vocabulary. The adaption prompts (``adapter_len`` keys
per layer), the visual projection and the QAV frame classifier are left out (about 1%). The same
count serves both modes, so padding and logits nobody needs are not credited.
"""

from __future__ import annotations

from ..model.flipped import FlippedVQA
from ..model.inputs import Batch


def count_tokens(batch: Batch, tasks: tuple[str, ...]) -> tuple[int, int, int]:
    """(non-padding tokens, summed causal context n (n + 1) / 2, vocabulary targets) of ``tasks``."""
    tokens = context = targets = 0
    for task in tasks:
        tb = batch.tasks[task]
        n = tb.length.long()
        tokens += int(n.sum())
        context += int((n * (n + 1) // 2).sum())
        if task != "qav":  # QAV classifies frames; it never reaches the vocabulary
            targets += int((n - tb.label_start.clamp(min=1)).clamp(min=0).sum())
    return tokens, context, targets


def train_flops(model: FlippedVQA, batch: Batch, tasks: tuple[str, ...]) -> float:
    """Useful FLOPs of one training step on ``batch`` (the formula of the module docstring)."""
    shape = model.backbone.args
    layers = list(model.backbone.layers)
    if model.cfg.skip_unadapted_layers:
        layers = layers[len(layers) - model.cfg.adapter_layer:]
    matmul_params = sum(p.numel() for layer in layers for p in layer.parameters() if p.ndim == 2)
    tokens, context, targets = count_tokens(batch, tasks)
    forward = (2 * matmul_params * tokens + 4 * len(layers) * shape.n_heads * shape.head_dim * context
               + 2 * shape.dim * shape.vocab_size * targets)
    return 2.0 * forward
