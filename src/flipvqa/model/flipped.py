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
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import scoring
from .inputs import FEATURE_DIM, Batch, TaskBatch
from .llama import Transformer


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
        # The tokens every sequence of a task starts with ("[BOS] Instruction: ... Video:") run
        # once, for one row, instead of once per sequence: per batch in training (gradients flow
        # through it as before), and cached across batches when no gradient is needed. Same
        # numbers; off in naive mode. docs/faithfulness.md, "Shared instruction prefix".
        self.prefix_cache = True
        self._prefix_kv_cache: dict = {}
        # agree(flag): whether every process says True. Sharded blocks (flipvqa.parallel) gather
        # their weights collectively, so all processes must take the same path through them.
        self.agree: Callable[[bool], bool] = lambda flag: flag

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
        return self._whole_sequences(tb, h, video_bias)[0]

    def _whole_sequences(self, tb: TaskBatch, h: Tensor, video_bias: bool, keep_kv: bool = False):
        seqlen = h.shape[1]
        rope = self.backbone.rope(0, seqlen, h.device)
        mask_for = self.video_bias_mask(tb, seqlen) if video_bias else (lambda gate2: None)
        return self.run_layers(h, rope, mask_for, keep_kv=keep_kv)

    def shared_hidden(self, tb: TaskBatch, h: Tensor, video_bias: bool, needed_from: Tensor,
                      keep_kv: bool = False) -> tuple[Tensor, int, list]:
        """:meth:`hidden`, doing only the work whose results are used: the leading tokens every
        row shares (ahead of its video and of ``needed_from``, the first position whose hidden
        state is read) run once, for one row; the last layer computes outputs only from
        ``min(needed_from)`` on. Fast mode only (the naive mode runs whole sequences).

        Returns the hidden states from position ``start`` on, ``start`` and, with ``keep_kv``,
        every layer's keys/values of all positions."""
        n, seqlen = h.shape[0], h.shape[1]
        if self.naive:
            out, kvs = self._whole_sequences(tb, h, video_bias, keep_kv)
            return out, 0, kvs
        p = self._shared_length(tb, needed_from)
        if not self.agree(p > 0):
            p = 0
        start = max(p, min(int(needed_from.min()), seqlen - 1))
        past = None
        if p:
            past = [None if kv is None else (kv[0].expand(n, -1, -1, -1), kv[1].expand(n, -1, -1, -1))
                    for kv in self._prefix_kv(tb.ids[:1, :p])]
        pos = torch.arange(seqlen, device=h.device)
        q_pos, k_pos = pos[None, p:], pos[None]
        mask_for = self.attention_mask(tb.video_start, q_pos, k_pos, k_pos[:, None, :] <= q_pos[:, :, None])
        if not video_bias:  # QAV: causal only
            causal = mask_for(torch.zeros(1, 1, 1, 1, device=h.device))
            mask_for = lambda gate2: causal  # noqa: E731
        out, kvs = self.run_layers(h[:, p:], self.backbone.rope(p, seqlen - p, h.device), mask_for, past=past,
                                   keep_kv=keep_kv, out_from=start - p)
        return out, start, kvs

    def _shared_length(self, tb: TaskBatch, needed_from: Tensor) -> int:
        """How many leading tokens all rows have in common, before any video slot and before
        ``needed_from``; 0 when sharing is off or would not pay (one row and nothing to cache)."""
        if not self.prefix_cache or (tb.ids.shape[0] < 2 and torch.is_grad_enabled()):
            return 0
        common = int((tb.ids == tb.ids[:1]).all(dim=0).long().cumprod(0).sum())
        return max(0, min(common, int(tb.video_start.min()), int(needed_from.min())))

    def _prefix_kv(self, ids: Tensor) -> list:
        """Every layer's keys/values of one prefix (1, p) that holds no video. Without gradients
        they are cached: the prefix depends only on the model, and the key holds the trainable
        tensors' versions, so an optimizer step or a loaded checkpoint computes it anew (the
        frozen backbone does not change)."""
        if torch.is_grad_enabled():
            return self._run_prefix_kv(ids)
        device = ids.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        key = (tuple(ids[0].tolist()), str(ids.device), autocast,
               tuple((p.data_ptr(), p._version) for _, p in self.trainable_parameters()))
        if not self.agree(key in self._prefix_kv_cache):
            if len(self._prefix_kv_cache) >= 8:  # a few prompts per dataset; old weights' entries go
                self._prefix_kv_cache.clear()
            self._prefix_kv_cache[key] = self._run_prefix_kv(ids)
        return self._prefix_kv_cache[key]

    def _run_prefix_kv(self, ids: Tensor) -> list:
        h = self.backbone.tok_embeddings(ids)
        return self.run_layers(h, self.backbone.rope(0, ids.shape[1], h.device), lambda gate2: None, keep_kv=True)[1]

    def adapter_kv(self) -> list:
        """Every adapted layer's adaption-prompt keys/values, for :meth:`run_layers`'s
        ``prompts`` (computed once when many calls share them, as in generation)."""
        first_adapted = len(self.backbone.layers) - self.cfg.adapter_layer
        rows = self.adapter_query.weight.view(self.cfg.adapter_layer, self.cfg.adapter_len, -1)
        return [layer.attention.prompt_kv(rows[i])
                for i, layer in enumerate(self.backbone.layers[first_adapted:])]

    def run_layers(self, h: Tensor, rope, mask_for, past: Optional[list] = None, keep_kv: bool = False,
                   out_from: int = 0, prompts: Optional[list] = None):
        """The backbone's layers; the last ``adapter_layer`` get the prompt and the gates.

        ``mask_for(gate2)`` gives a layer's additive mask from its video bias (None: causal).
        ``past``: per-layer keys/values of a prefix; ``keep_kv`` returns this pass's.
        ``out_from``: the last layer's outputs are computed from that position of ``h`` on
        (the hidden states returned start there); it needs an explicit mask.
        ``prompts``: the adapted layers' prompt keys/values (:meth:`adapter_kv`), else computed.
        """
        n_layers = len(self.backbone.layers)
        first_adapted = n_layers - self.cfg.adapter_layer
        if prompts is None:
            prompts = self.adapter_query.weight.view(self.cfg.adapter_layer, self.cfg.adapter_len, -1)
        kvs = []
        for j, layer in enumerate(self.backbone.layers):
            layer_past = past[j] if past is not None else None
            if j < first_adapted:
                if self.cfg.skip_unadapted_layers:
                    kvs.append(None)
                    continue
                bias = None if layer_past is None else torch.zeros_like(self.layers[j]["attention"].gate2)
                h, kv = self._call(layer, h, rope, mask_for, bias, None, None, layer_past, 0)
            else:
                gates = self.layers[j]["attention"]
                h, kv = self._call(layer, h, rope, mask_for, gates.gate2, prompts[j - first_adapted],
                                   gates.gate1.tanh(), layer_past, out_from if j == n_layers - 1 else 0)
            kvs.append(kv if keep_kv else None)
        return h, kvs

    def _call(self, layer, h, rope, mask_for, bias, prompt, gate, past, out_from):
        """One layer; its mask is ``mask_for(bias)`` (None without a bias: causal). Under
        --grad_checkpointing the mask is made inside the checkpoint: as an argument, each layer's
        (1, heads, L, L) float32 mask would stay alive until the backward pass."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(_masked_layer, layer, h, rope, mask_for, bias, prompt, gate, past, out_from,
                              use_reentrant=False)
        return _masked_layer(layer, h, rope, mask_for, bias, prompt, gate, past, out_from)

    # ---------------------------------------------------------------- objectives
    def _token_targets(self, tb: TaskBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(row, position, target id) of every target: position t predicts token t+1."""
        pos = torch.arange(tb.ids.shape[1], device=tb.ids.device)[None]
        is_target = (pos >= tb.label_start[:, None]) & (pos < tb.length[:, None]) & (pos > 0)
        rows, cols = is_target.nonzero(as_tuple=True)
        return rows, cols - 1, tb.ids[rows, cols]

    def token_losses(self, tb: TaskBatch, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Per-target cross-entropy (only target positions reach the vocabulary) and its rows."""
        rows, pos, targets = self._token_targets(tb)
        h = self.embed(tb, frames)
        if not self.naive:  # the last token predicts nothing
            h = h[:, :int(tb.length.max()) - 1]
        h, start, _ = self.shared_hidden(tb, h, True, tb.label_start - 1)
        if self.naive:  # the reference: logits and cross-entropy at every position, non-targets ignored
            labels = torch.full(tb.ids.shape, -100, dtype=torch.long, device=h.device)
            labels[rows, pos] = targets
            logits = self.backbone.output(self.backbone.norm(h)).float()
            losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            return losses.view_as(labels)[rows, pos], rows
        # only target positions reach the vocabulary
        logits = self.backbone.output(self.backbone.norm(h[rows, pos - start])).float()
        return F.cross_entropy(logits, targets, reduction="none"), rows

    def qav_loss(self, tb: TaskBatch, frames: Tensor, projected: Tensor) -> Tensor:
        """Frame-slot classification: the hidden state before slot i should pick frame i."""
        v = self.cfg.max_feats
        h = self.embed(tb, frames)
        if not self.naive:  # nothing after the last slot's predecessor is read
            h = h[:, :int(tb.video_start.max()) + v - 1]
        h, start, _ = self.shared_hidden(tb, h, False, tb.video_start - 1)
        pos = tb.video_start[:, None] - 1 - start + torch.arange(v, device=h.device)  # (n, v)
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

        What the options of a question share runs once (:mod:`flipvqa.model.scoring`);
        ``naive`` runs every option as a full sequence instead (the reference's way; same numbers).
        """
        tb = batch.tasks["vqa"]
        n_q = batch.video.shape[0]
        n_opt = tb.ids.shape[0] // n_q
        frames = self.video_inputs(batch.video)[1]
        split = None if self.naive else scoring.shared_prefix(self, tb, n_q, n_opt)
        if not self.agree(split is not None):
            split = None
        if split is None:
            losses, rows = self.token_losses(tb, frames.repeat_interleave(n_opt, dim=0))
            return scoring.mean_per_row(losses, rows, tb.ids.shape[0]).view(n_q, n_opt)
        prefix, prefix_h, start, past = scoring.run_prefix(self, tb, frames, split, n_q, n_opt)
        tokens, suffix_h = scoring.run_suffixes(self, tb, prefix, past, split, n_q, n_opt)
        return scoring.option_scores(self, tb, prefix_h, start, tokens, suffix_h, split, n_q, n_opt)


def _masked_layer(layer, h, rope, mask_for, bias, prompt, gate, past, out_from):
    mask = None if bias is None else mask_for(bias)
    return layer(h, rope, mask, prompt, gate, past, out_from)
