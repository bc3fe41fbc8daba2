"""What ``flipvqa serve`` serves: the model, its examples, the checks on every request.

A request with choices is ranked by the multiple-choice queue; one without (a free question) is
answered in words by :class:`flipvqa.serve.words.WordsBatcher`'s queue. The two queues share the
model's lock, so one batch runs on the model at a time.

Nothing here knows about HTTP beyond :class:`RequestError`'s status: :mod:`flipvqa.serve.app`
turns the dicts and errors into responses.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..ask import Answerer, Question
from ..errors import FlipVQAError
from ..io import load_tensors, read_json
from ..prompts import LETTERS
from .batching import BatchQueue
from .checks import RequestError, check_choices, check_question, check_subtitles, first_line, json_type
from .words import FIELDS, Generated, Settings, SettingsError, WordsBatcher, check_settings

log = logging.getLogger(__name__)

THUMB = 112  # pixels, square


@dataclass
class Example:
    id: str
    features: torch.Tensor
    info: dict = field(default_factory=dict)  # question, choices, answer, type, frames, ...

    def public(self) -> dict:
        return {"id": self.id, "question": "", "choices": [], **self.info, "n_frames": int(self.features.shape[0])}


@dataclass
class Upload:
    """A video file as the page sends it: where it lies, its name and size in bytes."""
    path: Path
    name: str
    size: int


class Backend:
    """The model (loaded once), the examples, and two :class:`BatchQueue` in front of the model:
    ``queue`` ranks choices, ``words.queue`` answers in words (``settings``: the server's sampling
    flags, its ``max_new_tokens`` also the most a request may ask for)."""

    def __init__(self, answerer: Answerer, checkpoint: Path, examples: list[Example], max_upload_mb: float = 200,
                 max_seconds: float = 600, max_batch: int = 32, max_wait: float = 0.002,
                 settings: Settings = Settings()):
        self.answerer, self.checkpoint = answerer, checkpoint
        self.examples = {e.id: e for e in examples}
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self.max_upload_mb, self.max_seconds = max_upload_mb, max_seconds
        self.model_lock = threading.Lock()  # the explain pass sets state on the model: one batch at a time
        self.queue: BatchQueue = BatchQueue(self._score, max_batch=max_batch, max_wait=max_wait)
        self.words = WordsBatcher(answerer, self.model_lock, settings, settings.max_new_tokens,
                                  max_batch=max_batch, max_wait=max_wait)
        self._clip_lock = threading.Lock()
        self.max_choices = most_choices(answerer)
        self.started = time.time()

    def _score(self, questions: list[Question]):
        with self.model_lock, torch.inference_mode():
            return self.answerer.ask_many(questions, explain=True)

    def close(self) -> None:
        """Answer what is queued, then stop the workers."""
        self.queue.close()
        self.words.queue.close()

    # ------------------------------------------------------------------ what the API reports
    @property
    def uploads(self) -> bool:
        return self.answerer.clip_model is not None

    def health(self) -> dict:
        args = self.answerer.args
        status = "ok" if self.queue.alive and self.words.queue.alive else "error"
        return {"status": status, "model": args.model, "checkpoint": str(self.checkpoint),
                "device": str(self.answerer.device), "max_feats": args.max_feats, "max_seq_len": args.max_seq_len,
                "max_choices": self.max_choices, "uploads": self.uploads,
                "max_upload_mb": self.max_upload_mb, "max_seconds": self.max_seconds,
                "uptime_s": round(time.time() - self.started, 1), **self.queue.stats(),
                "generation": self.words.stats()}

    def example_list(self) -> list[dict]:
        return [e.public() for e in self.examples.values()]

    # ------------------------------------------------------------------ requests
    def example_question(self, body: Any) -> tuple[Question, dict]:
        """A JSON body ``{"example": ID[, "question": ..., "choices": [...]]}`` as a question: with a
        ``question`` and no ``choices`` (absent, null or []) a free question (``Question.choices``
        empty), answered in words; else the choices (the example's own where not given) are ranked."""
        if not isinstance(body, dict):
            raise RequestError(400, f"the body must be a JSON object, not {json_type(body)}")
        unknown = sorted(set(body) - {"example", "question", "choices", *FIELDS})
        if unknown:
            raise RequestError(400, f"unknown field {unknown[0]!r} (give example, question, choices, "
                                    f"{', '.join(FIELDS)})")
        if "example" not in body:
            raise RequestError(400, "give the example's id as \"example\" (or upload a video as multipart "
                                    "form data)")
        example = self.example(body["example"])
        info = example.info
        if body.get("question") is not None and body.get("choices") in (None, []):
            question = check_question(body["question"])
            extra = {"example": example.id, "question": question, **pick(info, "frames")}
            return Question(example.features.float(), question, ()), extra
        question = check_question(body["question"]) if body.get("question") is not None else info.get("question")
        choices = check_choices(body["choices"]) if body.get("choices") is not None else info.get("choices")
        if not question or not choices:
            raise RequestError(400, f"example {example.id!r} has no question of its own: give \"question\" "
                                    "and \"choices\"")
        extra: dict = {"example": example.id, "question": question, "choices": list(choices)}
        if "frames" in info:
            extra["frames"] = info["frames"]
        own = question == info.get("question") and list(choices) == info.get("choices")
        if own and isinstance(info.get("answer"), int):
            extra["correct"] = info["answer"]
        return self.check_room(Question(example.features.float(), question, list(choices))), extra

    def example(self, key: Any) -> Example:
        if not isinstance(key, str):
            raise RequestError(400, f"\"example\" must be a string id, not {json_type(key)}")
        if key not in self.examples:
            shown = ", ".join(list(self.examples)[:5]) + (", ..." if len(self.examples) > 5 else "")
            raise RequestError(404, f"unknown example {key[:100]!r} (known: {shown or 'none'})")
        return self.examples[key]

    def check_upload_size(self, size: Optional[int]) -> None:
        if size is not None and size > self.max_upload_bytes:
            raise self.too_large(f"the video is {size / 2**20:.1f} MB")

    def too_large(self, what: str, slack: int = 0) -> RequestError:
        """The 413 of an upload: ``what`` ("the video is 3.0 MB"), over --max_upload_mb (plus ``slack``
        bytes for a request's other fields)."""
        extra = f" (plus {slack / 2**20:g} MB for the other fields)" if slack else ""
        return RequestError(413, f"{what}: the server takes at most --max_upload_mb {self.max_upload_mb:g}{extra}")

    def need_uploads(self) -> None:
        if not self.uploads:
            raise RequestError(400, "this server cannot read videos: start it with --clip_model (a local folder "
                                    "of openai/clip-vit-large-patch14) to answer about uploads")

    def sampling(self, free: bool, given: dict) -> Optional[Settings]:
        """The settings of a free question from the request's sampling fields (None: choices)."""
        if not free:
            named = [k for k in FIELDS if given.get(k) is not None]
            if named:
                raise RequestError(400, f"\"{named[0]}\" is for answers in words: leave out the choices")
            return None
        try:
            return check_settings({k: given.get(k) for k in FIELDS}, self.words.defaults, self.words.limit)
        except SettingsError as err:
            raise RequestError(400, str(err)) from None

    def submit(self, question: Question, settings: Optional[Settings], sink=None):
        """The future of a question: ranked (``settings`` None) or answered in words."""
        if settings is None:
            return self.queue.submit(question)
        return self.words.submit(question, settings, sink)

    def video_question(self, video: Upload, question: Any, choices: Any, subtitles: Optional[Path]
                       ) -> tuple[Question, dict]:
        """An uploaded video (decoded and embedded here, in the caller's thread) as a question; with
        no choices, a free question."""
        self.need_uploads()
        question = check_question(question)
        choices = check_choices(choices) if choices else []
        self.check_upload_size(video.size)
        if subtitles is not None:
            check_subtitles(subtitles)
        blank = torch.zeros(1, self.answerer.feature_dim)  # choices that cannot fit: refused before decoding
        self.check_room(Question(blank, question, list(choices), subtitles))
        start = time.perf_counter()
        frames = self.decode(video)
        with self._clip_lock:  # one CLIP at a time (and loaded once)
            features = self.answerer.embed_frames(frames)
        from ..data.records import slot_sources

        slots = slot_sources(len(frames), self.answerer.args.max_feats)
        extra = {"video": video.name, "question": question, **({"choices": choices} if choices else {}),
                 "thumbnails": thumbnails(frames, slots), "video_s": time.perf_counter() - start}
        return Question(features, question, list(choices), subtitles), extra

    def check_room(self, question: Question) -> Question:
        """``question``, refused when it has more choices than fit the model even when short. The
        model's own check (its error names the tokens and --max_seq_len) runs only then: the batch
        checks every question again."""
        if len(question.choices) > self.max_choices:
            try:
                self.answerer.check(question)
            except FlipVQAError as err:
                raise RequestError(400, f"{err} (this model fits at most {self.max_choices} one-word choices; "
                                        "/api/health says max_choices and max_seq_len)") from None
        return question

    def decode(self, video: Upload):
        """The sampled frames of an upload (uint8 [n, H, W, 3]; CLIP: 224x224), as ``flipvqa ask`` samples them,
        refusing a video longer than ``max_seconds`` before decoding all of it."""
        import numpy as np

        from ..features.video import import_av, iter_frames

        fps = self.answerer.fps
        duration = container_seconds(import_av(), video)
        if duration is not None and duration > self.max_seconds:
            raise RequestError(413, f"{video.name}: the video lasts {duration:.0f} s, more than the server's "
                                    f"--max_seconds {self.max_seconds:g}")
        limit = int(self.max_seconds * fps) + 1  # fps-filter rounding gives one frame more at most
        frames = []
        try:
            for frame in iter_frames(video.path, fps, crop=self.answerer.encoder.crop):
                frames.append(frame)
                if len(frames) > limit:
                    raise RequestError(413, f"{video.name}: the video lasts more than the server's --max_seconds "
                                            f"{self.max_seconds:g}")
        except FlipVQAError as err:
            raise RequestError(400, str(err).replace(str(video.path), video.name)) from None
        except (OSError, ValueError, RuntimeError, EOFError) as err:
            raise RequestError(400, f"{video.name}: not a readable video ({first_line(err)})") from None
        if not frames:
            raise RequestError(400, f"{video.name}: no frames could be decoded (not a video, or shorter than "
                                    f"one frame at {fps:g} fps)")
        return np.stack(frames)

    @staticmethod
    def answer_dict(scored, extra: dict, started: float, settings: Optional[Settings] = None) -> dict:
        """The response: the answer's ``to_dict()``, ``extra``, ``timings`` and ``batch_size`` (the
        questions of its model call); an answer in words adds its ``settings``."""
        result, batch_size = scored.result, scored.batch_size
        if isinstance(result, Generated):
            result, batch_size = result.answer, result.batch_size
        out = result.to_dict()
        timings = {"queue": scored.queue_s, "model": scored.model_s}
        if "video_s" in extra:
            extra = dict(extra)
            timings["video"] = extra.pop("video_s")
        if out.get("timings", {}).get("first_token") is not None:  # from the start of its generate_many call
            timings["first_token"] = out["timings"]["first_token"]
        timings["total"] = time.perf_counter() - started
        out.update(extra)
        out["timings"] = {k: round(v, 6) for k, v in timings.items()}
        out["batch_size"] = batch_size
        if settings is not None:
            out["settings"] = asdict(settings)
        return out


# ---------------------------------------------------------------------- checks


def pick(info: dict, *keys: str) -> dict:
    return {k: info[k] for k in keys if k in info}


def container_seconds(av, video: Upload) -> Optional[float]:
    """The duration the file's header declares (None when it declares none or cannot be opened:
    decoding then says what is wrong)."""
    try:
        with av.open(str(video.path)) as container:
            if container.duration:
                return container.duration / 1_000_000
            stream = container.streams.video[0] if container.streams.video else None
            if stream is not None and stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
    except Exception:
        return None
    return None


def thumbnails(frames, slots: list[Optional[int]]) -> list[Optional[str]]:
    """Per video slot, its frame as a small JPEG data URL (None for a padding slot)."""
    from PIL import Image

    cache: dict[int, str] = {}
    for i in slots:
        if i is not None and i not in cache:
            buf = io.BytesIO()
            Image.fromarray(frames[i]).resize((THUMB, THUMB), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=80)
            cache[i] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return [None if i is None else cache[i] for i in slots]


def most_choices(answerer: Answerer) -> int:
    """The most choices that fit the model's --max_seq_len at all: one-letter choices to a one-character
    question (0: not even 2). Longer ones fit fewer; /api/health and the page show this bound."""
    features = torch.zeros(1, answerer.feature_dim)

    def fits(n: int) -> bool:
        try:
            answerer.check(Question(features, "?", [chr(ord("a") + k) for k in range(n)]))  # a, b, c, ...
            return True
        except FlipVQAError:
            return False

    low, high = 1, len(LETTERS)  # fits(low) is taken as true; the answer is in low..high
    while low < high:  # more choices never take fewer tokens: a binary search
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low if low >= 2 else 0


# ---------------------------------------------------------------------- examples


def demo_examples(folder: Path) -> list[Example]:
    """The demo's bundled questions (``examples.json``) with their videos' features (``examples.pth``)."""
    listed = read_json(folder / "examples.json")
    features = load_tensors(folder / "examples.pth", "example features")
    out = []
    for entry in listed:
        info = {k: v for k, v in entry.items() if k != "id"}
        out.append(Example(str(entry["id"]), features[entry["video"]], info))
    return out


def feature_examples(path: Path) -> list[Example]:
    """One example per video of a features file, without a question (users ask their own)."""
    from ..data.records import load_features

    if not path.is_file():
        raise FlipVQAError(f"{path}: features file not found")
    return [Example(vid, feats, {"video": vid}) for vid, feats in load_features(path).items()]
