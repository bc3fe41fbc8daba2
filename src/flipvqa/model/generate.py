"""Answers in words: generation from the VQA prompt of open-ended questions, with a key/value cache.

The prompt (``... Answer: The answer is``, docs/faithfulness.md "Open-ended questions") runs once,
its instruction part shared across rows and batches as in scoring; then each step runs one new
token per row against the cached keys/values of every layer (the adaption prompt's included,
computed once per call). Rows of different prompt lengths share a batch right-padded: each row
keeps its own positions (rotary, the video bias), its padding is masked out, and it stops at its
own stop token. ``cache=False`` recomputes the whole sequence at every step instead: the
definition, for tests and benchmarks; the tokens are the same.

The next token is the arg-max of the logits (the first index on a tie), or with ``temperature
> 0`` a sample from the softmax at that temperature, restricted to the smallest set of tokens
whose probability reaches ``top_p``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import torch
from torch import Tensor

from .inputs import TaskBatch
from .llama import rope_cos_sin

if TYPE_CHECKING:  # generation uses the model; the model never imports generation
    from .flipped import FlippedVQA


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen and when a row stops."""

    max_new_tokens: int = 32
    stop_ids: tuple[int, ...] = ()  # a row ends after any of these (not part of its answer)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Generated:
    """Per row: the answer's token ids (without the stop token), each one's probability (the
    softmax of the logits at temperature 1), and whether a stop token ended it (False: cut by
    ``max_new_tokens``)."""

    tokens: list[list[int]]
    probs: list[list[float]]
    stopped: list[bool] = field(default_factory=list)


# on_token(row, token id, probability): called as each answer token is chosen (not the stop token)
OnToken = Callable[[int, int, float], None]


@torch.no_grad()
def generate(model: "FlippedVQA", video: Tensor, prompts: TaskBatch, sampling: Sampling, cache: bool = True,
             on_token: Optional[OnToken] = None, cancelled: Optional[Callable[[], Iterable[int]]] = None
             ) -> Generated:
    """Generate an answer for each of ``prompts`` (one per question of ``video``, (n, max_feats,
    width)); ``prompts.length`` is each row's prompt length, ``label_start`` equal to it.
    ``cancelled()``, asked before each step, names rows to end now (a client that went away):
    they leave the batch, with what they have so far."""
    n = prompts.ids.shape[0]
    frames = model.video_inputs(video)[1]
    generator = _generator(sampling, video.device)
    out = Generated([[] for _ in range(n)], [[] for _ in range(n)], [False] * n)
    done = torch.zeros(n, dtype=torch.bool)
    step = _cached_steps(model, frames, prompts) if cache else _recomputed_steps(model, frames, prompts)
    logits = next(step)  # (n, vocab) after each row's prompt
    for t in range(sampling.max_new_tokens):
        token = _pick(logits, sampling, generator)
        probs = torch.softmax(logits.float(), dim=-1).gather(1, token[:, None])[:, 0]
        for row, (tok, p) in enumerate(zip(token.tolist(), probs.tolist())):
            if done[row]:
                continue
            if tok in sampling.stop_ids:
                done[row], out.stopped[row] = True, True
                continue
            out.tokens[row].append(tok)
            out.probs[row].append(p)
            if on_token is not None:
                on_token(row, tok, p)
        for row in cancelled() if cancelled is not None else ():
            done[row] = True
        # Every process of a sharded model runs every step until all are done (model.agree).
        if model.agree(bool(done.all()) or t + 1 == sampling.max_new_tokens):
            break
        logits = step.send((token, done))
    step.close()
    return out


def _generator(sampling: Sampling, device: torch.device) -> Optional[torch.Generator]:
    if sampling.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed)
    return generator


def _pick(logits: Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> Tensor:
    """The next token of each row: arg-max, or a top-p sample at the temperature."""
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _logits(model: "FlippedVQA", h: Tensor) -> Tensor:
    return model.backbone.output(model.backbone.norm(h)).float()


def _cached_steps(model: "FlippedVQA", frames: Tensor, prompts: TaskBatch):
    """Yields the next-token logits (n, vocab); is sent (tokens chosen, rows done) per step.
    Finished rows leave the cache (their logits are then zeros, and unread)."""
    device = prompts.ids.device
    n, width = prompts.ids.shape
    last = prompts.length - 1
    h, start, kvs = model.shared_hidden(prompts, model.embed(prompts, frames), True, last, keep_kv=True)
    logits = _logits(model, h[torch.arange(n, device=device), last - start])
    adapter = model.adapter_kv()
    # Per cached row: its row in the batch, the absolute position of each key (the padded prompt's,
    # then one per generated token) and whether that key is real (a shorter prompt's pads are not).
    active = torch.arange(n, device=device)
    k_pos = torch.arange(width, device=device).expand(n, width)
    k_real = k_pos < prompts.length[:, None]
    video_start, pos = prompts.video_start, prompts.length.clone()
    while True:
        token, done = yield logits
        keep = ~done.to(device)[active]
        if not bool(keep.all()):
            keep[0] |= not bool(keep.any())  # a sharded model's process steps on while others run
            idx = keep.nonzero()[:, 0]
            kvs = [None if kv is None else (kv[0][idx], kv[1][idx]) for kv in kvs]
            active, k_pos, k_real, video_start, pos = (t[idx] for t in (active, k_pos, k_real, video_start, pos))
        k_pos = torch.cat([k_pos, pos[:, None]], dim=1)
        k_real = torch.cat([k_real, torch.ones_like(k_real[:, :1])], dim=1)
        mask_for = model.attention_mask(video_start, pos[:, None], k_pos, k_real[:, None, :])
        x = model.backbone.tok_embeddings(token[active][:, None])
        h, kvs = model.run_layers(x, rope_cos_sin(model.backbone.inv_freq, pos[:, None]), mask_for, past=kvs,
                                  keep_kv=True, prompts=adapter)
        logits = torch.zeros(n, logits.shape[1], device=device)
        logits[active] = _logits(model, h[:, 0])
        pos = pos + 1


def _recomputed_steps(model: "FlippedVQA", frames: Tensor, prompts: TaskBatch):
    """The definition: every step runs each row's whole sequence (prompt and the tokens so far)."""
    device = prompts.ids.device
    n = prompts.ids.shape[0]
    seqs = [prompts.ids[r, :int(prompts.length[r])].tolist() for r in range(n)]
    while True:
        lengths = torch.tensor([len(s) for s in seqs], device=device)
        ids = torch.zeros(n, int(lengths.max()), dtype=torch.long, device=device)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s, device=device)
        tb = TaskBatch(ids, lengths, lengths, prompts.video_start)
        h = model.hidden(tb, model.embed(tb, frames), video_bias=True)
        token, _ = yield _logits(model, h[torch.arange(n, device=device), lengths - 1])
        for r, tok in enumerate(token.tolist()):
            seqs[r].append(tok)


def answer_texts(generated: Generated, decode: Callable[[list[int]], str]) -> list[str]:
    """Each row's answer: its tokens decoded, white space stripped at both ends."""
    return [decode(tokens).strip() for tokens in generated.tokens]
