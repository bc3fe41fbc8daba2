"""Option scoring without repeated work: what the options of a question share runs once.

The option sequences of a question are equal up to the answer letter (``... The answer is ▁(``
then ``A ) </s>``, ``B ) </s>``, ...), so the mean cross-entropy of each option's answer tokens
(:meth:`FlippedVQA.score_options`) is computed in three stages:

1. the common prefix, as one sequence per question (its instruction part cached across
   batches, :meth:`FlippedVQA.shared_hidden`): its keys/values, and the hidden states of the
   positions inside it that predict a target (``is`` predicts ``▁(``, ``▁(`` predicts the letter);
2. every option's remaining tokens except the last (which predicts nothing), the options of a
   question side by side in one row, attending to the prefix and causally to their own option;
3. the cross-entropies: a target predicted from inside the prefix uses the prefix's logits,
   computed once per question and position; the others the suffix's.

The numbers are those of scoring every option as a full sequence (the naive mode), up to float
rounding of the different batching; tests/test_model.py checks both against the reference.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .inputs import TaskBatch
from .llama import Transformer, rope_cos_sin


class ScoringModel(Protocol):
    """What scoring uses of :class:`flipvqa.model.flipped.FlippedVQA`, which imports this module
    (so this one imports nothing of it: the dependencies point one way)."""

    backbone: Transformer
    cfg: Any

    def embed(self, tb: TaskBatch, frames: Tensor) -> Tensor: ...
    def shared_hidden(self, tb: TaskBatch, h: Tensor, video_bias: bool, needed_from: Tensor,
                      keep_kv: bool = False) -> tuple[Tensor, int, list]: ...
    def attention_mask(self, video_start: Tensor, q_pos: Tensor, k_pos: Tensor, allowed: Tensor) -> Callable: ...
    def run_layers(self, h: Tensor, rope, mask_for, past: Optional[list] = None, keep_kv: bool = False,
                   out_from: int = 0, prompts: Optional[list] = None): ...


def shared_prefix(model: ScoringModel, tb: TaskBatch, n_q: int, n_opt: int) -> Optional[Tensor]:
    """Per question, how many leading tokens all its options have in common (the first token
    where they differ is a target, predicted from inside the prefix); None if the video is not
    inside every prefix (the options are then scored as whole sequences)."""
    ids = tb.ids.view(n_q, n_opt, -1)
    same = (ids == ids[:, :1]).all(dim=1).long()  # (n_q, seq)
    common = same.cumprod(dim=1).sum(dim=1)
    lengths = tb.length.view(n_q, n_opt)
    split = torch.minimum(common, lengths.min(dim=1).values - 1)
    video_end = tb.video_start.view(n_q, n_opt).max(dim=1).values + model.cfg.max_feats
    first_target = tb.label_start.view(n_q, n_opt).min(dim=1).values
    if bool((split < video_end).any()) or bool((first_target < 1).any()):
        return None
    return split


def run_prefix(model: ScoringModel, tb: TaskBatch, frames: Tensor, split: Tensor, n_q: int, n_opt: int
               ) -> tuple[TaskBatch, Tensor, int, list]:
    """Stage 1: each question's first ``split`` tokens (its first option's, right-padded to the
    longest). Returns them, the hidden states from position ``start`` on, ``start`` and every
    layer's keys/values."""
    p_len = int(split.max())
    first = tb.rows(torch.arange(n_q, device=split.device) * n_opt)  # option 0 of each question
    prefix = TaskBatch(first.ids[:, :p_len], first.label_start, split, first.video_start)
    needed_from = tb.label_start.view(n_q, n_opt).min(dim=1).values - 1  # the first target's predictor
    h, start, past = model.shared_hidden(prefix, model.embed(prefix, frames), True, needed_from, keep_kv=True)
    return prefix, h, start, past


def run_suffixes(model: ScoringModel, tb: TaskBatch, prefix: TaskBatch, past: list, split: Tensor, n_q: int,
                 n_opt: int) -> tuple[Tensor, Tensor]:
    """Stage 2: every option's tokens from ``split`` to its second-to-last, the options of a
    question side by side in one row, attending to the prefix's keys (up to its own split) and
    causally to their own option's earlier tokens. Returns the option tokens from ``split`` on
    (n_q, n_opt, s_len + 1: the inputs and the token after the last) and the hidden states
    (n_q, n_opt, s_len, dim)."""
    device = tb.ids.device
    ids = tb.ids.view(n_q, n_opt, -1)
    s_len = max(int((tb.length.view(n_q, n_opt) - 1 - split[:, None]).max()), 1)
    t = torch.arange(s_len + 1, device=device)
    src = (split[:, None, None] + t).clamp(max=ids.shape[2] - 1)  # (n_q, 1, s_len + 1)
    tokens = ids.gather(2, src.expand(n_q, n_opt, s_len + 1))
    t = t[:s_len]
    q_pos = (split[:, None] + t).repeat(1, n_opt)  # (n_q, n_opt * s_len): absolute positions
    p_len = prefix.ids.shape[1]
    k_pos = torch.cat([torch.arange(p_len, device=device).expand(n_q, p_len), q_pos], dim=1)
    q_opt = torch.arange(n_opt, device=device).repeat_interleave(s_len)  # which option a query is
    same_option_causal = (q_opt[:, None] == q_opt[None, :]) & (t.repeat(n_opt)[None, :] <= t.repeat(n_opt)[:, None])
    prefix_valid = torch.arange(p_len, device=device)[None, :] < split[:, None]  # (n_q, p_len)
    allowed = torch.cat([prefix_valid[:, None, :].expand(n_q, q_pos.shape[1], p_len),
                         same_option_causal[None].expand(n_q, -1, -1)], dim=2)
    mask_for = model.attention_mask(prefix.video_start, q_pos, k_pos, allowed)
    h = model.backbone.tok_embeddings(tokens[..., :s_len].reshape(n_q, -1))
    h, _ = model.run_layers(h, rope_cos_sin(model.backbone.inv_freq, q_pos), mask_for, past=past)
    return tokens, h.view(n_q, n_opt, s_len, -1)


def option_scores(model: ScoringModel, tb: TaskBatch, prefix_h: Tensor, start: int, tokens: Tensor,
                  suffix_h: Tensor, split: Tensor, n_q: int, n_opt: int) -> Tensor:
    """Stage 3: option k's targets are its tokens from its label start on, each predicted by the
    position before it; its score is their mean cross-entropy (n_q, n_opt)."""
    device = tokens.device
    ids = tb.ids.view(n_q, n_opt, -1)
    lengths, label_start = tb.length.view(n_q, n_opt), tb.label_start.view(n_q, n_opt)
    # Targets predicted from inside the prefix: one log-softmax per (question, position).
    pos = start + torch.arange(prefix_h.shape[1], device=device)  # absolute positions of prefix_h
    in_prefix = (pos >= label_start[..., None] - 1) & (pos < split[:, None, None])  # (n_q, n_opt, T)
    needed = in_prefix.any(dim=1)  # (n_q, T)
    qs, ts = needed.nonzero(as_tuple=True)
    row_of = torch.full(needed.shape, -1, dtype=torch.long, device=device)
    row_of[qs, ts] = torch.arange(qs.shape[0], device=device)
    qi, oi, ti = in_prefix.nonzero(as_tuple=True)
    # Targets predicted from the suffixes.
    pos_s = split[:, None, None] + torch.arange(suffix_h.shape[2], device=device)
    in_suffix = (pos_s >= label_start[..., None] - 1) & (pos_s < lengths[..., None] - 1)
    qj, oj, tj = in_suffix.nonzero(as_tuple=True)
    # One vocabulary projection for both: with few rows it costs about one read of the output
    # weight, so two calls would cost two.
    hidden = torch.cat([prefix_h[qs, ts], suffix_h[qj, oj, tj]])
    log_probs = F.log_softmax(model.backbone.output(model.backbone.norm(hidden)).float(), dim=-1)
    prefix_losses = -log_probs[row_of[qi, ti], ids[qi, oi, pos[ti] + 1]]
    suffix_rows = qs.shape[0] + torch.arange(qj.shape[0], device=device)
    suffix_losses = -log_probs[suffix_rows, tokens[qj, oj, tj + 1]]
    losses = torch.cat([prefix_losses, suffix_losses])
    rows = torch.cat([qi * n_opt + oi, qj * n_opt + oj])
    return mean_per_row(losses, rows, n_q * n_opt).view(n_q, n_opt)


def mean_per_row(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    total = torch.zeros(n_rows, device=values.device).index_add_(0, rows, values)
    count = torch.zeros(n_rows, device=values.device).index_add_(0, rows, torch.ones_like(values))
    return total / count
