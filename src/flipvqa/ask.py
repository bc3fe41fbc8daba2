"""``flipvqa ask``: a video file and a multiple-choice question in, the ranked choices out.

The video goes through the same CLIP feature extraction as the released data
(:mod:`flipvqa.features`), then through the same prompts, model and option scoring as evaluation.
Probabilities are the softmax of the negative mean cross-entropies of the choices.

Python API::

    from flipvqa.ask import Answerer
    answerer = Answerer("checkpoint_best.pth", llama_model_path="pretrained/llama/", model="7B",
                        clip_model="path/to/clip-vit-large-patch14")
    answer = answerer.ask("video.mp4", "Why did the boy run?", ["to catch a bus", "..."])
    answer.choice, answer.ranked  # [(choice, probability, score), ...] best first

    # several questions (about the same or different videos) scored in one batch, same numbers:
    answers = answerer.ask_many([Question(features, "Why?", ["a", "b"]), (video2, "How?", ["c", "d", "e"])])
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .checkpoints import build_model, load_checkpoint, load_trainable, run_tokenizer
from .checkpoints.trainable import expected_feature_dim, stored_args
from .config import MODEL_OPTIONS, resolve, with_stored_options
from .data.dataset import Item, collate
from .data.records import Record, frames_to_slots
from .data.subtitles import tvqa_dialogue
from .devices import autocast, init_distributed
from .errors import FlipVQAError
from .model.flipped import FlippedVQA
from .model.inputs import FEATURE_DIM, Batch
from .model.generate import Sampling, generate
from .prompts import LETTERS, encode_sample, normalize_question, open_prompt_text, prompt_text

log = logging.getLogger(__name__)

# What the Answerer takes besides the checkpoint: the model options (from the checkpoint's
# stored args unless given) and the backbone's dtype.
OPTIONS = (*MODEL_OPTIONS, "dtype")


class Question(NamedTuple):
    """One question of :meth:`Answerer.ask_many` (a plain tuple in this order works as well);
    with no ``choices``, a question for :meth:`Answerer.generate_many`."""

    video: str | Path | Tensor  # a video file or its features [frames, width]
    question: str
    choices: Sequence[str] = ()
    subtitles: Optional[str | Path] = None  # an .srt file


@dataclass
class Answer:
    choice: str
    index: int
    ranked: list[tuple[str, float, float]]  # (choice, probability, mean cross-entropy), best first
    frame_attention: list[float] = field(default_factory=list)  # per video slot, sums to <= 1
    n_frames: int = 0
    scores: list[float] = field(default_factory=list)  # mean cross-entropy per choice, in the given order

    def to_dict(self) -> dict:
        return {"choice": self.choice, "index": self.index, "n_frames": self.n_frames,
                "ranked": [{"choice": c, "probability": p, "score": s} for c, p, s in self.ranked],
                "frame_attention": self.frame_attention}


@dataclass
class WordsAnswer:
    """An answer in words: its text, its tokens (each token's text as it extends the answer) and
    each one's probability; ``cut`` when --max_new_tokens ended it before the end token."""

    answer: str
    tokens: list[str]
    probabilities: list[float]
    cut: bool = False
    n_frames: int = 0
    timings: dict = field(default_factory=dict)  # seconds: "first_token", "generate"

    def to_dict(self) -> dict:
        return {"answer": self.answer, "tokens": [{"token": t, "probability": p}
                                                  for t, p in zip(self.tokens, self.probabilities)],
                "cut": self.cut, "n_frames": self.n_frames, "timings": self.timings}


class Answerer:
    """A trained Flipped-VQA model ready to answer questions about videos."""

    def __init__(self, checkpoint: str | Path, clip_model: Optional[str] = None, fps: float = 1,
                 device: Optional[str] = None, **options):
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"Answerer: unknown options {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
        ckpt = load_checkpoint(checkpoint)
        given = argparse.Namespace(**{k: v for k, v in options.items() if v is not None}, device=device)
        self.args = resolve(with_stored_options(given, stored_args(ckpt)))
        self.dist, self.device = init_distributed(self.args.device)
        self.tokenizer = run_tokenizer(self.args)
        self.feature_dim, self._feature_source = expected_feature_dim(ckpt, checkpoint) or \
            (FEATURE_DIM, "the model's visual_proj")
        self.model = build_model(self.args, self.device, self.tokenizer, self.feature_dim)
        load_trainable(self.model, checkpoint, ckpt)
        self.model.eval()
        self.clip_model, self.fps, self._clip = clip_model, fps, None

    def video_features(self, video: str | Path) -> tuple[Tensor, list]:
        """Frame features [frames, width] of a video file, and its sampled frames (uint8), with the
        ``--clip_model`` encoder (CLIP, or any tower ``extract-features`` reads, such as SigLIP)."""
        from .features.video import iter_frames

        frames = list(iter_frames(video, self.fps, crop=self.encoder.crop))
        if not frames:
            raise FlipVQAError(f"{video}: no frames could be decoded")
        return self.embed_frames(np.stack(frames)), frames

    @property
    def encoder(self):
        """The frame encoder of ``--clip_model``, loaded on first use."""
        from .features.clip import load_encoder

        self._need_clip()
        if self._clip is None:
            self._clip = load_encoder(self.clip_model, self.device)
        return self._clip

    def embed_frames(self, frames: np.ndarray) -> Tensor:
        """Features [frames, width] (float32) of uint8 frames [n, H, W, 3] as ``iter_frames``
        gives them for this encoder (CLIP: 224x224 crops)."""
        encoder = self.encoder
        return encoder.embed(encoder.prepare(frames), self.device).float()

    def _need_clip(self) -> None:
        if self.clip_model is None:
            raise FlipVQAError("a CLIP model is needed to read a video: pass --clip_model (a local folder of "
                               "openai/clip-vit-large-patch14, or the encoder the features were made with) "
                               "or precomputed --features")

    def check_features(self, features: Tensor) -> None:
        """Raise :class:`FlipVQAError` unless ``features`` are [frames, width] this model takes."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise FlipVQAError(f"video features must be [frames, {self.feature_dim}] ({self._feature_source} "
                               f"takes {self.feature_dim}-d features), got {tuple(features.shape)}")

    def ask(self, video: str | Path | Tensor, question: str, choices: Sequence[str],
            subtitles: Optional[str | Path] = None, explain: bool = False) -> Answer:
        """Rank ``choices``; ``video`` is a file or a feature tensor [frames, width]."""
        return self.ask_many([Question(video, question, choices, subtitles)], explain=explain)[0]

    def ask_many(self, requests: Sequence[Question | tuple], explain: bool = False) -> list[Answer]:
        """Answer several questions (``(video, question, choices[, subtitles])`` each) in one batch:
        one ``collate`` and one ``score_options`` call, and with ``explain`` one more forward for
        every answer's frame attention. Questions may have different numbers of choices; each
        answer is the one :meth:`ask` gives for it alone (to float rounding)."""
        if not requests:
            return []
        items, n_frames = [], []
        for request in requests:
            item = self._item(Question(*request))
            items.append(item)
            n_frames.append(int(item.record.frames.shape[0]))
        batch = collate(items).to(self.device)
        with autocast(self.device, self.model.backbone.tok_embeddings.weight.dtype):
            scores = self.model.score_options(batch).float().cpu()
        answers = []
        for item, row, frames in zip(items, scores, n_frames):
            choices = item.record.options
            row = row[:len(choices)]  # a question with fewer choices than the batch's most
            probs = torch.softmax(-row, dim=0)
            order = probs.argsort(descending=True).tolist()
            answers.append(Answer(choices[order[0]], order[0],
                                  [(choices[i], probs[i].item(), row[i].item()) for i in order], n_frames=frames,
                                  scores=row.tolist()))
        if explain:
            for answer, weights in zip(answers, frame_attentions(self.model, batch, [a.index for a in answers])):
                answer.frame_attention = weights
        return answers

    def generate(self, video: str | Path | Tensor, question: str, subtitles: Optional[str | Path] = None,
                 **sampling) -> WordsAnswer:
        """Answer ``question`` in words (greedy unless ``temperature`` > 0; see :meth:`generate_many`)."""
        return self.generate_many([Question(video, question, (), subtitles)], **sampling)[0]

    @torch.no_grad()
    def generate_many(self, requests: Sequence[Question | tuple], max_new_tokens: int = 32,
                      temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                      on_token: Optional[Callable[[int, str, float], None]] = None,
                      cancelled: Optional[Callable[[], Iterable[int]]] = None) -> list[WordsAnswer]:
        """Answer several questions in words in one batch, each as it would be alone.
        ``on_token(request, text, probability)`` is called as each token is generated (streaming);
        ``cancelled()`` names requests to end now (see :func:`flipvqa.model.generate.generate`)."""
        check_sampling(max_new_tokens, temperature, top_p)
        if not requests:
            return []
        items = [self._item(Question(*request), open_ended=True) for request in requests]
        batch = collate(items).to(self.device).part("prompt")
        sampling = Sampling(max_new_tokens, tuple(dict.fromkeys(self.tokenizer.stop_ids)), temperature, top_p, seed)
        texts = [TokenTexts(self.tokenizer.decode) for _ in items]
        started, first = time.perf_counter(), []

        def token(row: int, tok: int, prob: float) -> None:
            if not first:
                first.append(time.perf_counter() - started)
            piece = texts[row].add(tok)
            if on_token is not None:
                on_token(row, piece, prob)

        with autocast(self.device, self.model.backbone.tok_embeddings.weight.dtype):
            out = generate(self.model, batch.video, batch.tasks["prompt"], sampling, on_token=token,
                           cancelled=cancelled)
        timings = {"first_token": round(first[0], 6) if first else None,
                   "generate": round(time.perf_counter() - started, 6)}
        return [WordsAnswer(t.decode(t.ids).strip(), t.pieces, probs, not stopped, int(item.record.frames.shape[0]),
                            dict(timings))
                for t, probs, stopped, item in zip(texts, out.probs, out.stopped, items)]

    def check(self, request: Question | tuple, open_ended: bool = False) -> None:
        """Raise :class:`FlipVQAError` (one line) unless ``request`` is a question this model can
        answer: its choices, features, subtitles and length, as :meth:`ask_many` checks them."""
        self._item(Question(*request), open_ended=open_ended)

    def _item(self, request: Question, open_ended: bool = False) -> Item:
        """One question's model input (choices, features and subtitles checked)."""
        video, question, choices, subtitles = request
        if not isinstance(question, str) or not question.strip():
            raise FlipVQAError("the question is empty")
        if open_ended:
            if choices:
                raise FlipVQAError("a question answered in words takes no choices")
        else:
            check_choices(choices)
        features = video if torch.is_tensor(video) else self.video_features(video)[0]
        self.check_features(features)
        dialogue = ""
        if subtitles is not None:
            dialogue = tvqa_dialogue(Path(subtitles), -1000, 1000)
            if dialogue is None:
                raise FlipVQAError(f"{subtitles}: subtitle file not found")
        sub = bool(dialogue) or self.args.sub
        record = Record(index=0, vid=str(video) if not torch.is_tensor(video) else "features",
                        question=normalize_question(question), options=list(choices),
                        answer=None if open_ended else 0, dialogue=dialogue, frames=features)
        text = open_prompt_text(record.question, dialogue) if open_ended else \
            prompt_text(record.question, record.options, dialogue)
        seqs = encode_sample(self.tokenizer, text, "" if open_ended else 0, len(choices), self.args.max_feats,
                             self.args.max_seq_len, sub, ("vqa",), all_options=True)
        task = "prompt" if open_ended else "vqa"
        if not all(s.fits(self.args.max_feats, task) for s in seqs[task]):  # no answer token or prompt left
            needs = max(s.full_length or len(s.ids) for s in seqs[task])
            what = "question takes" if open_ended else "question and choices take"
            # --max_seq_len only sizes the sequences (no weight depends on it), so a larger one is valid
            raise FlipVQAError(f"the {what} {needs} tokens, more than the model's --max_seq_len "
                               f"{self.args.max_seq_len}: shorten them" + ("" if open_ended else
                               " or give fewer choices") + f", or run with --max_seq_len {needs} (or more)")
        slots, video_len = frames_to_slots(features, self.args.max_feats)
        return Item(record, slots, video_len, seqs)


def check_choices(choices: Sequence[str]) -> None:
    """2 to 26 choices, each given once: two that are equal but for surrounding spaces and case are
    one answer, whose probability the model would split between them."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise FlipVQAError(f"--choices: give 2 to {len(LETTERS)} choices (got {len(choices)})")
    seen: dict[str, int] = {}
    for k, choice in enumerate(choices):
        if not str(choice).strip():
            raise FlipVQAError(f"--choices: choice {k + 1} is empty")
        first = seen.setdefault(str(choice).strip().casefold(), k)
        if first != k:
            raise FlipVQAError(f"--choices: choices {first + 1} and {k + 1} are the same answer "
                               f"({str(choice).strip()[:80]!r}; compared without surrounding spaces and case): "
                               "give each answer once")


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """The generation settings' bounds, as the command line checks them."""
    resolve(argparse.Namespace(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p))


class TokenTexts:
    """Each generated token's text: what it adds to the decoded answer (a token alone may decode
    differently, e.g. without its leading space). A token that ends inside a multi-byte character
    adds "" and the character comes with the token that completes it."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids, self.pieces, self.text = decode, [], [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # half a character so far: wait for the rest
            text = text.rstrip("\ufffd")
        piece = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text if text.startswith(self.text) else self.text
        self.pieces.append(piece)
        return piece


def frame_attention(model: FlippedVQA, batch: Batch, option: int) -> list[float]:
    """How much the chosen answer's tokens attend to each video slot in the last layer: the
    layer's own sequence softmax (``keep_probs``), averaged over heads and answer tokens
    (the batch's first question)."""
    return frame_attentions(model, batch, [option])[0]


@torch.no_grad()
def frame_attentions(model: FlippedVQA, batch: Batch, options: Sequence[int]) -> list[list[float]]:
    """:func:`frame_attention` of ``options[q]`` of each question ``q`` of the batch (the first
    ``len(options)`` questions), in one forward."""
    tb = batch.tasks["vqa"]
    n_opt = tb.ids.shape[0] // batch.video.shape[0]
    rows = torch.tensor([q * n_opt + option for q, option in enumerate(options)], device=tb.ids.device)
    chosen = tb.rows(rows)
    frames = model.video_inputs(batch.video[:len(options)])[1]
    attention = model.backbone.layers[-1].attention
    attention.keep_probs = True
    try:
        model.hidden(chosen, model.embed(chosen, frames), video_bias=True)
        probs = attention.probs  # (questions, heads, seq, seq)
    finally:
        attention.keep_probs, attention.probs = False, None
    out = []
    for q in range(len(options)):
        # the positions that predict the answer
        start, end = int(chosen.label_start[q]) - 1, int(chosen.length[q]) - 1
        vs = int(chosen.video_start[q])
        out.append(probs[q, :, start:end, vs:vs + model.cfg.max_feats].float().mean(dim=(0, 1)).cpu().tolist())
    return out
