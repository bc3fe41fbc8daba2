"""A queue that scores the requests which arrive together in one model call.

Requests go on a queue; one worker thread takes everything waiting (up to ``max_batch``, after
waiting at most ``max_wait`` seconds for more to join the first) and hands it to ``score`` in one
call. While the model scores one batch the next requests pile up, so under load batches grow by
themselves and an idle server answers a lone request at once.

``score(payloads) -> results`` gets the payloads in arrival order and returns one result per
payload. When it raises on a batch of several, the payloads are scored again one by one, so a
request that breaks the model fails alone and never takes its neighbours with it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")


class QueueFull(Exception):
    """More requests are waiting than the queue takes."""


@dataclass
class Scored(Generic[R]):
    result: R
    queue_s: float  # from submit() to the start of its batch
    model_s: float  # the batch's score() call
    batch_size: int


@dataclass
class _Job:
    payload: Any
    future: Future
    submitted: float = field(default_factory=time.perf_counter)


_STOP = object()


class BatchQueue(Generic[P, R]):
    def __init__(self, score: Callable[[Sequence[P]], Sequence[R]], max_batch: int = 32,
                 max_wait: float = 0.0, max_queue: int = 1024, name: str = "flipvqa-batcher"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {max_batch})")
        self.score, self.max_batch, self.max_wait, self.max_queue = score, max_batch, max_wait, max_queue
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.batches = self.questions = self.largest_batch = self.failed_batches = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the caller's side
    def submit(self, payload: P) -> "Future[Scored[R]]":
        """Queue ``payload``; the future gets a :class:`Scored` (or score()'s exception)."""
        if not self._thread.is_alive():
            raise RuntimeError("the scoring worker is not running")
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} questions are waiting")
        job = _Job(payload, Future())
        self._queue.put(job)
        return job.future

    def __call__(self, payload: P, timeout: Optional[float] = None) -> Scored[R]:
        """Queue ``payload`` and wait for its result."""
        return self.submit(payload).result(timeout)

    def stats(self) -> dict:
        with self._lock:
            return {"batches": self.batches, "questions": self.questions, "largest_batch": self.largest_batch,
                    "failed_batches": self.failed_batches, "queued": self._queue.qsize(),
                    "max_batch": self.max_batch}

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Score what is queued, then stop the worker."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _take(self) -> tuple[list[_Job], bool]:
        """The next batch (blocking for its first job), and whether a stop was seen."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        jobs, deadline = [first], time.perf_counter() + self.max_wait
        while len(jobs) < self.max_batch:
            try:
                left = deadline - time.perf_counter()
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            jobs, stop = self._take()
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if jobs:
                try:
                    self._run(jobs)
                except BaseException as exc:  # never let the worker die with callers waiting
                    log.exception("scoring worker: unexpected error")
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)

    def _run(self, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            results = list(self.score([j.payload for j in jobs]))
            if len(results) != len(jobs):
                raise RuntimeError(f"score() returned {len(results)} results for {len(jobs)} requests")
        except Exception as exc:
            with self._lock:
                self.failed_batches += 1
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            log.warning("a batch of %d failed (%s: %s); scoring its requests one by one",
                        len(jobs), type(exc).__name__, exc)
            for job in jobs:
                self._run([job])
            return
        model_s = time.perf_counter() - start
        with self._lock:
            self.batches += 1
            self.questions += len(jobs)
            self.largest_batch = max(self.largest_batch, len(jobs))
        log.debug("scored a batch of %d in %.1f ms", len(jobs), model_s * 1000)
        for job, result in zip(jobs, results):
            job.future.set_result(Scored(result, start - job.submitted, model_s, len(jobs)))
