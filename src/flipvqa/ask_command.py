"""``flipvqa ask``: one question about one video, from the command line.

With ``--choices`` the choices are ranked (:meth:`flipvqa.ask.Answerer.ask`); without, the model
answers in words (:meth:`flipvqa.ask.Answerer.generate`). ``--explain`` draws the picture of
:mod:`flipvqa.explain`; ``--json`` prints the answer as one object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from torch import Tensor

from .ask import OPTIONS, Answer, Answerer, WordsAnswer, check_choices, check_sampling
from .config import add_run_arguments
from .data.records import slot_sources
from .errors import FlipVQAError
from .prompts import LETTERS, normalize_question


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", help="a video file (or, with --features, a video id in that file)")
    parser.add_argument("--question", required=True, help="the question about the video, in words (with "
                                                          "--choices ranked against them, else answered in words)")
    parser.add_argument("--choices", nargs="+", help=f"2 to {len(LETTERS)} answer choices to rank (without "
                                                     "them, the model answers in words)")
    parser.add_argument("--subtitles", help="an .srt file (its dialogue is added to the prompt)")
    parser.add_argument("--features", help="a clipvitl14.pth-style file to take the video's features from")
    parser.add_argument("--clip_model", help="local folder (or hub id) of the frame encoder the checkpoint was "
                                             "trained with, to read the video (CLIP ViT-L/14 for the released "
                                             "features; SigLIP works too)")
    parser.add_argument("--fps", type=float, default=1.0, help="frames per second to sample (default: 1; "
                                                               "TVQA-style: 3)")
    parser.add_argument("--explain", metavar="PNG", help="write a picture of frames, attention and choices "
                                                         "(with --choices)")
    parser.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    add_run_arguments(parser, "ask")


def run(ns: argparse.Namespace) -> int:
    # Everything that can be checked without the model first: loading a backbone takes minutes.
    if not ns.resume:
        raise FlipVQAError("pass the trained checkpoint with --resume")
    if not Path(ns.resume).is_file():
        raise FlipVQAError(f"{ns.resume}: checkpoint not found")
    if not ns.question.strip():
        raise FlipVQAError("--question is empty")
    words = ns.choices is None
    if words:
        check_sampling(*_sampling(ns)[:3])
        if ns.explain:
            raise FlipVQAError("--explain draws the ranked choices: give --choices too")
    else:
        check_choices(ns.choices)
    if ns.fps <= 0:
        raise FlipVQAError(f"--fps must be positive (got {ns.fps})")
    if ns.subtitles and not Path(ns.subtitles).is_file():
        raise FlipVQAError(f"{ns.subtitles}: subtitle file not found")
    video = _features(ns)
    options = {k: getattr(ns, k, None) for k in OPTIONS}
    answerer = Answerer(ns.resume, clip_model=ns.clip_model, fps=ns.fps, device=ns.device, **options)
    thumbnails: list = []
    sources = slot_sources(int(video.shape[0]), answerer.args.max_feats) if video is not None else []
    if video is None:
        video, frames = answerer.video_features(ns.video)
        sources = slot_sources(len(frames), answerer.args.max_feats)
        thumbnails = [None if i is None else frames[i] for i in sources]
    if words:
        max_new, temperature, top_p, seed = _sampling(ns)
        answer = answerer.generate(video, ns.question, ns.subtitles, max_new_tokens=max_new,
                                   temperature=temperature, top_p=top_p, seed=seed)
        print(json.dumps(answer.to_dict()) if ns.json else format_words(answer))
        return 0
    answer = answerer.ask(video, ns.question, ns.choices, ns.subtitles, explain=bool(ns.explain))
    if ns.explain:
        from .explain import draw_explanation

        # frame i of the features sits at i / fps seconds (what extract-features samples)
        times = [None if i is None else i / ns.fps for i in sources]
        draw_explanation(Path(ns.explain), answer, normalize_question(ns.question), thumbnails,
                         answerer.args.max_feats, slot_times=times,
                         n_layers=answerer.model.backbone.args.n_layers)
    if ns.json:
        print(json.dumps(answer.to_dict()))
        return 0
    print(format_answer(answer))
    if ns.explain:
        print(f"explanation: {ns.explain}")
    return 0


def _sampling(ns: argparse.Namespace) -> tuple[int, float, float, int]:
    """(max_new_tokens, temperature, top_p, seed), the flags' defaults where not given."""
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return (pick(ns.max_new_tokens, 32), pick(ns.temperature, 0.0), pick(ns.top_p, 1.0), pick(ns.seed, 0))


def _features(ns: argparse.Namespace) -> Optional[Tensor]:
    """The video's features from ``--features``; None when the video file is to be read (checked)."""
    if ns.features:
        from .data.records import load_features

        feats = load_features(Path(ns.features))
        if ns.video not in feats:
            raise FlipVQAError(f"{ns.features}: no video {ns.video!r} in it")
        return feats[ns.video].float()
    if not Path(ns.video).is_file():
        raise FlipVQAError(f"{ns.video}: video file not found")
    if not ns.clip_model:
        raise FlipVQAError("a CLIP model is needed to read a video: pass --clip_model (a local folder of "
                           "openai/clip-vit-large-patch14) or precomputed --features")
    return None


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


def format_words(answer: WordsAnswer) -> str:
    """The answer, then each token with its probability."""
    tokens = "  ".join(f"{t!r} {p * 100:.1f}%" for t, p in zip(answer.tokens, answer.probabilities))
    lines = [f"answer: {answer.answer}", f"tokens: {tokens}"]
    if answer.cut:
        lines.append(f"(cut after {len(answer.tokens)} tokens: raise --max_new_tokens for the rest)")
    return "\n".join(lines)
