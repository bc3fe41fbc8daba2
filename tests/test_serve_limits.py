"""``flipvqa serve``'s limits and guards: chunked bodies stop at the limit, text that is no text,
repeated choices, what fits the model, a form that names an example, and the access token.

The app runs in this process on the demo model (loaded once): through Starlette's test client,
through uvicorn on a free port, or called as an ASGI app with a body that counts what was read.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import types
from pathlib import Path

import pytest
from test_serve import ASSETS, CHECKPOINT, app_server, assert_one_line_error, httpx  # skips without the serve extra

pytestmark = pytest.mark.skipif(not CHECKPOINT.is_file(), reason="the demo model is not built "
                                                                 "(python scripts/build_demo_checkpoint.py)")
CHUNK = 1 << 16
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def answerer():
    from flipvqa.ask import Answerer

    return Answerer(CHECKPOINT, llama_model_path=str(ASSETS), model="demo-llama", device="cpu")


def make_backend(answerer, uploads: bool = False, **kwargs):
    """A Backend on the shared model; with ``uploads`` it takes videos (decoding is never reached here)."""
    from flipvqa.serve.backend import Backend, demo_examples

    cls = type("UploadBackend", (Backend,), {"uploads": True}) if uploads else Backend
    return cls(answerer, CHECKPOINT, demo_examples(ASSETS), **kwargs)


@pytest.fixture
def client(answerer):
    """(backend, client) for an app with a token and one without, uploads taken."""
    from starlette.testclient import TestClient

    from flipvqa.serve.app import create_app

    backend = make_backend(answerer, uploads=True, max_upload_mb=1)
    yield backend, TestClient(create_app(backend)), TestClient(create_app(backend, TOKEN))
    backend.close()


def asgi_post(app, path: str, headers: dict, chunks) -> tuple[int, dict, int]:
    """POST ``chunks`` (an iterable of bytes, sent as they are asked for) to the ASGI ``app``; its
    status, JSON body and how many bytes of the body it read."""
    source, read, out = iter(chunks), [0], {"status": 0, "body": b""}

    async def receive():
        chunk = next(source, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        read[0] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return out["status"], json.loads(out["body"]), read[0]


def deleted_files() -> set[str]:
    """This process's open files that have no name any more (a spooled upload on disk)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with_target = os.path.join("/proc/self/fd", fd)
        try:
            target = os.readlink(with_target)
        except OSError:
            continue
        if target.endswith("(deleted)"):
            out.add(f"{fd}:{target}")
    return out


def video_form(fields: str, total: int):
    """A multipart body, chunk by chunk: the text ``fields`` then a video of ``total`` zero bytes."""
    yield (fields + "--zz\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\n\r\n").encode()
    for _ in range(total // CHUNK):
        yield b"\0" * CHUNK
    yield b"\r\n--zz--\r\n"


CHUNKED_JSON = {"content-type": "application/json", "transfer-encoding": "chunked"}
CHUNKED_FORM = {"content-type": "multipart/form-data; boundary=zz", "transfer-encoding": "chunked"}


def test_chunked_bodies_stop_at_the_limit(answerer):
    """No Content-Length: a JSON body stops at 1 MB, an upload at --max_upload_mb + 1 MB (its
    partial file closed, so deleted), both 413; without the token nothing is read at all."""
    from flipvqa.serve.app import create_app
    from flipvqa.serve.body import FORM_SLACK, MAX_JSON_BYTES

    backend = make_backend(answerer, uploads=True, max_upload_mb=1)
    try:
        app = create_app(backend)
        status, body, read = asgi_post(app, "/api/ask", CHUNKED_JSON, (b"[" * CHUNK for _ in range(128)))  # 8 MB
        assert status == 413 and "at most 1048576" in body["error"], body
        assert read <= MAX_JSON_BYTES + CHUNK
        before = deleted_files()
        upload = video_form(form_fields(("question", "why?")), 8 << 20)
        status, body, read = asgi_post(app, "/api/ask", CHUNKED_FORM, upload)
        assert status == 413 and "--max_upload_mb 1" in body["error"], body
        assert read <= backend.max_upload_bytes + FORM_SLACK + CHUNK
        assert deleted_files() <= before  # the spooled video is closed
        status, body, read = asgi_post(create_app(backend, TOKEN), "/api/ask", CHUNKED_FORM, video_form("", 8 << 20))
        assert status == 401 and read == 0
    finally:
        backend.close()

    with app_server(make_backend(answerer)) as url:  # over HTTP, uvicorn's answer reaches the client
        response = httpx.post(url + "/api/ask", content=(b"[" * CHUNK for _ in range(64)),
                              headers={"Content-Type": "application/json"}, timeout=60)
        assert_one_line_error(response, 413, "at most")


FORM_HEAD = "--zz\r\nContent-Disposition: form-data; name=\"{}\"\r\n\r\n{}\r\n"


def form_fields(*pairs: tuple[str, str]) -> str:
    return "".join(FORM_HEAD.format(name, value) for name, value in pairs)


def test_text_that_is_no_text_and_deep_nesting_get_one_line_400s(client):
    backend, plain, _ = client
    first = next(iter(backend.examples))
    for raw, words in [
        ('{"example": "%s", "question": "what \\ud800?", "choices": ["a", "b"]}', "question holds a lone"),
        ('{"example": "%s", "question": "what?", "choices": ["a", "b\\udfff"]}', "choice 2 holds a lone"),
        ('{"example": "%s", "question": "what \\ud800?"}', "question holds a lone"),  # in words
        ('{"example": "%s\\ud800"}', "unknown example"),
    ]:
        for route in ("/api/ask", "/api/ask/stream"):
            response = plain.post(route, content=(raw % first).encode(), headers={"Content-Type": "application/json"})
            assert_one_line_error(response, 404 if "unknown" in words else 400, words)
    for raw in (b"[" * 100_000, b'{"example": ' + b"[" * 100_000):
        assert_one_line_error(plain.post("/api/ask", content=raw, headers={"Content-Type": "application/json"}),
                              400, "too deeply")
    # Form fields: UTF-7 spells a lone surrogate ("+2AA-"); a sampling field nests 100,000 deep.
    utf7 = {"content-type": "multipart/form-data; boundary=zz; charset=utf-7"}
    for fields, words in [(form_fields(("question", "what +2AA-?")), "question holds a lone"),
                          (form_fields(("question", "what?"), ("choices", "a"), ("choices", "b +3/8-")), "choice 2"),
                          (form_fields(("question", "what?"), ("seed", "[" * 100_000)), "seed")]:
        status, body, _ = asgi_post(plain.app, "/api/ask", utf7, [*video_form(fields, 0)])
        assert status == 400 and words in body["error"] and "\n" not in body["error"], body

    def unreadable(video):  # what decoding says of a file that is no video: its name
        from flipvqa.serve.checks import RequestError

        raise RequestError(400, f"{video.name}: not a readable video")

    backend.decode = unreadable
    named = [*video_form(form_fields(("question", "what?")), 0)]
    named[0] = named[0].replace(b'filename="v.mp4"', b'filename="v+2AA-.mp4"')  # a file name too
    status, body, _ = asgi_post(plain.app, "/api/ask", utf7, named)
    assert status == 400 and body["error"].startswith("v") and "readable" in body["error"], body


def test_repeated_choices_are_refused(client):
    backend, plain, _ = client
    first = next(iter(backend.examples))
    for choices, words in [(["a", "a"], "choices 1 and 2"), (["cooking", "Running", " running "], "choices 2 and 3"),
                           (["x", "COOKING", "y", "cooking"], "choices 2 and 4")]:
        response = plain.post("/api/ask", json={"example": first, "question": "what?", "choices": choices})
        assert_one_line_error(response, 400, words)
        assert "same answer" in response.json()["error"]
    fields = form_fields(("question", "what?"), ("choices", "a dog"), ("choices", "A dog"))
    status, body, _ = asgi_post(plain.app, "/api/ask", CHUNKED_FORM, [*video_form(fields, 0)])
    assert status == 400 and "choices 1 and 2" in body["error"], body
    different = plain.post("/api/ask", json={"example": first, "question": "what?", "choices": ["a", "b"]})
    assert different.status_code == 200, different.text


def test_a_form_that_names_an_example_is_told_to_send_json(answerer):
    from starlette.testclient import TestClient

    from flipvqa.serve.app import create_app

    for uploads in (False, True):
        backend = make_backend(answerer, uploads=uploads)
        try:
            first = next(iter(backend.examples))
            response = TestClient(create_app(backend)).post(
                "/api/ask", data={"example": first, "question": "why?", "choices": ["a", "b"]},
                files={"subtitles": ("a.srt", b"", "text/plain")})
            assert_one_line_error(response, 400, "JSON body")
            assert "--clip_model" not in response.json()["error"]
        finally:
            backend.close()


def test_health_says_what_fits_and_too_many_choices_say_so(client, answerer):
    import torch

    from flipvqa.ask import Question
    from flipvqa.errors import FlipVQAError

    backend, plain, _ = client
    health = plain.get("/api/health").json()
    most = health["max_choices"]
    assert health["max_seq_len"] == answerer.args.max_seq_len == 128 and 2 <= most < 26
    blank = torch.zeros(1, answerer.feature_dim)
    letters = [chr(ord("a") + k) for k in range(26)]
    answerer.check(Question(blank, "?", letters[:most]))  # the bound is the model's own check
    with pytest.raises(FlipVQAError, match="--max_seq_len"):
        answerer.check(Question(blank, "?", letters[:most + 1]))
    first = next(iter(backend.examples))
    response = plain.post("/api/ask", json={"example": first, "question": "what?",
                                            "choices": [f"c{k}" for k in range(26)]})
    assert_one_line_error(response, 400, "--max_seq_len 128")
    assert f"at most {most} one-word choices" in response.json()["error"]
    fields = form_fields(("question", "what?"), *[("choices", f"c{k}") for k in range(most + 1)])
    status, body, _ = asgi_post(plain.app, "/api/ask", CHUNKED_FORM, [*video_form(fields, 0)])
    assert status == 400 and "max_choices" in body["error"], body  # before the video is decoded


def test_the_token_guards_every_api_route_but_health(client):
    backend, plain, guarded = client
    first = next(iter(backend.examples))
    assert plain.get("/api/health").json()["token_required"] is False
    health = guarded.get("/api/health")
    assert health.status_code == 200 and health.json()["token_required"] is True
    for page in ("/", "/static/token.js", "/static/app.js"):  # the page asks for the token itself
        assert guarded.get(page).status_code == 200
    good = {"Authorization": f"Bearer {TOKEN}"}
    for header, words in [({}, "needs its access token"), ({"Authorization": "Bearer nope"}, "wrong"),
                          ({"Authorization": f"Basic {TOKEN}"}, "needs its access token"),
                          ({"Authorization": f"Bearer {TOKEN}x"}, "wrong")]:
        for method, route in [("GET", "/api/examples"), ("POST", "/api/ask"), ("POST", "/api/ask/stream"),
                              ("GET", "/api/nothing")]:
            response = guarded.request(method, route, json={"example": first}, headers=header)
            assert_one_line_error(response, 401, words)
            assert response.headers["www-authenticate"] == "Bearer"
    assert guarded.get("/api/examples", headers=good).status_code == 200
    assert guarded.post("/api/ask", json={"example": first}, headers=good).json()["choice"]
    assert guarded.post("/api/ask", json={"example": first}, headers={"authorization": f"bearer  {TOKEN} "}
                        ).status_code == 200
    streamed = guarded.post("/api/ask/stream", json={"example": first, "question": "why?", "max_new_tokens": 2},
                            headers=good)
    assert streamed.status_code == 200 and "event: done" in streamed.text


def test_serve_takes_the_token_and_warns_when_exposed_without_one(monkeypatch, capsys):
    """--token or FLIPVQA_TOKEN reach the app; another host than loopback without one: one warning line."""
    import flipvqa.serve as serve
    from flipvqa.cli import main

    made = []
    monkeypatch.setattr(serve, "check_port", lambda host, port: None)
    monkeypatch.setattr(serve, "load_backend", lambda ns, settings: types.SimpleNamespace(
        checkpoint="demo.pth", answerer=types.SimpleNamespace(args=types.SimpleNamespace(model="demo"))))
    monkeypatch.setattr("flipvqa.serve.app.create_app", lambda backend, token=None: made.append(token))
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: None)
    monkeypatch.delenv("FLIPVQA_TOKEN", raising=False)
    cases = [(["--host", "0.0.0.0"], {}, None, 1), (["--host", "192.168.1.5", "--token", "abc"], {}, "abc", 0),
             (["--host", "0.0.0.0"], {"FLIPVQA_TOKEN": "env-tok"}, "env-tok", 0), ([], {}, None, 0),
             (["--host", "::1"], {}, None, 0), (["--host", "localhost"], {}, None, 0),
             (["--host", "127.0.0.2", "--token", "flag"], {"FLIPVQA_TOKEN": "env"}, "flag", 0)]
    for flags, env, token, warnings in cases:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        assert main(["serve", *flags]) == 0
        assert made.pop() == token, flags
        said = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert len(said) == warnings and all("--token" in line for line in said), said
        for name in env:
            monkeypatch.delenv(name)
    assert main(["serve", "--token", "two words"]) != 0 and not made  # refused before the model loads


def test_the_page_asks_for_the_token_once_and_sends_it(answerer, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    backend = make_backend(answerer)
    most = backend.max_choices
    with app_server(backend, TOKEN) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors, sent = [], []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda r: sent.append((r.url.split("/api/")[-1], r.headers.get("authorization")))
                    if "/api/" in r.url else None)
            page.goto(url + "/")
            page.wait_for_selector("#token-dialog[open]")
            Path("/tmp/serve_page_token.png").write_bytes(page.screenshot(path=str(tmp_path / "token.png")))
            page.fill("#token-input", "wrong")
            page.click("#token-use")
            page.wait_for_selector("#token-error:not([hidden])")  # refused: asked again
            assert "refused" in page.inner_text("#token-error")
            page.fill("#token-input", TOKEN)
            page.click("#token-use")
            page.wait_for_selector("#example option", state="attached")
            assert f"{most} one-word choices" in page.inner_text("#choices-hint")
            page.click("#ask")
            page.wait_for_selector('#result[data-state="done"]', timeout=30_000)
            page.click("#mode-words")
            page.fill("#question", "what happens first?")
            page.click("#ask")  # streamed
            page.wait_for_selector('#result[data-state="done"]', timeout=30_000)
            page.reload()  # the tab keeps the token: no second prompt
            page.wait_for_selector('#result[data-state="done"]', timeout=30_000)
            assert not page.locator("#token-dialog[open]").count()
            Path("/tmp/serve_page_after_token.png").write_bytes(page.screenshot(full_page=True))
            assert not errors, errors
        finally:
            browser.close()
    assert ("examples", f"Bearer {TOKEN}") in sent and ("ask", f"Bearer {TOKEN}") in sent
    assert ("ask/stream", f"Bearer {TOKEN}") in sent and ("examples", "Bearer wrong") in sent
    assert ("health", None) in sent  # open: the page asks it first, without a token
