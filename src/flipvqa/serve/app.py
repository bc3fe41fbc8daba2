"""The FastAPI application of ``flipvqa serve``: the JSON API and the page.

Every error is a JSON object ``{"error": "<one line>"}``: 4xx for a bad request (the message says
what to fix), 500 for a bug in the server (the traceback goes to the server's log, never to the
client). The routes are ``async`` and wait on the batch queues' futures, so a thousand waiting
requests hold no threads; decoding an upload runs in the thread pool. Bodies are read within their
limits (:mod:`flipvqa.serve.body`), chunked ones too; with an access token every API route but
``/api/health`` is behind :class:`~flipvqa.serve.auth.TokenGate`.

``/api/ask/stream`` answers a free question as Server-Sent Events: ``token`` events as the model
generates them, then ``done`` with what ``/api/ask`` returns (or ``error``). The response starts
with the first token, so a request that fails before it (a question too long for the model) is
a plain JSON 4xx like everywhere else. A question with choices gets its answer as one ``done``
event. When the client goes away mid-stream, its row leaves the generation batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import FlipVQAError
from .auth import TokenGate
from .backend import Backend, Upload
from .batching import QueueFull
from .body import FORM_SLACK, BodyTooLarge, read_form, read_json
from .checks import RequestError, one_line
from .words import FIELDS, SettingsError, TokenSink, form_settings, sse

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PAGE_FILES = {"app.js": "text/javascript", "words.js": "text/javascript", "token.js": "text/javascript",
              "style.css": "text/css"}
API = "GET /api/health, GET /api/examples, POST /api/ask, POST /api/ask/stream"
# No caching, and no buffering by a proxy (nginx): each event goes out as it is written.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


def guarded(route):
    """Turn a route's errors into JSON: RequestError/FlipVQAError 4xx, anything else a logged 500."""
    @functools.wraps(route)
    async def wrapper(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except RequestError as err:
            return error(err.status, str(err))
        except FlipVQAError as err:
            return error(400, str(err))
        except QueueFull as err:
            return error(503, f"the server is busy ({err}); try again in a moment")
        except HTTPException:
            raise
        except Exception as err:
            log.exception("%s: internal error", route.__name__)
            return error(500, f"internal error ({type(err).__name__}); the server's log has the details")
    return wrapper


def create_app(backend: Backend, token: Optional[str] = None) -> FastAPI:
    """The app; with ``token`` every API route but /api/health needs it (:class:`TokenGate`)."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        backend.close()  # answer what is queued, then stop the workers

    app = FastAPI(title="Flipped-VQA", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.backend = backend
    if token is not None:
        app.add_middleware(TokenGate, token=token)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            message = f"not found: {request.url.path} (the API: {API})"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        return error(422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("internal error on %s %s: %r", request.method, request.url.path, exc)
        return error(500, f"internal error ({type(exc).__name__}); the server's log has the details")

    @app.get("/api/health")
    @guarded
    async def health():
        out = {**backend.health(), "token_required": token is not None}
        return JSONResponse(out, status_code=200 if out["status"] == "ok" else 503)

    @app.get("/api/examples")
    @guarded
    async def examples():
        return backend.example_list()

    @app.post("/api/ask")
    @guarded
    async def ask(request: Request):
        started = time.perf_counter()
        async with asked(request) as (question, extra, settings):
            scored = await asyncio.wrap_future(backend.submit(question, settings))
        return backend.answer_dict(scored, extra, started, settings)

    @app.post("/api/ask/stream")
    @guarded
    async def ask_stream(request: Request):
        started = time.perf_counter()
        async with asked(request) as (question, extra, settings):
            if settings is None:  # choices: the whole answer is one event
                scored = await asyncio.wrap_future(backend.submit(question, None))
                return event_stream(one_event(sse("done", backend.answer_dict(scored, extra, started))))
            sink = TokenSink(asyncio.get_running_loop())
            backend.submit(question, settings, sink)
            try:
                first = await sink.next()  # (the upload's files are read by then)
            except BaseException:
                backend.words.cancel(sink)
                raise
            if first[0] == "done":
                first[1].result()  # a failure before the first token: raised, a JSON 4xx
        return event_stream(words_events(sink, first, lambda scored: backend.answer_dict(scored, extra, started,
                                                                                         settings)))

    async def words_events(sink: TokenSink, item: tuple, finish):
        ended = False
        try:
            while item[0] == "token":
                yield sse("token", item[1])
                item = await sink.next()
            ended = True
            yield done_event(item[1], finish)
        finally:
            if not ended:  # the client went away (the response was cancelled): free its row
                backend.words.cancel(sink)

    @contextlib.asynccontextmanager
    async def asked(request: Request):
        """The request's (question, extra, settings): JSON about an example, or an upload (whose
        files live until the block ends). ``settings`` is None for a question with choices."""
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            async with uploaded(request) as out:
                yield out
            return
        body = await read_json(request)
        question, extra = backend.example_question(body)
        yield question, extra, backend.sampling(not question.choices, body)

    @contextlib.asynccontextmanager
    async def uploaded(request: Request):
        # Without --clip_model a form carries no video worth reading: read enough to say what is wrong.
        limit = backend.max_upload_bytes + FORM_SLACK if backend.uploads else FORM_SLACK
        try:
            form = await read_form(request, limit)
        except BodyTooLarge as err:
            backend.need_uploads()
            raise backend.too_large(f"the request is {err.amount()}", FORM_SLACK) from None
        try:
            with tempfile.TemporaryDirectory(prefix="flipvqa-serve-") as tmp:
                yield await form_question(form, Path(tmp))
        finally:
            await form.close()

    async def form_question(form, tmp: Path):
        if "example" in form:
            raise RequestError(400, "\"example\" names a bundled example and goes in a JSON body "
                                    "({\"example\": ID, \"question\": ..., \"choices\": [...]} as application/json); "
                                    "form data uploads a video in the field \"video\"")
        backend.need_uploads()
        video, subtitles = form.get("video"), form.get("subtitles")
        if video is None or isinstance(video, str):
            raise RequestError(400, "give the video file as the form field \"video\"")
        if subtitles is not None and isinstance(subtitles, str):
            raise RequestError(400, "\"subtitles\" must be an .srt file")
        unknown = sorted(set(form.keys()) - {"video", "subtitles", "question", "choices", *FIELDS})
        if unknown:
            raise RequestError(400, f"unknown form field {unknown[0]!r} (give video, question, choices, subtitles, "
                                    f"{', '.join(FIELDS)})")
        questions = form.getlist("question")
        if len(questions) != 1:
            raise RequestError(400, "give one \"question\" field" + (f" (got {len(questions)})" if questions else ""))
        choices = form.getlist("choices")
        if any(not isinstance(c, str) for c in choices):
            raise RequestError(400, "\"choices\" must be text fields, not files")
        try:  # checked before the video is decoded
            settings = backend.sampling(not choices, form_settings(form))
        except SettingsError as err:
            raise RequestError(400, str(err)) from None
        backend.check_upload_size(video.size)
        name = Path(one_line(video.filename or "video")).name or "video"  # echoed in answers and errors
        upload = Upload(tmp / ("video" + Path(name).suffix[:10]), name, 0)
        upload.size = await run_in_threadpool(save, video.file, upload.path)
        srt = None
        if subtitles is not None:
            srt = tmp / "subtitles.srt"
            await run_in_threadpool(save, subtitles.file, srt)
        question, extra = await run_in_threadpool(backend.video_question, upload, questions[0], choices, srt)
        return question, extra, settings

    @app.get("/")
    async def page():
        return page_file("index.html", "text/html")

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in PAGE_FILES:
            raise HTTPException(404)
        return page_file(name, PAGE_FILES[name])

    return app


def event_stream(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=STREAM_HEADERS)


async def one_event(event: str):
    yield event


def done_event(future, finish) -> str:
    """The last event of a stream: ``done`` with ``finish(scored)``, or ``error``."""
    try:
        return sse("done", finish(future.result()))
    except (RequestError, FlipVQAError) as err:
        return sse("error", {"error": " ".join(str(err).split())})
    except Exception as err:
        log.exception("ask/stream: internal error")
        return sse("error", {"error": f"internal error ({type(err).__name__}); the server's log has the details"})


def page_file(name: str, media_type: str):
    path = STATIC / name
    if not path.is_file():  # an installation without the package's data files
        log.error("%s: missing; the page cannot be shown (the JSON API works)", path)
        return error(500, f"the page's file {name} is missing from this installation of flipvqa "
                          f"({STATIC}); the JSON API under /api/ works")
    return FileResponse(path, media_type=media_type)


def save(source, target: Path) -> int:
    """Copy an uploaded file to ``target``; its size in bytes."""
    source.seek(0)
    with open(target, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
        return out.tell()
