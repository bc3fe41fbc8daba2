"""A synthetic temporal video-QA world, written in the generic dataset format.

A "video" is a person doing a few everyday activities one after another: 3 to 5 runs of at least 2
frames, 8 to 16 frames in all. Its frame features are what a CLIP encoder might give: per frame a
shared "CLIP mean" direction, a per-video background, the activity's prototype and noise, with
norms around 15 like real CLIP ViT-L/14 embeddings. Which activity follows which is drawn from a
script: each has a favourite successor (cooking is usually followed by eating), taken with
probability ``p_script``, and any other activity otherwise.

Questions use NExT-QA's type codes; all of them need the video, most of them its order:

====  ===============================================  =====================================
code  template                                         answer
====  ===============================================  =====================================
CW    why does the person <X>?                         "to <what comes right after X>"
CH    how does the person get ready to <X>?            "by <what comes right before X>"
TN    what does the person do after <X>?               what comes right after X
TP    what does the person do before <X>?              what comes right before X
TC    what does the person do at the beginning/end?    the first / last activity
DC    how many times does the person <X>?              one .. five (runs of X)
DO    what does the person do in the video?            the one option that happens in it
====  ===============================================  =====================================

The linguistic shortcut is deliberate: for CW, CH, TN and TP the script's favourite is the answer
most of the time (about 0.68 with ``p_script`` 0.6), so a model that reads only the question beats
chance there, and only one that watches the video does better. Distractors are mostly other
activities of the same video, so knowing *which* activities happened is not enough. Options are
listed in the world's canonical order (option ``k`` is activity ``k`` or ``k + 5``), as exams sort
their options; this lets the tiny backbone find an option by its letter without the symbol binding
that only large language models learn.

Half the questions (``DemoSpec.open_ended``, drawn from a stream of their own, so the questions
themselves do not depend on it) are asked *open-ended*: without options, answered in words by the
correct option's text ("to eat", "by cooking", "two"). A "what does the person do in the video?"
question then accepts every activity of the video; every other question has one answer.

Everything is a pure function of the seed. :func:`narration` tells, per video, which activity
each of its ``max_feats`` sampled frames shows: the text corpus of the demo backbone describes
videos that way (see ``scripts/build_demo_backbone.py``); the demo itself never uses it.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.records import FEATURE_DIM, Record, frames_to_slots
from ..prompts import normalize_question


@dataclass(frozen=True)
class Event:
    do: str  # "cook"
    doing: str  # "cooking": the option text, and the word the backbone's corpus narrates a frame with


# In script order: each activity's favourite successor is the next one (cyclically). One word (one
# token) each, so that all options of a question are equally long.
EVENTS: tuple[Event, ...] = tuple(Event(*forms) for forms in (
    ("cook", "cooking"), ("eat", "eating"), ("wash", "washing"), ("read", "reading"),
    ("write", "writing"), ("sing", "singing"), ("dance", "dancing"), ("run", "running"),
    ("swim", "swimming"), ("sleep", "sleeping"),
))
COUNTS = ("one", "two", "three", "four", "five")
QTYPES = ("CW", "CH", "TN", "TP", "TC", "DC", "DO")
N_OPTIONS = 5
MAX_FEATS = 8  # the demo's video slots; every video has at least this many frames


@dataclass(frozen=True)
class DemoSpec:
    """Sizes and difficulty of one generated dataset."""

    train_videos: int = 400
    val_videos: int = 100
    questions_per_video: int = 3
    p_script: float = 0.6  # probability that an event is followed by its favourite successor
    noise: float = 0.6  # per-frame noise, relative to the unit-norm prototype
    max_feats: int = MAX_FEATS
    open_ended: float = 0.5  # fraction of the questions asked without options


@dataclass(frozen=True)
class Video:
    vid: str
    runs: tuple[tuple[int, int], ...]  # (event index, frames), consecutive runs differ

    @property
    def frame_events(self) -> list[int]:
        return [e for e, n in self.runs for _ in range(n)]

    @property
    def events(self) -> list[int]:
        return [e for e, _ in self.runs]


@dataclass(frozen=True)
class Question:
    vid: str
    question: str
    options: tuple[str, ...]
    answer: int
    qtype: str
    also: tuple[str, ...] = ()  # other acceptable answers in words (DO: the video's other activities)
    open_ended: bool = False  # asked without its options

    @property
    def answers(self) -> list[str]:
        """The acceptable answers in words, the correct option's text first."""
        return [self.options[self.answer], *self.also]


# ---------------------------------------------------------------------------- videos
def _runs(rng: np.random.Generator, p_script: float, max_feats: int) -> tuple[tuple[int, int], ...]:
    n_frames = int(rng.integers(max(8, max_feats), 17))
    n_runs = int(rng.integers(3, min(5, n_frames // 2) + 1))
    # Runs of at least 2 frames (they survive the uniform sampling of <= 2 * max_feats frames to
    # max_feats slots); the extra frames are spread by stars and bars.
    extra = n_frames - 2 * n_runs
    bars = np.sort(rng.choice(extra + n_runs - 1, n_runs - 1, replace=False))
    lengths = np.diff(np.concatenate([[-1], bars, [extra + n_runs - 1]])) - 1 + 2
    n = len(EVENTS)
    events = [int(rng.integers(n))]
    for _ in range(n_runs - 1):
        favourite = (events[-1] + 1) % n
        if rng.random() < p_script:
            events.append(favourite)
        else:
            others = [e for e in range(n) if e not in (events[-1], favourite)]
            events.append(int(rng.choice(others)))
    return tuple(zip(events, (int(x) for x in lengths)))


def _features(video: Video, world: dict[str, np.ndarray], background: np.ndarray, noise: float,
              rng: np.random.Generator) -> torch.Tensor:
    """float16 [frames, 768]: CLIP-like norms (~14) with a large shared component, as real ones."""
    frames = np.stack([world["prototypes"][e] for e in video.frame_events])
    frames = frames + noise * rng.standard_normal(frames.shape) / np.sqrt(FEATURE_DIM)
    frames = 0.8 * world["mean"] + 0.5 * background + frames
    return torch.from_numpy(10.0 * frames).to(torch.float16)


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal((*shape, FEATURE_DIM))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------- questions
def _options(rng: np.random.Generator, answer: int, form, avoid: set[int], prefer: set[int]
             ) -> tuple[tuple[str, ...], int] | None:
    """Options in the world's canonical order: option ``j`` is event ``j`` or ``j + 5``. The
    answer's slot holds the answer; every other slot one event of its pair that is not in
    ``avoid``, an event of ``prefer`` (the video's own: a hard distractor) most of the time.
    None when a slot has no candidate."""
    options = []
    for j in range(N_OPTIONS):
        if j == answer % N_OPTIONS:
            options.append(form(EVENTS[answer]))
            continue
        pair = [e for e in (j, j + N_OPTIONS) if e not in avoid]
        if not pair:
            return None
        hard = [e for e in pair if e in prefer]
        e = hard[0] if hard and rng.random() < 0.7 else pair[int(rng.integers(len(pair)))]
        options.append(form(EVENTS[e]))
    return tuple(options), answer % N_OPTIONS


def _doing(e: Event) -> str:
    return e.doing


def _question(rng: np.random.Generator, video: Video, qtype: str) -> Question | None:
    """One question of ``qtype`` about ``video``, or None when the video has none of that type."""
    events = video.events
    present = set(events)
    if qtype in ("CW", "TN", "CH", "TP"):
        step = 1 if qtype in ("CW", "TN") else -1
        anchors = [i for i, e in enumerate(events) if events.count(e) == 1 and 0 <= i + step < len(events)]
        if not anchors:
            return None
        i = int(rng.choice(anchors))
        x, y = EVENTS[events[i]], events[i + step]
        form = {"CW": lambda e: f"to {e.do}", "CH": lambda e: f"by {e.doing}"}.get(qtype, _doing)
        text = {"CW": f"why does the person {x.do}?",
                "CH": f"how does the person get ready to {x.do}?",
                "TN": f"what does the person do after {x.doing}?",
                "TP": f"what does the person do before {x.doing}?"}[qtype]
        found = _options(rng, y, form, avoid={events[i]}, prefer=present)
    elif qtype == "TC":
        first = rng.random() < 0.5
        text = f"what does the person do at the {'beginning' if first else 'end'} of the video?"
        found = _options(rng, events[0] if first else events[-1], _doing, avoid=set(), prefer=present)
    elif qtype == "DC":
        # Ask about a repeated event when there is one, and only sometimes about a video without
        # one, so that "one" is not the answer almost always.
        repeated = sorted(e for e in present if events.count(e) > 1)
        if not repeated and rng.random() > 0.3:
            return None
        x = int(rng.choice(repeated or events))
        text, found = f"how many times does the person {EVENTS[x].do}?", (COUNTS, events.count(x) - 1)
    elif qtype == "DO":  # the other options are events that do not happen in the video
        text = "what does the person do in the video?"
        found = None
        for y in rng.permutation(sorted(present)):
            found = _options(rng, int(y), _doing, avoid=present - {int(y)}, prefer=set())
            if found:
                also = tuple(EVENTS[e].doing for e in sorted(present) if EVENTS[e].doing != found[0][found[1]])
                return Question(video.vid, text, found[0], found[1], qtype, also)
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    return None if found is None else Question(video.vid, text, found[0], found[1], qtype)


def _questions(rng: np.random.Generator, video: Video, n: int) -> list[Question]:
    out = []
    for qtype in rng.permutation(QTYPES):
        q = _question(rng, video, str(qtype))
        if q is not None:
            out.append(q)
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------------------- the dataset
@dataclass
class Split:
    videos: list[Video]
    questions: list[Question]
    features: dict[str, torch.Tensor]


def generate(seed: int, spec: DemoSpec = DemoSpec()) -> dict[str, Split]:
    """The ``train`` and ``val`` splits for ``seed``; each split has its own random stream, so
    changing the size of one never changes the other, and which questions are open-ended is drawn
    from a third stream per split."""
    world_rng = np.random.default_rng([seed, 0])
    world = {"mean": _unit(world_rng), "prototypes": _unit(world_rng, len(EVENTS))}
    splits = {}
    for code, (name, n_videos) in enumerate((("train", spec.train_videos), ("val", spec.val_videos)), 1):
        rng = np.random.default_rng([seed, code])
        videos, questions, features = [], [], {}
        for i in range(n_videos):
            video = Video(str(code * 1_000_000 + i), _runs(rng, spec.p_script, spec.max_feats))
            videos.append(video)
            features[video.vid] = _features(video, world, _unit(rng), spec.noise, rng)
            questions.extend(_questions(rng, video, spec.questions_per_video))
        asked = np.random.default_rng([seed, code, 1]).random(len(questions)) < spec.open_ended
        questions = [dataclasses.replace(q, open_ended=bool(o)) for q, o in zip(questions, asked)]
        splits[name] = Split(videos, questions, features)
    return splits


def narration(video: Video, max_feats: int = MAX_FEATS) -> list[str]:
    """The word (``doing``) of the event each of the ``max_feats`` sampled frames shows (the rows that
    :func:`flipvqa.data.records.frames_to_slots` picks)."""
    index = torch.arange(len(video.frame_events), dtype=torch.float32)[:, None]
    picked, n = frames_to_slots(index, max_feats)
    return [EVENTS[video.frame_events[int(i)]].doing for i in picked[:n, 0]]


DATASET = "synthetic"  # the folder under the data path, a generic dataset's name


def row(q: Question, qid: int) -> dict:
    """A question as a generic-format JSONL row: with its options and the correct one's index, or
    open-ended with its acceptable answers."""
    head = {"video": q.vid, "question": q.question}
    if q.open_ended:
        return {**head, "answer": q.answers, "qid": str(qid), "type": q.qtype}
    return {**head, "options": list(q.options), "answer": q.answer, "qid": str(qid), "type": q.qtype}


def write_generic(data_path: str | Path, seed: int, spec: DemoSpec = DemoSpec(), blind: bool = False) -> Path:
    """Write ``<data_path>/synthetic/{train,val}.jsonl`` and ``features.pth`` (the generic format,
    :mod:`flipvqa.data.generic`); returns the folder.

    ``blind``: the same questions with every frame feature zeroed (the question-only baseline)."""
    root = Path(data_path) / DATASET
    root.mkdir(parents=True, exist_ok=True)
    features = {}
    for name, split in generate(seed, spec).items():
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row(q, qid)) + "\n" for qid, q in enumerate(split.questions))
        for vid, x in split.features.items():
            # One zero row is the same all-zero video (frames_to_slots pads with zero rows).
            features[vid] = torch.zeros(1, FEATURE_DIM, dtype=x.dtype) if blind else x
    torch.save(features, root / "features.pth")
    return root


# ---------------------------------------------------------------------------- random questions (bench)
_WH = ("why", "what", "how", "where", "when", "who")
_WORDS = ("the man woman boy girl baby dog cat ball chair table door car bike hand head water food "
          "toy box bag phone book cup window floor grass tree house room video people lady kid "
          "play pick hold look walk run sit stand open close throw push pull eat drink watch move "
          "turn start end after before while again first last left right up down near beside big "
          "small red white black blue green happy slowly quickly together around at on in with "
          "from into out of to some two three").split()


def random_records(n: int, seed: int, n_options: int = 5) -> list[Record]:
    """``n`` NExT-QA-style questions of random words (8-12, a wh-word first), ``n_options``
    options of 2-5 words and 10-20 frames of float16 features ``N(0, 1) * 0.5``; a function of
    ``seed``. Unlike the demo's world there is nothing to learn: for benchmarks."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    records = []
    for i in range(n):
        question = normalize_question(f"{rng.choice(_WH)} {words(rng.randint(7, 11))}")
        options = [words(rng.randint(2, 5)) for _ in range(n_options)]
        frames = (torch.randn(rng.randint(10, 20), FEATURE_DIM, generator=gen) * 0.5).half()
        records.append(Record(index=i, vid=f"synthetic{i:05d}", question=question, options=options,
                              answer=rng.randrange(n_options), qtype=rng.randint(1, 8), frames=frames))
    return records
