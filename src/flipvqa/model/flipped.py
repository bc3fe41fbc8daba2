"""Flipped-VQA on a frozen LLaMA: the trainable parts, the three losses and option scoring.

Trainable (float32), with the authors' parameter names so that their checkpoints load as-is:
``adapter_query`` (adaption prompts, ``adapter_len`` rows per adapted layer), ``visual_proj``
(768 -> dim), ``temporal_emb`` (one row per frame slot) and per layer
``layers.{j}.attention.gate1`` (zero-init, ``tanh`` gate on the prompt attention) and
``layers.{j}.attention.gate2`` (init ``-bias``, added to the attention scores from the text after
the video to the video tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.dataset import Batch, TaskBatch
from .llama import Transformer

FEATURE_DIM = 768


@dataclass
class FlipConfig:
    adapter_len: int = 10
    adapter_layer: int = 32
    max_feats: int = 10
    bias: float = 3.0
    tau: float = 100.0
    vaq: bool = False
    qav: bool = False
    # The reference runs only the last ``adapter_layer`` layers and skips the others entirely;
    # flipvqa runs every layer unless this is set (needed for checkpoints trained that way).
    skip_unadapted_layers: bool = False


class AttentionGates(nn.Module):
    def __init__(self, n_heads: int, bias: float):
        super().__init__()
        self.gate1 = nn.Parameter(torch.zeros(1, n_heads, 1, 1))
        self.gate2 = nn.Parameter(torch.full((1, n_heads, 1, 1), -float(bias)))


class FlippedVQA(nn.Module):
    def __init__(self, backbone: Transformer, cfg: FlipConfig):
        super().__init__()
        args = backbone.args
        if not 1 <= cfg.adapter_layer <= args.n_layers:
            raise ValueError(f"adapter_layer {cfg.adapter_layer} must be in 1..{args.n_layers}")
        self.cfg = cfg
        self.backbone = backbone.requires_grad_(False)
        self.adapter_query = nn.Embedding(cfg.adapter_len * cfg.adapter_layer, args.dim)
        self.visual_proj = nn.Linear(FEATURE_DIM, args.dim, bias=False)
        self.temporal_emb = nn.Embedding(cfg.max_feats, args.dim)
        # A ModuleDict per layer so that the names read ``layers.{j}.attention.gate1``.
        self.layers = nn.ModuleList(
            nn.ModuleDict({"attention": AttentionGates(args.n_heads, cfg.bias)}) for _ in range(args.n_layers))

    # One rule decides what trains and what a checkpoint holds.
    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if not name.startswith("backbone.")}

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.named_parameters() if not name.startswith("backbone.")]

    # ---------------------------------------------------------------- forward pieces
    def project_video(self, video: Tensor) -> Tensor:
        """(batch, max_feats, 768) -> projected frames (batch, max_feats, dim), no temporal emb."""
        return self.visual_proj(video.to(self.visual_proj.weight.dtype))

    def embed(self, tb: TaskBatch, frames: Tensor) -> Tensor:
        """Token embeddings with the video slots replaced by ``frames`` (n_seq, max_feats, dim)."""
        h = self.backbone.tok_embeddings(tb.ids)
        slots = tb.video_start[:, None] + torch.arange(self.cfg.max_feats, device=h.device)
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        h = h.clone()
        h[rows, slots] = frames.to(h.dtype)
        return h

    def _video_bias_region(self, tb: TaskBatch, seqlen: int) -> Tensor:
        """(n_seq or 1, 1, seq, seq) bool: queries after the video x keys on the video."""
        v = self.cfg.max_feats
        starts = tb.video_start
        if bool((starts == starts[0]).all()):
            starts = starts[:1]
        pos = torch.arange(seqlen, device=starts.device)
        s = starts[:, None]
        rows = pos[None, :] >= s + v  # (n, seq)
        cols = (pos[None, :] >= s) & (pos[None, :] < s + v)
        return (rows[:, :, None] & cols[:, None, :])[:, None]

    def hidden(self, tb: TaskBatch, h: Tensor, video_bias: bool) -> Tensor:
        """Run the layers; the last ``adapter_layer`` get the prompt and gates."""
        n_layers = len(self.backbone.layers)
        first_adapted = n_layers - self.cfg.adapter_layer
        seqlen = h.shape[1]
        rope = self.backbone.rope(0, seqlen, h.device)
        if video_bias:
            causal = torch.full((seqlen, seqlen), float("-inf"), device=h.device).triu(1)
            region = self._video_bias_region(tb, seqlen)
        prompts = self.adapter_query.weight.view(self.cfg.adapter_layer, self.cfg.adapter_len, -1)
        for j, layer in enumerate(self.backbone.layers):
            if j < first_adapted:
                if self.cfg.skip_unadapted_layers:
                    continue
                h, _ = layer(h, rope)
                continue
            gates = self.layers[j]["attention"]
            mask = causal + region * gates.gate2.float() if video_bias else None
            h, _ = layer(h, rope, mask, prompts[j - first_adapted], gates.gate1.tanh())
        return h

    # ---------------------------------------------------------------- objectives
    def _token_targets(self, tb: TaskBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(row, position, target id) of every target: position t predicts token t+1."""
        pos = torch.arange(tb.ids.shape[1], device=tb.ids.device)[None]
        is_target = (pos >= tb.label_start[:, None]) & (pos < tb.length[:, None]) & (pos > 0)
        rows, cols = is_target.nonzero(as_tuple=True)
        return rows, cols - 1, tb.ids[rows, cols]

    def token_losses(self, tb: TaskBatch, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Per-target cross-entropy (only target positions reach the vocabulary) and its rows."""
        h = self.hidden(tb, self.embed(tb, frames), video_bias=True)
        rows, pos, targets = self._token_targets(tb)
        logits = self.backbone.output(self.backbone.norm(h[rows, pos])).float()
        return F.cross_entropy(logits, targets, reduction="none"), rows

    def qav_loss(self, tb: TaskBatch, frames: Tensor, projected: Tensor) -> Tensor:
        """Frame-slot classification: the hidden state before slot i should pick frame i."""
        h = self.hidden(tb, self.embed(tb, frames), video_bias=False)
        v = self.cfg.max_feats
        pos = tb.video_start[:, None] - 1 + torch.arange(v, device=h.device)  # (n, v)
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        hq = self.backbone.norm(h[rows, pos]).float()  # (n, v, dim)
        scores = torch.bmm(hq, projected.float().transpose(1, 2)) / self.cfg.tau  # (n, v, v)
        labels = torch.arange(v, device=h.device).expand(h.shape[0], v)
        return F.cross_entropy(scores.reshape(-1, v), labels.reshape(-1))

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Training losses (vqa, vaq, qav); a disabled objective is 0."""
        projected = self.project_video(batch.video)
        frames = projected + self.temporal_emb.weight[None]
        vqa = self.token_losses(batch.tasks["vqa"], frames)[0].mean()
        zero = vqa.new_zeros(())
        vaq = self.token_losses(batch.tasks["vaq"], frames)[0].mean() if self.cfg.vaq else zero
        qav = self.qav_loss(batch.tasks["qav"], frames, projected) if self.cfg.qav else zero
        return vqa, vaq, qav

    @torch.no_grad()
    def score_options(self, batch: Batch) -> Tensor:
        """Mean cross-entropy of each option's answer tokens, (batch, n_options); lower is better."""
        tb = batch.tasks["vqa"]
        n_q = batch.video.shape[0]
        n_opt = tb.ids.shape[0] // n_q
        frames = self.project_video(batch.video) + self.temporal_emb.weight[None]
        frames = frames.repeat_interleave(n_opt, dim=0)
        losses, rows = self.token_losses(tb, frames)
        total = torch.zeros(tb.ids.shape[0], device=losses.device).index_add_(0, rows, losses)
        count = torch.zeros_like(total).index_add_(0, rows, torch.ones_like(losses))
        return (total / count).view(n_q, n_opt)
