"""A compact LLaMA-family decoder (LLaMA 1/2/3, Mistral, TinyLlama, Qwen2/2.5, Qwen3, ...).

Pre-norm residual blocks with RMSNorm, rotary position embeddings, SwiGLU feed-forward and
(grouped-query) attention through ``scaled_dot_product_attention``. Two switches cover the Qwen
families: ``qkv_bias`` (Qwen2's q/k/v projections have biases) and ``qk_norm`` (Qwen3 normalises
each head's q and k with an RMSNorm over ``head_dim`` before rotary).

Rotary layout: this module uses **Meta's interleaved pairs** -- dimensions ``(2i, 2i+1)`` of each
head rotate together. Hugging Face checkpoints store q/k rows permuted for the rotate-half form;
:mod:`flipvqa.checkpoints` undoes that permutation at load time, so there is one layout in here.

The attention takes two optional extras that Flipped-VQA needs and the plain LM does not use:
an additive mask (the causal mask plus the learned per-head video bias) and *prompt* rows (the
adaption prompt) whose keys/values go through this layer's own ``wk``/``wv`` and are attended with
a separate, gated softmax (see :mod:`flipvqa.model.flipped`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: as many as query heads (no GQA)
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # feed-forward width; None: LLaMA's multiple_of rule
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = field(default=None)
    head_dim: Optional[int] = None  # None: dim // n_heads
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: wq, wk, wv have biases (wo has none)
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k (weights of head_dim) before rotary
    # The smallest sliding-window attention span of any layer, None if every layer attends to the
    # whole sequence. The backbone computes full causal attention: it is exact only for sequences
    # no longer than the window (checked against the run's lengths, flipvqa.checkpoints).
    sliding_window: Optional[int] = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# Named backbone shapes (random weights for benchmarks; real weights come from checkpoints).
SHAPES: dict[str, ModelArgs] = {
    "llama-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "llama-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "llama-33b": ModelArgs(dim=6656, n_layers=60, n_heads=52),
    # LLaMA 2 70B: grouped-query attention (8 key/value heads), feed-forward 28672.
    "llama-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                           multiple_of=4096),
    # Qwen2.5 7B / 72B (q/k/v biases, GQA) and Qwen3 8B (q/k norms, head_dim 128), their vocabularies.
    "qwen2.5-7b": ModelArgs(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18944, vocab_size=152064,
                            rope_theta=1e6, qkv_bias=True),
    "qwen3-8b": ModelArgs(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=12288,
                          vocab_size=151936, rope_theta=1e6, qk_norm=True),
    "qwen2.5-72b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=29568, vocab_size=152064,
                             rope_theta=1e6, qkv_bias=True),
    "bench-512": ModelArgs(dim=512, n_layers=8, n_heads=8),
    "bench-128": ModelArgs(dim=128, n_layers=2, n_heads=2),  # benchmarks/gpu.sh --dry-run
}


def rope_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies ``theta^(-2i/head_dim)``, rescaled as ``transformers`` does for
    ``rope_scaling`` of type ``linear`` or ``llama3``."""
    head_dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


def rope_cos_sin(inv_freq: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``(*positions.shape, head_dim // 2)`` in float32."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of ``x`` (batch, seq, heads, head_dim) in float32. ``cos``/``sin``
    are (seq, head_dim/2), or (batch, seq, head_dim/2) for per-row positions."""
    xf = x.float().unflatten(-1, (-1, 2))  # (batch, seq, heads, head_dim/2, 2)
    even, odd = xf[..., 0], xf[..., 1]
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        # naive: the reference's hand-written attention (one score matrix over prompt and sequence,
        # mask add, two softmaxes) instead of the fused kernel; for benchmarks, same numbers.
        self.naive = False
        # keep_probs: also run the hand-written attention and keep its sequence softmax in
        # ``probs`` (batch, heads, seq, keys), for pictures of what the model looks at.
        self.keep_probs = False
        self.probs: Optional[Tensor] = None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Optional[Tensor] = None,
        prompt: Optional[Tensor] = None,
        prompt_gate: Optional[Tensor] = None,
        past_kv: Optional[tuple[Tensor, Tensor]] = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Self-attention of ``x`` (batch, seq, dim).

        ``mask``: additive float mask (batch or 1, heads or 1, seq, past + seq); None means causal.
        ``prompt`` (prompt_len, dim): extra key/value rows without rotary, attended with their own
        softmax and scaled per head by ``prompt_gate`` (1, heads, 1, 1); or their keys/values as
        :meth:`prompt_kv` gives them (computed once for many calls, as generation does).
        ``past_kv``: keys/values (batch, kv_heads, past, head_dim) of an earlier prefix, already
        rotated; they come before ``x``'s keys (``rope`` and ``mask`` must say where ``x`` sits).
        Returns the output and this call's full keys/values (for reuse as a prefix).
        """
        bsz, seqlen, _ = x.shape
        q = apply_rope(self._heads(self.wq, self.q_norm, x, self.n_heads), *rope).transpose(1, 2)
        k, v = self.kv(x, rope)  # (batch, heads, seq, head_dim)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        present = (k, v)
        gqa = self.n_kv_heads != self.n_heads
        if self.naive or self.keep_probs:
            out, probs = self._naive_attention(q, k, v, mask, prompt, prompt_gate)
            self.probs = probs.detach() if self.keep_probs else None
            return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1)), present
        if mask is None:
            assert past_kv is None, "a prefix needs an explicit mask"
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), enable_gqa=gqa)
        if prompt is not None:
            out = out + self._prompt_attention(q, prompt, prompt_gate)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.wo(out), present

    def kv(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Keys (rotated) and values (batch, kv_heads, seq, head_dim) of ``x``."""
        k = apply_rope(self._heads(self.wk, self.k_norm, x, self.n_kv_heads), *rope)
        v = self._heads(self.wv, None, x, self.n_kv_heads)
        return k.transpose(1, 2), v.transpose(1, 2)

    def _heads(self, proj: nn.Module, norm: Optional[RMSNorm], x: Tensor, heads: int) -> Tensor:
        """``proj(x)`` split into heads (batch, seq, heads, head_dim), each normalised by ``norm``."""
        out = proj(x).unflatten(-1, (heads, self.head_dim))
        return out if norm is None else norm(out)

    def _naive_attention(self, q, k, v, mask, prompt, gate) -> tuple[Tensor, Tensor]:
        """(output, the sequence softmax) of the reference's explicit computation."""
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        seqlen, keys = q.shape[2], k.shape[2]
        if mask is None:
            mask = torch.full((seqlen, keys), float("-inf"), device=q.device).triu(keys - seqlen + 1)
        plen = 0
        if prompt is not None:
            pk, pv = self.prompt_kv(prompt)
            plen = pk.shape[2]
            k = torch.cat([pk.expand(q.shape[0], -1, -1, -1).to(k.dtype), k], dim=2)
            v = torch.cat([pv.expand(q.shape[0], -1, -1, -1).to(v.dtype), v], dim=2)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        seq_scores = scores[..., plen:] + mask
        probs = F.softmax(seq_scores.float(), dim=-1).to(q.dtype)
        if prompt is not None:
            p_probs = F.softmax(scores[..., :plen].float(), dim=-1) * gate.float()
            return torch.matmul(torch.cat([p_probs.to(q.dtype), probs], dim=-1), v), probs
        return torch.matmul(probs, v), probs

    def prompt_kv(self, prompt: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Prompt keys/values (1, heads, prompt_len, head_dim) through this layer's own key/value
        path (wk/wv with their biases, then k_norm) but without rotary; a pair already computed is
        returned as it is."""
        if isinstance(prompt, tuple):
            return prompt
        pk = self._heads(self.wk, self.k_norm, prompt[None], self.n_kv_heads).transpose(1, 2)
        pv = self._heads(self.wv, None, prompt[None], self.n_kv_heads).transpose(1, 2)
        rep = self.n_heads // self.n_kv_heads  # query head h uses kv head h // rep (transformers' repeat_kv)
        return pk.repeat_interleave(rep, dim=1), pv.repeat_interleave(rep, dim=1)

    def _prompt_attention(self, q: Tensor, prompt: Tensor, gate: Tensor) -> Tensor:
        # The prompt rows get a softmax of their own (not shared with the sequence), as in
        # LLaMA-Adapter; the per-head gate starts at zero so training starts from the frozen LM.
        pk, pv = self.prompt_kv(prompt)
        scores = torch.matmul(q, pk.transpose(2, 3).to(q.dtype)) / math.sqrt(self.head_dim)
        probs = F.softmax(scores.float(), dim=-1) * gate.float()
        return torch.matmul(probs.to(q.dtype), pv.to(q.dtype))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, rope, mask=None, prompt=None, prompt_gate=None, past_kv=None, out_from: int = 0):
        """``out_from``: outputs only for the positions from there on; the earlier ones add their
        keys/values and nothing else (a last layer whose early outputs nobody reads). ``mask``
        must then be explicit; the keys/values returned are still those of every position."""
        if out_from:
            cos, sin = rope
            head_rope = (cos[..., :out_from, :], sin[..., :out_from, :])
            head = self.attention.kv(self.attention_norm(x[:, :out_from]), head_rope)
            past_kv = head if past_kv is None else tuple(torch.cat([p, t], dim=2) for p, t in zip(past_kv, head))
            x, rope, mask = x[:, out_from:], (cos[..., out_from:, :], sin[..., out_from:, :]), mask[..., out_from:, :]
        attn, present = self.attention(self.attention_norm(x), rope, mask, prompt, prompt_gate, past_kv)
        h = x + attn
        return h + self.feed_forward(self.ffn_norm(h)), present


class Transformer(nn.Module):
    """The frozen backbone. Parameter names follow Meta's checkpoints."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)

    def rope(self, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        positions = torch.arange(start, start + length, device=device)
        return rope_cos_sin(self.inv_freq, positions)

    def forward(self, tokens: Tensor) -> Tensor:
        """Plain causal language model: logits (batch, seq, vocab)."""
        h = self.tok_embeddings(tokens)
        rope = self.rope(0, tokens.shape[1], tokens.device)
        for layer in self.layers:
            h, _ = layer(h, rope)
        return self.output(self.norm(h)).float()
