"""Flipped-VQA on a frozen LLaMA: the trainable parts, the three losses and option scoring.

Trainable (float32), with the authors' parameter names so that their checkpoints load as-is:
``adapter_query`` (adaption prompts, ``adapter_len`` rows per adapted layer), ``visual_proj``
(768 -> dim), ``temporal_emb`` (one row per frame slot) and per layer
``layers.{j}.attention.gate1`` (zero-init, ``tanh`` gate on the prompt attention) and
``layers.{j}.attention.gate2`` (init ``-bias``, added to the attention scores from the text after
the video to the video tokens). docs/faithfulness.md ("The video bias", "Losses and scoring")
writes out what the reference computes here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .inputs import FEATURE_DIM, Batch, TaskBatch
from .llama import Transformer, rope_cos_sin


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
    feature_dim: int = FEATURE_DIM  # width of the frame features visual_proj takes


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
        self.visual_proj = nn.Linear(cfg.feature_dim, args.dim, bias=False)
        self.temporal_emb = nn.Embedding(cfg.max_feats, args.dim)
        # A ModuleDict per layer so that the names read ``layers.{j}.attention.gate1``.
        self.layers = nn.ModuleList(
            nn.ModuleDict({"attention": AttentionGates(args.n_heads, cfg.bias)}) for _ in range(args.n_layers))
        self._naive = False
        self.grad_checkpointing = False

    @property
    def naive(self) -> bool:
        """Compute as the reference does: logits at every position, one full sequence per option,
        hand-written attention. For benchmarks and cross-checks; the numbers are the same."""
        return self._naive

    @naive.setter
    def naive(self, value: bool) -> None:
        self._naive = value
        for layer in self.backbone.layers:
            layer.attention.naive = value

    # One rule decides what trains and what a checkpoint holds.
    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if not name.startswith("backbone.")}

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.named_parameters() if not name.startswith("backbone.")]

    # ---------------------------------------------------------------- forward pieces
    def project_video(self, video: Tensor) -> Tensor:
        """(batch, max_feats, 768) -> projected frames (batch, max_feats, dim), no temporal emb."""
        return self.visual_proj(video.to(self.visual_proj.weight.dtype))

    def video_inputs(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """(projected frames, what goes into the video slots = projected + temporal embedding)."""
        projected = self.project_video(video)
        return projected, projected + self.temporal_emb.weight[None]

    def embed(self, tb: TaskBatch, frames: Tensor) -> Tensor:
        """Token embeddings with the video slots replaced by ``frames`` (n_seq, max_feats, dim)."""
        h = self.backbone.tok_embeddings(tb.ids)
        slots = tb.video_start[:, None] + torch.arange(self.cfg.max_feats, device=h.device)
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        h = h.clone()
        h[rows, slots] = frames.to(h.dtype)
        return h

    def attention_mask(self, video_start: Tensor, q_pos: Tensor, k_pos: Tensor, allowed: Tensor):
        """``gate2 -> additive mask``: -inf where a query may not attend (``allowed`` False),
        plus the layer's per-head ``gate2`` where a query after the video attends to a video key
        (docs/faithfulness.md, "The video bias").

        ``video_start`` (n,); ``q_pos`` (n or 1, q) and ``k_pos`` (n or 1, k): absolute positions
        of the queries and keys; ``allowed`` (n or 1, q, k). The mask is (n or 1, 1, q, k)."""
        if bool((video_start == video_start[0]).all()):
            video_start = video_start[:1]  # one region for the whole batch
        v, s = self.cfg.max_feats, video_start[:, None]
        after_video = q_pos >= s + v  # (n, q)
        on_video = (k_pos >= s) & (k_pos < s + v)  # (n, k)
        region = (after_video[:, :, None] & on_video[:, None, :])[:, None]  # (n, 1, q, k)
        base = torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf"))[:, None]
        return lambda gate2: base + region * gate2.float()

    def video_bias_mask(self, tb: TaskBatch, seqlen: int):
        """The mask of whole sequences: causal, plus the video bias."""
        pos = torch.arange(seqlen, device=tb.ids.device)
        causal = pos[None, :, None] >= pos[None, None, :]  # (1, q, k)
        return self.attention_mask(tb.video_start, pos[None], pos[None], causal)

    def hidden(self, tb: TaskBatch, h: Tensor, video_bias: bool) -> Tensor:
        """Run the layers over whole sequences (causal; the video bias for VQA/VAQ)."""
        seqlen = h.shape[1]
        rope = self.backbone.rope(0, seqlen, h.device)
        mask_for = self.video_bias_mask(tb, seqlen) if video_bias else (lambda gate2: None)
        return self.run_layers(h, rope, mask_for)[0]

    def run_layers(self, h: Tensor, rope, mask_for, past: Optional[list] = None, keep_kv: bool = False):
        """The backbone's layers; the last ``adapter_layer`` get the prompt and the gates.

        ``mask_for(gate2)`` gives a layer's additive mask from its video bias (None: causal).
        ``past``: per-layer keys/values of a prefix; ``keep_kv`` returns this pass's.
        """
        n_layers = len(self.backbone.layers)
        first_adapted = n_layers - self.cfg.adapter_layer
        prompts = self.adapter_query.weight.view(self.cfg.adapter_layer, self.cfg.adapter_len, -1)
        kvs = []
        for j, layer in enumerate(self.backbone.layers):
            layer_past = past[j] if past is not None else None
            if j < first_adapted:
                if self.cfg.skip_unadapted_layers:
                    kvs.append(None)
                    continue
                mask = None if layer_past is None else mask_for(torch.zeros_like(self.layers[j]["attention"].gate2))
                h, kv = self._call(layer, h, rope, mask, None, None, layer_past)
            else:
                gates = self.layers[j]["attention"]
                h, kv = self._call(layer, h, rope, mask_for(gates.gate2), prompts[j - first_adapted],
                                   gates.gate1.tanh(), layer_past)
            kvs.append(kv if keep_kv else None)
        return h, kvs

    def _call(self, layer, h, rope, mask, prompt, gate, past):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, h, rope, mask, prompt, gate, past, use_reentrant=False)
        return layer(h, rope, mask, prompt, gate, past)

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
        if self.naive:  # the reference: logits and cross-entropy at every position, non-targets ignored
            labels = torch.full(tb.ids.shape, -100, dtype=torch.long, device=h.device)
            labels[rows, pos] = targets
            logits = self.backbone.output(self.backbone.norm(h)).float()
            losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            return losses.view_as(labels)[rows, pos], rows
        # only target positions reach the vocabulary
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
        projected, frames = self.video_inputs(batch.video)
        vqa = self.token_losses(batch.tasks["vqa"], frames)[0].mean()
        zero = vqa.new_zeros(())
        vaq = self.token_losses(batch.tasks["vaq"], frames)[0].mean() if self.cfg.vaq else zero
        qav = self.qav_loss(batch.tasks["qav"], frames, projected) if self.cfg.qav else zero
        return vqa, vaq, qav

    @torch.no_grad()
    def score_options(self, batch: Batch) -> Tensor:
        """Mean cross-entropy of each option's answer tokens, (batch, n_options); lower is better.

        The option sequences of a question are equal up to the answer, so scoring runs in three
        stages: the shared prefix (instruction, video, dialogue, question, choices) once per
        question; every option's suffix against the prefix's keys/values; the suffixes' targets.
        ``naive`` runs every option as a full sequence instead (the reference's way; same numbers).
        """
        tb = batch.tasks["vqa"]
        n_q = batch.video.shape[0]
        n_opt = tb.ids.shape[0] // n_q
        frames = self.video_inputs(batch.video)[1]
        split = None if self.naive else self._shared_prefix(tb, n_q, n_opt)
        if split is None:
            losses, rows = self.token_losses(tb, frames.repeat_interleave(n_opt, dim=0))
            return _mean_per_row(losses, rows, tb.ids.shape[0]).view(n_q, n_opt)
        prefix, past = self._run_prefix(tb, frames, split, n_q, n_opt)
        suffix, h = self._run_suffixes(tb, prefix, past, split, n_q, n_opt)
        return self._suffix_scores(tb, suffix, h, split, n_q, n_opt)

    def _shared_prefix(self, tb: TaskBatch, n_q: int, n_opt: int) -> Optional[Tensor]:
        """Per question, the number of leading tokens its options share and that no target
        needs as output (up to the first target's predecessor); None if the video is not in it."""
        ids = tb.ids.view(n_q, n_opt, -1)
        first_target = tb.label_start.view(n_q, n_opt).min(dim=1).values - 1  # its hidden state is needed
        same = (ids == ids[:, :1]).all(dim=1).long()  # (n_q, seq)
        common = same.cumprod(dim=1).sum(dim=1)
        split = torch.minimum(first_target, common)
        video_end = tb.video_start.view(n_q, n_opt).max(dim=1).values + self.cfg.max_feats
        if bool((split < video_end).any()):
            return None
        return split

    def _run_prefix(self, tb: TaskBatch, frames: Tensor, split: Tensor, n_q: int, n_opt: int
                    ) -> tuple[TaskBatch, list]:
        """Stage 1: each question's shared prefix (its first option's first ``split`` tokens,
        right-padded to the longest), as whole sequences; returns them and every layer's keys/values."""
        p_len = int(split.max())
        first = tb.rows(torch.arange(n_q, device=split.device) * n_opt)  # option 0 of each question
        prefix = TaskBatch(first.ids[:, :p_len], first.label_start, split, first.video_start)
        h = self.embed(prefix, frames)
        _, past = self.run_layers(h, self.backbone.rope(0, p_len, h.device), self.video_bias_mask(prefix, p_len),
                                  keep_kv=True)
        return prefix, past

    def _run_suffixes(self, tb: TaskBatch, prefix: TaskBatch, past: list, split: Tensor, n_q: int,
                      n_opt: int) -> tuple[Tensor, Tensor]:
        """Stage 2: every option's tokens after ``split``, the options of a question side by side
        in one row, attending to the prefix's keys (up to its own split) and causally to their own
        option's earlier tokens. Returns the suffix ids (n_q, n_opt, s_len) and hidden states."""
        device = tb.ids.device
        ids = tb.ids.view(n_q, n_opt, -1)
        s_len = int((tb.length.view(n_q, n_opt) - split[:, None]).max())
        t = torch.arange(s_len, device=device)
        src = (split[:, None, None] + t).clamp(max=ids.shape[2] - 1)  # (n_q, 1, s_len)
        suffix = ids.gather(2, src.expand(n_q, n_opt, s_len))  # (n_q, n_opt, s_len)
        q_pos = (split[:, None] + t).repeat(1, n_opt)  # (n_q, n_opt * s_len): absolute positions
        p_len = prefix.ids.shape[1]
        k_pos = torch.cat([torch.arange(p_len, device=device).expand(n_q, p_len), q_pos], dim=1)
        q_opt = torch.arange(n_opt, device=device).repeat_interleave(s_len)  # which option a query is
        same_option_causal = (q_opt[:, None] == q_opt[None, :]) & (t.repeat(n_opt)[None, :] <= t.repeat(n_opt)[:, None])
        prefix_valid = torch.arange(p_len, device=device)[None, :] < split[:, None]  # (n_q, p_len)
        allowed = torch.cat([prefix_valid[:, None, :].expand(n_q, q_pos.shape[1], p_len),
                             same_option_causal[None].expand(n_q, -1, -1)], dim=2)
        mask_for = self.attention_mask(prefix.video_start, q_pos, k_pos, allowed)
        h = self.backbone.tok_embeddings(suffix.reshape(n_q, -1))
        h, _ = self.run_layers(h, rope_cos_sin(self.backbone.inv_freq, q_pos), mask_for, past=past)
        return suffix, h.view(n_q, n_opt, s_len, -1)

    def _suffix_scores(self, tb: TaskBatch, suffix: Tensor, h: Tensor, split: Tensor, n_q: int,
                       n_opt: int) -> Tensor:
        """Stage 3: option k's targets are its tokens from its label start on, each predicted by
        the position before it; its score is their mean cross-entropy."""
        lengths, label_start = tb.length.view(n_q, n_opt), tb.label_start.view(n_q, n_opt)
        pos = split[:, None, None] + torch.arange(suffix.shape[2], device=h.device)  # absolute position of slot t
        predicts_target = (pos >= label_start[..., None] - 1) & (pos < lengths[..., None] - 1)
        qi, oi, ti = predicts_target.nonzero(as_tuple=True)
        logits = self.backbone.output(self.backbone.norm(h[qi, oi, ti])).float()
        losses = F.cross_entropy(logits, suffix[qi, oi, ti + 1], reduction="none")
        return _mean_per_row(losses, qi * n_opt + oi, n_q * n_opt).view(n_q, n_opt)


def _mean_per_row(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    total = torch.zeros(n_rows, device=values.device).index_add_(0, rows, values)
    count = torch.zeros(n_rows, device=values.device).index_add_(0, rows, torch.ones_like(values))
    return total / count
