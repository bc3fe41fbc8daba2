#!/usr/bin/env python
"""Build the tiny backbone that ``flipvqa demo`` ships: a SentencePiece tokenizer and a small
LLaMA, in Meta's layout, under ``src/flipvqa/assets/demo/``::

    tokenizer.model
    demo-llama/params.json            {"dim", "n_layers", "n_heads", "multiple_of", "norm_eps", "vocab_size": -1}
    demo-llama/consolidated.00.pth    float16 state dict, Meta's parameter names

What the language model reads is the demo world *in words*: the exact Flipped-VQA prompts
(:mod:`flipvqa.prompts`, all three tasks) of questions from the synthetic generator's **train**
splits (seeds ``CORPUS_SEEDS``, never a validation split, never the demo's own seeds), every
question twice, with its choices (answered by a letter) and open-ended (answered in words, "...
Answer: The answer is to eat"), with each video slot filled by the word of what its frame shows
("Video: cooking cooking eating eating reading ..."). That is the role of web text for LLaMA: the
backbone learns how the activities are told and asked about, and how to answer from a told video,
but it never sees a frame feature.
Flipped-VQA then has to learn to *see*: to map the frame features into the frozen backbone's
input space through ``visual_proj``, the temporal embedding, the adapters and the gates.

Training is language modelling of the whole sequences, with the loss of each task's own targets
(the answer, a letter or words; the question; the narrated video) weighted up as in instruction tuning, and
VQA sequences twice as often as the others; it reports at the end how well the backbone answers
held-out questions about *told* videos, by choice and in words (greedy; exact match): about 0.83
and 0.89; counting is the weak spot.

Deterministic for ``--seed`` (same machine, same torch and sentencepiece versions):
``python scripts/build_demo_backbone.py`` rebuilds the shipped files (about 8 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flipvqa.demo.synthetic import COUNTS, EVENTS, MAX_FEATS, DemoSpec, Question, generate, narration
from flipvqa.model.llama import ModelArgs, Transformer
from flipvqa.openended import exact_match
from flipvqa.prompts import (INSTRUCTIONS, LETTERS, TASKS, PromptText, build, generation_prompt,
                             normalize_question, open_prompt_text, prompt_text)
from flipvqa.tokenizer import SentencePieceTokenizer

log = logging.getLogger("build_demo_backbone")

ASSETS = Path(__file__).resolve().parents[1] / "src" / "flipvqa" / "assets" / "demo"
CORPUS_SEEDS = range(1000, 1020)  # train splits of these seeds (the demo's data: --seed, default 0)
MAX_SEQ_LEN = 128


def corpus(seeds) -> list[tuple[Question, list[str]]]:
    """(question, narration of its video) for every train question of ``seeds``."""
    items = []
    for seed in seeds:
        split = generate(seed, DemoSpec(val_videos=0))["train"]
        told = {v.vid: narration(v, MAX_FEATS) for v in split.videos}
        items.extend((q, told[q.vid]) for q in split.questions)
    return items


def train_tokenizer(items: list[tuple[Question, list[str]]], out: Path, vocab_size: int) -> SentencePieceTokenizer:
    """BPE like LLaMA's: byte fallback (so "\\n" is the <0x0A> piece), unk 0, bos 1, eos 2, no pad,
    no normalisation; trained on the lines of the corpus's prompts."""
    import sentencepiece as spm

    lines = {line for inst in INSTRUCTIONS.values() for line in inst.splitlines()}
    for q, words in items:
        text = prompt_text(normalize_question(q.question), list(q.options))
        lines.update(f"{text.question}{text.choices}{text.answer}{LETTERS[q.answer]}".splitlines())
        lines.add(f"{text.answer}{q.answers[0]}")
        lines.add("Video: " + " ".join(words))
    model = io.BytesIO()  # trained from memory: no temporary paths end up in the model file
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sorted(lines)), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    tok = SentencePieceTokenizer(out)
    assert tok.sp.id_to_piece(tok.newline_id) == "<0x0A>", "'\\n' must be the <0x0A> byte piece"
    return tok


def word_ids(tok: SentencePieceTokenizer) -> dict[str, int]:
    """The narration words (one token each: the video slots are one token per frame). Options must
    be equally long within a question, so the other option words are checked too."""
    for word in [e.do for e in EVENTS] + list(COUNTS):
        assert len(tok.encode(word)) == 1, f"{word!r} is not one token; raise --vocab_size"
    ids = {}
    for event in EVENTS:
        pieces = tok.encode(event.doing)
        assert len(pieces) == 1, f"{event.doing!r} is {len(pieces)} tokens; raise --vocab_size"
        ids[event.doing] = pieces[0]
    return ids


def question_text(q: Question, open_ended: bool) -> PromptText:
    question = normalize_question(q.question)
    return open_prompt_text(question) if open_ended else prompt_text(question, list(q.options))


def narrated(tok: SentencePieceTokenizer, task: str, q: Question, letter: int | None, words: list[str],
             ids: dict[str, int]) -> tuple[list[int], int]:
    """The Flipped-VQA sequence of ``task`` (built by :func:`flipvqa.prompts.build` itself), with
    the narration in its video slots; also returns the first answer/question target position.
    ``letter`` None: the question open-ended, answered by its first acceptable answer."""
    text = question_text(q, letter is None)
    seq = build(tok, task, text, q.answers[0] if letter is None else letter, MAX_FEATS, MAX_SEQ_LEN, sub=False)
    out = list(seq.ids)
    out[seq.video_start:seq.video_start + MAX_FEATS] = [ids[w] for w in words]
    return out, seq.label_start


def pretrain(seqs: list[tuple[list[int], int]], args: ModelArgs, steps: int, batch_size: int, lr: float,
             seed: int, target_weight: float) -> Transformer:
    """Next-token cross-entropy of every token, weighted ``1 + target_weight`` from each
    sequence's target start on; AdamW, linear warm-up, then cosine down to 10%."""
    torch.manual_seed(seed)
    model = Transformer(args)
    for name, p in model.named_parameters():  # GPT-2 style init; embeddings N(0, 1) like nn.Embedding
        if p.ndim == 2 and name != "tok_embeddings.weight":
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    order = random.Random(seed)
    pool: list[int] = []
    t0 = time.time()
    for step in range(steps):
        warm = min(1.0, (step + 1) / (steps * 0.05))
        for g in opt.param_groups:
            g["lr"] = lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        if len(pool) < batch_size:
            pool = list(range(len(seqs)))
            order.shuffle(pool)
        chosen = [seqs[pool.pop()] for _ in range(batch_size)]
        width = max(len(s) for s, _ in chosen)
        ids = torch.zeros(batch_size, width, dtype=torch.long)
        targets = torch.full((batch_size, width), -100, dtype=torch.long)
        weights = torch.zeros(batch_size, width)
        for row, (s, start) in enumerate(chosen):
            ids[row, :len(s)] = torch.tensor(s)
            targets[row, :len(s) - 1] = torch.tensor(s[1:])
            weights[row, :len(s) - 1] = 1.0
            weights[row, start - 1:len(s) - 1] += target_weight
        losses = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        loss = (losses * weights.flatten()).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d/%d: loss %.4f [%.0fs]", step, steps, loss.item(), time.time() - t0)
    return model.eval()


@torch.no_grad()
def told_accuracy(model: Transformer, tok: SentencePieceTokenizer, items, ids: dict[str, int]) -> dict[str, float]:
    """Accuracy per question type when the video is *told* (narration in the slots), scored as
    Flipped-VQA scores options: the mean cross-entropy of each letter's answer tokens."""
    hits: dict[str, list[bool]] = {}
    for q, words in items:
        seqs = [narrated(tok, "vqa", q, k, words, ids) for k in range(len(q.options))]
        width = max(len(s) for s, _ in seqs)
        batch = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, (s, _) in enumerate(seqs):
            batch[row, :len(s)] = torch.tensor(s)
        logp = model(batch).log_softmax(-1)
        scores = [-logp[row, start - 1:len(s) - 1].gather(-1, batch[row, start:len(s), None]).mean()
                  for row, (s, start) in enumerate(seqs)]
        hits.setdefault(q.qtype, []).append(int(torch.stack(scores).argmin()) == q.answer)
    return _means(hits)


@torch.no_grad()
def told_exact_match(model: Transformer, tok: SentencePieceTokenizer, items, ids: dict[str, int],
                     max_new_tokens: int = 8) -> dict[str, float]:
    """Exact match per question type of the open-ended answers, generated greedily after
    ``Answer: The answer is`` with the video told, as ``flipvqa`` generates them."""
    hits: dict[str, list[bool]] = {}
    for q, words in items:
        seq = generation_prompt(tok, question_text(q, True), MAX_FEATS, MAX_SEQ_LEN, sub=False)
        prompt = list(seq.ids)
        prompt[seq.video_start:seq.video_start + MAX_FEATS] = [ids[w] for w in words]
        answer: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([prompt + answer]))[0, -1].argmax())
            if nxt in tok.stop_ids:
                break
            answer.append(nxt)
        hits.setdefault(q.qtype, []).append(exact_match(tok.decode(answer).strip(), q.answers))
    return _means(hits)


def _means(hits: dict[str, list[bool]]) -> dict[str, float]:
    out = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    out["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target_weight", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--corpus_seeds", type=int, default=len(CORPUS_SEEDS))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)

    items = corpus(range(CORPUS_SEEDS.start, CORPUS_SEEDS.start + a.corpus_seeds))
    tok = train_tokenizer(items, a.out / "tokenizer.model", a.vocab_size)
    ids = word_ids(tok)
    # VQA twice: answering is what the backbone is for, and the hardest of the three to learn. Every
    # question with its choices and open-ended.
    seqs = [narrated(tok, task, q, letter, words, ids) for q, words in items for letter in (q.answer, None)
            for task in ("vqa", *TASKS)]
    log.info("%d questions, %d sequences (%.1f tokens on average), vocabulary %d", len(items), len(seqs),
             sum(len(s) for s, _ in seqs) / len(seqs), tok.n_words)

    args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, vocab_size=tok.n_words, multiple_of=32)
    model = pretrain(seqs, args, a.steps, a.batch_size, a.lr, a.seed, a.target_weight)
    held_out = corpus([CORPUS_SEEDS.start - 1])[:600]  # another seed's train split: a sanity check only
    log.info("accuracy with the video told in words: %s",
             json.dumps({k: round(v, 3) for k, v in told_accuracy(model, tok, held_out, ids).items()}))
    log.info("exact match in words with the video told: %s",
             json.dumps({k: round(v, 3) for k, v in told_exact_match(model, tok, held_out, ids).items()}))

    folder = a.out / "demo-llama"
    folder.mkdir(parents=True, exist_ok=True)
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "multiple_of": 32,
              "norm_eps": args.norm_eps, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    torch.save({k: v.to(torch.float16) for k, v in model.state_dict().items()}, folder / "consolidated.00.pth")
    log.info("wrote %s and %s", a.out / "tokenizer.model", folder)


if __name__ == "__main__":
    main()
