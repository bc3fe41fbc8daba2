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
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .checkpoints import build_model, load_checkpoint, load_trainable, run_tokenizer
from .checkpoints.trainable import expected_feature_dim, stored_args
from .config import MODEL_OPTIONS, add_run_arguments, resolve, with_stored_options
from .data.dataset import Item, collate
from .data.records import Record, frames_to_slots, slot_sources
from .data.subtitles import tvqa_dialogue
from .devices import autocast, init_distributed
from .errors import FlipVQAError
from .model.flipped import FlippedVQA
from .model.inputs import FEATURE_DIM, Batch
from .prompts import LETTERS, encode_sample, normalize_question, prompt_text

log = logging.getLogger(__name__)

# What the Answerer takes besides the checkpoint: the model options (from the checkpoint's
# stored args unless given) and the backbone's dtype.
OPTIONS = (*MODEL_OPTIONS, "dtype")


@dataclass
class Answer:
    choice: str
    index: int
    ranked: list[tuple[str, float, float]]  # (choice, probability, mean cross-entropy), best first
    frame_attention: list[float] = field(default_factory=list)  # per video slot, sums to <= 1
    n_frames: int = 0

    def to_dict(self) -> dict:
        return {"choice": self.choice, "index": self.index, "n_frames": self.n_frames,
                "ranked": [{"choice": c, "probability": p, "score": s} for c, p, s in self.ranked],
                "frame_attention": self.frame_attention}


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
        """CLIP features [frames, width] of a video file, and its sampled frames (uint8)."""
        from .features.clip import embed, load_clip
        from .features.video import sample_frames

        if self.clip_model is None:
            raise FlipVQAError("a CLIP model is needed to read a video: pass --clip_model (a local folder of "
                               "openai/clip-vit-large-patch14) or precomputed --features")
        frames = sample_frames(video, self.fps)
        if len(frames) == 0:
            raise FlipVQAError(f"{video}: no frames could be decoded")
        if self._clip is None:
            self._clip = load_clip(self.clip_model, self.device)
        return embed(self._clip, frames, self.device).float(), list(frames)

    def ask(self, video: str | Path | Tensor, question: str, choices: Sequence[str],
            subtitles: Optional[str | Path] = None, explain: bool = False) -> Answer:
        """Rank ``choices``; ``video`` is a file or a feature tensor [frames, width]."""
        check_choices(choices)
        features = video if torch.is_tensor(video) else self.video_features(video)[0]
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise FlipVQAError(f"video features must be [frames, {self.feature_dim}] ({self._feature_source} "
                               f"takes {self.feature_dim}-d features), got {tuple(features.shape)}")
        dialogue = ""
        if subtitles is not None:
            dialogue = tvqa_dialogue(Path(subtitles), -1000, 1000)
            if dialogue is None:
                raise FlipVQAError(f"{subtitles}: subtitle file not found")
        sub = bool(dialogue) or self.args.sub
        record = Record(index=0, vid=str(video) if not torch.is_tensor(video) else "features",
                        question=normalize_question(question), options=list(choices), answer=0, dialogue=dialogue,
                        frames=features)
        text = prompt_text(record.question, record.options, dialogue)
        seqs = encode_sample(self.tokenizer, text, 0, len(choices), self.args.max_feats, self.args.max_seq_len,
                             sub, ("vqa",), all_options=True)
        slots, video_len = frames_to_slots(features, self.args.max_feats)
        batch = collate([Item(record, slots, video_len, seqs)]).to(self.device)
        with autocast(self.device, self.model.backbone.tok_embeddings.weight.dtype):
            scores = self.model.score_options(batch)[0].float().cpu()
        probs = torch.softmax(-scores, dim=0)
        order = probs.argsort(descending=True).tolist()
        best = order[0]
        answer = Answer(choices[best], best, [(choices[i], probs[i].item(), scores[i].item()) for i in order],
                        n_frames=int(features.shape[0]))
        if explain:
            answer.frame_attention = frame_attention(self.model, batch, best)
        return answer


def check_choices(choices: Sequence[str]) -> None:
    if not 2 <= len(choices) <= len(LETTERS):
        raise FlipVQAError(f"--choices: give 2 to {len(LETTERS)} choices (got {len(choices)})")


@torch.no_grad()
def frame_attention(model: FlippedVQA, batch: Batch, option: int) -> list[float]:
    """How much the chosen answer's tokens attend to each video slot in the last layer: the
    layer's own sequence softmax (``keep_probs``), averaged over heads and answer tokens."""
    one = batch.tasks["vqa"].rows(slice(option, option + 1))
    frames = model.video_inputs(batch.video)[1]
    attention = model.backbone.layers[-1].attention
    attention.keep_probs = True
    try:
        model.hidden(one, model.embed(one, frames), video_bias=True)
        probs = attention.probs  # (1, heads, seq, seq)
    finally:
        attention.keep_probs, attention.probs = False, None
    start, end = int(one.label_start) - 1, int(one.length) - 1  # the positions that predict the answer
    vs = int(one.video_start)
    return probs[0, :, start:end, vs:vs + model.cfg.max_feats].float().mean(dim=(0, 1)).cpu().tolist()


def draw_explanation(path: Path, answer: Answer, question: str, thumbnails: list, max_feats: int) -> None:
    """A strip of the sampled frames, each with a bar of the answer's attention to it, and the
    ranked choices with their probabilities."""
    from PIL import Image, ImageDraw

    thumb, pad = 96, 8
    n = max_feats
    width = max(pad + n * (thumb + pad), 640)
    height = 40 + thumb + 70 + 26 * len(answer.ranked) + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 10), f"Q: {question}", fill="black")
    attn = answer.frame_attention or [0.0] * n
    top = max(attn) or 1.0
    for j in range(n):
        x = pad + j * (thumb + pad)
        if thumbnails and j < len(thumbnails) and thumbnails[j] is not None:
            img.paste(Image.fromarray(thumbnails[j]).resize((thumb, thumb)), (x, 34))
        else:
            draw.rectangle([x, 34, x + thumb, 34 + thumb], fill=(220, 220, 220))
            draw.text((x + 4, 38), "padding" if thumbnails else f"slot {j}", fill="gray")
        bar = int(50 * attn[j] / top)
        draw.rectangle([x, 34 + thumb + 58 - bar, x + thumb, 34 + thumb + 58], fill=(220, 80, 60))
        draw.text((x, 34 + thumb + 4), f"{attn[j]:.3f}", fill="black")
    y = 34 + thumb + 70
    for rank, (choice, prob, _) in enumerate(answer.ranked):
        color = (20, 120, 20) if rank == 0 else (0, 0, 0)
        draw.rectangle([pad, y + 4, pad + int(200 * prob), y + 18], fill=(120, 180, 240))
        draw.text((pad + 210, y + 4), f"{prob * 100:5.1f}%  {choice}", fill=color)
        y += 26
    img.save(path, format="PNG")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", help="a video file (or, with --features, a video id in that file)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--choices", nargs="+", required=True, help=f"2 to {len(LETTERS)} answer choices")
    parser.add_argument("--subtitles", help="an .srt file (its dialogue is added to the prompt)")
    parser.add_argument("--features", help="a clipvitl14.pth-style file to take the video's features from")
    parser.add_argument("--clip_model", help="local folder (or hub id) of CLIP ViT-L/14 to read the video")
    parser.add_argument("--fps", type=float, default=1.0, help="frames per second to sample (default: 1; "
                                                               "TVQA-style: 3)")
    parser.add_argument("--explain", metavar="PNG", help="write a picture of frames, attention and choices")
    parser.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    add_run_arguments(parser, "ask")


def run(ns: argparse.Namespace) -> int:
    # Everything that can be checked without the model first: loading a backbone takes minutes.
    if not ns.resume:
        raise FlipVQAError("pass the trained checkpoint with --resume")
    if not Path(ns.resume).is_file():
        raise FlipVQAError(f"{ns.resume}: checkpoint not found")
    check_choices(ns.choices)
    if ns.fps <= 0:
        raise FlipVQAError(f"--fps must be positive (got {ns.fps})")
    if ns.subtitles and not Path(ns.subtitles).is_file():
        raise FlipVQAError(f"{ns.subtitles}: subtitle file not found")
    video: Optional[Tensor] = None
    if ns.features:
        from .data.records import load_features

        feats = load_features(Path(ns.features))
        if ns.video not in feats:
            raise FlipVQAError(f"{ns.features}: no video {ns.video!r} in it")
        video = feats[ns.video].float()
    elif not Path(ns.video).is_file():
        raise FlipVQAError(f"{ns.video}: video file not found")
    elif not ns.clip_model:
        raise FlipVQAError("a CLIP model is needed to read a video: pass --clip_model (a local folder of "
                           "openai/clip-vit-large-patch14) or precomputed --features")
    options = {k: getattr(ns, k, None) for k in OPTIONS}
    answerer = Answerer(ns.resume, clip_model=ns.clip_model, fps=ns.fps, device=ns.device, **options)
    thumbnails: list = []
    if video is None:
        video, frames = answerer.video_features(ns.video)
        thumbnails = [None if i is None else frames[i] for i in slot_sources(len(frames), answerer.args.max_feats)]
    answer = answerer.ask(video, ns.question, ns.choices, ns.subtitles, explain=bool(ns.explain))
    if ns.explain:
        draw_explanation(Path(ns.explain), answer, normalize_question(ns.question), thumbnails,
                         answerer.args.max_feats)
    if ns.json:
        print(json.dumps(answer.to_dict()))
        return 0
    print(format_answer(answer))
    if ns.explain:
        print(f"explanation: {ns.explain}")
    return 0


def format_answer(answer: Answer) -> str:
    """The ranked choices as an aligned table, and what its numbers are."""
    width = max(len(c) for c, _, _ in answer.ranked)
    lines = [f"{'rank':>4}  {'prob':>6}  {'choice':<{width}}  mean CE"]
    for rank, (choice, prob, score) in enumerate(answer.ranked, 1):
        lines.append(f"{rank:>4}  {prob * 100:5.1f}%  {choice:<{width}}  {score:.4f}")
    lines.append("prob: softmax over the choices of minus each choice's mean cross-entropy of its answer "
                 "tokens (mean CE; lower is better)")
    lines.append(f"answer: {answer.choice}")
    return "\n".join(lines)
