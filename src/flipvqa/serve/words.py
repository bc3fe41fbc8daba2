"""Answers in words for ``flipvqa serve``: the sampling fields, the generation batches, streaming.

Free questions (no choices) go on their own :class:`~flipvqa.serve.batching.BatchQueue`, whose
worker hands what waits to :meth:`flipvqa.ask.Answerer.generate_many`. In one worker batch the
greedy questions share one call, whatever their ``max_new_tokens`` (the call runs to the largest
and ends each row at its own through ``cancelled()``: a row is independent of its neighbours, so
it ends exactly as alone); a sampled question (``temperature`` > 0) gets a call of its own, since
the batch shares one random generator and its answer must be the one its seed gives alone.

A streamed request carries a :class:`TokenSink`: ``on_token`` runs in the worker thread, and the
sink hands each token to the request's asyncio task with ``call_soon_threadsafe``. When the client
goes away the sink is marked gone; the next step's ``cancelled()`` names its row and the row
leaves the batch (a request still queued is dropped before it runs).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from ..ask import Answerer, Question, WordsAnswer
from .batching import BatchQueue

FIELDS = ("max_new_tokens", "temperature", "top_p", "seed")
MAX_SEED = 2**63 - 1


class SettingsError(ValueError):
    """A bad sampling field (the route answers 400 with its one line)."""


@dataclass(frozen=True)
class Settings:
    """How one free question is answered (the server's flags give the defaults)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def check_settings(given: dict, defaults: Settings, limit: int) -> Settings:
    """The request's sampling fields (JSON values) over the server's defaults; ``limit`` is the
    server's --max_new_tokens."""
    out = asdict(defaults)
    for name, value in given.items():
        if value is None:
            continue
        if name in ("max_new_tokens", "seed"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise SettingsError(f"\"{name}\" must be an integer, not {json_name(value)}")
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise SettingsError(f"\"{name}\" must be a number, not {json_name(value)}")
        out[name] = value
    if not 1 <= out["max_new_tokens"] <= limit:
        raise SettingsError(f"\"max_new_tokens\" must be 1 to {limit} (the server's --max_new_tokens), "
                            f"got {out['max_new_tokens']}")
    if out["temperature"] < 0:
        raise SettingsError(f"\"temperature\" must be 0 (greedy) or more, got {out['temperature']}")
    if not 0 < out["top_p"] <= 1:
        raise SettingsError(f"\"top_p\" must be in (0, 1], got {out['top_p']}")
    if not 0 <= out["seed"] <= MAX_SEED:
        raise SettingsError(f"\"seed\" must be 0 to 2**63-1, got {out['seed']}")
    return Settings(int(out["max_new_tokens"]), float(out["temperature"]), float(out["top_p"]), int(out["seed"]))


def form_settings(form) -> dict:
    """The sampling fields of multipart form data, as the JSON values they spell ("5", "0.7")."""
    out = {}
    for name in FIELDS:
        values = form.getlist(name)
        if len(values) > 1 or (values and not isinstance(values[0], str)):
            raise SettingsError(f"give \"{name}\" once, as a text field")
        if values:
            try:
                out[name] = json.loads(values[0])
            except (ValueError, RecursionError):  # RecursionError: a field of 100,000 "["
                raise SettingsError(f"\"{name}\" must be a number, not {values[0][:40]!r}") from None
    return out


def json_name(value: Any) -> str:
    return {str: "a string", bool: "a boolean", list: "a list", dict: "an object", float: "a fraction"
            }.get(type(value), type(value).__name__)


class TokenSink:
    """One streamed request's tokens, from the generating thread to its asyncio task."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items = loop, asyncio.Queue()
        self.sent = 0  # tokens handed over: a batch rerun one by one after a failure repeats none
        self.gone = False  # the client went away: leave the batch
        self.counted = False  # in the cancelled count
        self.future = None  # set by the submitter; cancelled while still queued

    def token(self, index: int, text: str, probability: float) -> None:
        """The request's ``index``-th token (generator thread)."""
        if self.gone or index < self.sent:
            return
        self.sent += 1
        self.put(("token", {"token": text, "probability": probability}))

    def put(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is stopping
            self.gone = True

    async def next(self) -> tuple:
        """("token", {"token", "probability"}) or ("done", the request's future)."""
        return await self.items.get()


@dataclass
class WordsJob:
    question: Question
    settings: Settings
    sink: Optional[TokenSink] = None

    @property
    def gone(self) -> bool:
        return self.sink is not None and self.sink.gone


@dataclass
class Generated:
    answer: WordsAnswer
    batch_size: int  # questions in its generate_many call


class WordsBatcher:
    """The queue of free questions in front of ``answerer.generate_many`` (under the model's lock,
    shared with the multiple-choice queue: one batch runs on the model at a time)."""

    def __init__(self, answerer: Answerer, lock: threading.Lock, defaults: Settings, limit: int,
                 max_batch: int = 32, max_wait: float = 0.002):
        self.answerer, self.lock, self.defaults, self.limit = answerer, lock, defaults, limit
        self._count = threading.Lock()
        self.cancelled = 0  # streams whose client went away before their answer was sent
        self.queue: BatchQueue = BatchQueue(self._run, max_batch=max_batch, max_wait=max_wait,
                                            name="flipvqa-generator")

    def submit(self, question: Question, settings: Settings, sink: Optional[TokenSink] = None):
        future = self.queue.submit(WordsJob(question, settings, sink))
        if sink is not None:
            sink.future = future
            # After every token: the worker thread puts the tokens, then sets the result.
            future.add_done_callback(lambda f: sink.put(("done", f)))
        return future

    def cancel(self, sink: TokenSink) -> None:
        """The client of ``sink`` went away (event loop): drop it if queued, else end its row."""
        if sink.gone:
            return
        sink.gone = True
        if sink.future is not None and sink.future.cancel():
            self._count_once(sink)  # never ran; a running one is counted when its row leaves

    def _count_once(self, sink: TokenSink) -> None:
        with self._count:
            if not sink.counted:
                sink.counted = True
                self.cancelled += 1

    def stats(self) -> dict:
        with self._count:
            cancelled = self.cancelled
        return {**asdict(self.defaults), **self.queue.stats(), "cancelled": cancelled}

    # ------------------------------------------------------------------ the worker
    def _run(self, jobs: list[WordsJob]) -> list[Optional[Generated]]:
        results: list[Optional[Generated]] = [None] * len(jobs)  # None: its client left before it ran
        greedy, sampled = [], []
        for k, job in enumerate(jobs):
            if job.gone:
                self._count_once(job.sink)
            else:
                (greedy if job.settings.greedy else sampled).append(k)
        for rows in [greedy] * bool(greedy) + [[k] for k in sampled]:
            for k, answer in zip(rows, self._generate([jobs[k] for k in rows])):
                results[k] = Generated(answer, len(rows))
        return results

    def _generate(self, jobs: list[WordsJob]) -> list[WordsAnswer]:
        """One generate_many call; each row ends at its own max_new_tokens or when its client leaves."""
        counts = [0] * len(jobs)

        def on_token(row: int, text: str, probability: float) -> None:
            sink = jobs[row].sink
            if sink is not None:
                sink.token(counts[row], text, probability)
            counts[row] += 1

        def cancelled() -> list[int]:
            out = []
            for row, job in enumerate(jobs):
                if job.gone:
                    self._count_once(job.sink)
                if job.gone or counts[row] >= job.settings.max_new_tokens:
                    out.append(row)
            return out

        first = jobs[0].settings
        with self.lock, torch.inference_mode():
            return self.answerer.generate_many(
                [job.question for job in jobs], max_new_tokens=max(j.settings.max_new_tokens for j in jobs),
                temperature=first.temperature, top_p=first.top_p, seed=first.seed, on_token=on_token,
                cancelled=cancelled)


def sse(event: str, data: Any) -> str:
    """One Server-Sent Event (the JSON holds no raw newline: one data line)."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
