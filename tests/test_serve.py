"""``flipvqa serve``: the real server on a free port, its API, its batching, its errors and its page.

The demo server (no --resume: the bundled demo model and examples) is started once for the module;
a second one with a tiny random CLIP answers uploads. Answers are checked against
``python -m flipvqa ask --json`` for the same input.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")
httpx = pytest.importorskip("httpx")

from flipvqa.cli import main  # noqa: E402
from flipvqa.demo import ASSETS  # noqa: E402
from flipvqa.serve.launch import ServerProcess  # noqa: E402

try:  # a generated video and a tiny random CLIP folder, for uploads
    from test_features import make_video, tiny_clip  # noqa: F401  (the fixture is reused)
except pytest.skip.Exception:  # no PyAV: everything but uploads still runs
    @pytest.fixture(scope="module")
    def tiny_clip():
        pytest.skip("uploads need PyAV (pip install av)")

CHECKPOINT = ASSETS / "checkpoint.pth"
FEATURES = ASSETS / "examples.pth"
ASK = [sys.executable, "-m", "flipvqa", "ask", "--resume", str(CHECKPOINT), "--llama_model_path", str(ASSETS),
       "--model", "demo-llama", "--device", "cpu", "--json"]

pytestmark = pytest.mark.skipif(not CHECKPOINT.is_file(), reason="the demo model is not built "
                                                                 "(python scripts/build_demo_checkpoint.py)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess([], log=log) as running:
        yield running
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def examples(server):
    return httpx.get(server.url + "/api/examples").json()


def questions(examples: list[dict]) -> list[dict]:
    """Requests over several examples: their own questions, and own questions with 3 and 7 choices."""
    own = [{"example": e["id"]} for e in examples[:4]]
    return own + [
        {"example": examples[0]["id"], "question": "which activity comes last", "choices": ["cooking", "running",
                                                                                              "sleeping"]},
        {"example": examples[1]["id"], "question": "what does the person do first?",
         "choices": ["eating", "washing", "reading", "writing", "singing", "dancing", "swimming"]},
    ]


def ask_flags(example: dict, request: dict, png: Path) -> list[str]:
    """``flipvqa ask`` flags (after ``ask``) for the same features, question and choices."""
    question = request.get("question", example["question"])
    choices = request.get("choices", example["choices"])
    return [*ASK[4:], example["video"], "--features", str(FEATURES), "--question", question, "--choices", *choices,
            "--explain", str(png)]


def cli_answers(by_id: dict, requests: list[dict], tmp: Path, capsys) -> list[dict]:
    """What ``flipvqa ask --json --explain`` answers: the first request through ``python -m flipvqa
    ask``, the others through the same entry point in this process (a process each is ~5 s)."""
    flags = [ask_flags(by_id[r["example"]], r, tmp / f"{k}.png") for k, r in enumerate(requests)]
    process = subprocess.Popen([*ASK[:4], *flags[0]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answers = []
    for args in flags[1:]:
        capsys.readouterr()
        assert main(["-q", "ask", *args]) == 0
        answers.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return [json.loads(out.strip().splitlines()[-1]), *answers]


def assert_same(got: dict, want: dict) -> None:
    assert got["choice"] == want["choice"] and got["index"] == want["index"]
    assert got["n_frames"] == want["n_frames"]
    assert [r["choice"] for r in got["ranked"]] == [r["choice"] for r in want["ranked"]]
    for g, w in zip(got["ranked"], want["ranked"]):
        assert g["probability"] == pytest.approx(w["probability"], abs=1e-5)
        assert g["score"] == pytest.approx(w["score"], abs=1e-5)
    assert got["frame_attention"] == pytest.approx(want["frame_attention"], abs=1e-5)


def post(server, body, **kwargs) -> httpx.Response:
    return httpx.post(server.url + "/api/ask", json=body, timeout=60, **kwargs)


def test_health_and_examples(server, examples):
    health = httpx.get(server.url + "/api/health").json()
    assert health["status"] == "ok" and health["model"] == "demo-llama"
    assert Path(health["checkpoint"]) == CHECKPOINT.resolve() and health["uploads"] is False
    bundled = json.loads((ASSETS / "examples.json").read_text())
    assert [e["id"] for e in examples] == [e["id"] for e in bundled]
    for example, entry in zip(examples, bundled):
        assert example["question"] == entry["question"] and example["choices"] == entry["choices"]
        assert example["frames"] == entry["frames"] and example["n_frames"] > 0


def test_answers_equal_flipvqa_ask_also_when_batched(server, examples, tmp_path, capsys):
    by_id = {e["id"]: e for e in examples}
    requests = questions(examples)
    want = cli_answers(by_id, requests, tmp_path, capsys)
    sequential = []
    for request, expected in zip(requests, want):
        response = post(server, request)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert_same(answer, expected)
        assert set(answer["timings"]) == {"queue", "model", "total"}
        assert answer["frames"] == by_id[request["example"]]["frames"]
        assert answer["question"] == request.get("question", by_id[request["example"]]["question"])
        sequential.append(answer)
    assert ("correct" in sequential[0]) and ("correct" not in sequential[-1])  # own question: the dataset's answer

    # 20 concurrent requests over all of them, released together: each gets its own answer.
    burst = [i % len(requests) for i in range(20)]
    for attempt in range(3):
        before = httpx.get(server.url + "/api/health").json()
        gate = threading.Barrier(len(burst))

        def one(i):
            gate.wait()
            return post(server, requests[i])

        with ThreadPoolExecutor(len(burst)) as pool:
            responses = list(pool.map(one, burst))
        after = httpx.get(server.url + "/api/health").json()
        for i, response in zip(burst, responses):
            assert response.status_code == 200, response.text
            assert_same(response.json(), sequential[i])
        assert after["questions"] - before["questions"] == len(burst)
        if after["batches"] - before["batches"] < len(burst):
            break  # some were scored together
    else:
        pytest.fail(f"20 concurrent requests were never scored together: {after}")
    assert after["largest_batch"] > 1 and max(r.json()["batch_size"] for r in responses) > 1


BAD_JSON = [
    ({"example": "no-such-example"}, 404, "unknown example"),
    ({"example": 7}, 400, "string"),
    ({"question": "why?"}, 400, "example"),
    ({"example": "{first}", "choices": ["only one"]}, 400, "2 to 26"),
    ({"example": "{first}", "choices": [f"choice {k}" for k in range(27)]}, 400, "2 to 26"),
    ({"example": "{first}", "choices": "a, b"}, 400, "list of strings"),
    ({"example": "{first}", "choices": ["a", 2]}, 400, "list of strings"),
    ({"example": "{first}", "choices": ["a", "  "]}, 400, "empty"),
    ({"example": "{first}", "question": ""}, 400, "empty"),
    ({"example": "{first}", "question": ["why"]}, 400, "string"),
    ({"example": "{first}", "choice": ["a", "b"]}, 400, "unknown field"),
    ({"example": "{first}", "question": "why " * 300}, 400, "max_seq_len"),  # no answer token would fit
    ([{"example": "{first}"}], 400, "JSON object"),
    ("an example", 400, "JSON object"),
]


def assert_one_line_error(response: httpx.Response, status: int, words: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    assert words.lower() in body["error"].lower(), body["error"]


def test_bad_requests_get_one_line_errors(server, examples):
    first = examples[0]["id"]
    for body, status, words in BAD_JSON:
        text = json.dumps(body).replace("{first}", first)
        response = httpx.post(server.url + "/api/ask", content=text, headers={"Content-Type": "application/json"})
        assert_one_line_error(response, status, words)
    for raw, words in [(b"example=1", "not JSON"), (b"{\"example\": ", "not JSON"), (b"", "empty"),
                       (b"\xff\xfe{", "not JSON")]:
        assert_one_line_error(httpx.post(server.url + "/api/ask", content=raw), 400, words)
    upload = httpx.post(server.url + "/api/ask", data={"question": "why?", "choices": ["a", "b"]},
                        files={"video": ("v.mp4", b"not a video", "video/mp4")})
    assert_one_line_error(upload, 400, "--clip_model")
    assert_one_line_error(httpx.get(server.url + "/no/such/page"), 404, "not found")
    assert_one_line_error(httpx.get(server.url + "/api/ask"), 405, "not allowed")
    assert_one_line_error(httpx.delete(server.url + "/api/health"), 405, "not allowed")
    assert_one_line_error(httpx.get(server.url + "/static/secret.py"), 404, "not found")
    health = httpx.get(server.url + "/api/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert post(server, {"example": first}).status_code == 200


def test_page_is_self_contained(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in ("app.js", "style.css"):
        asset = httpx.get(f"{server.url}/static/{name}")
        assert asset.status_code == 200 and name in page.text
        assert "http://" not in asset.text and "https://" not in asset.text and "@import" not in asset.text
    assert "http://" not in page.text and "https://" not in page.text


def test_an_internal_error_is_a_logged_json_500(caplog):
    """A bug behind a route: 500, one line of JSON, the traceback in the server's log only."""
    from starlette.testclient import TestClient

    from flipvqa.serve.app import create_app

    class Broken:
        def example_question(self, body):
            raise KeyError("a bug")

    client = TestClient(create_app(Broken()), raise_server_exceptions=False)
    assert_one_line_error(client.post("/api/ask", json={"example": "x"}), 500, "internal error")
    assert "KeyError" in caplog.text and "Traceback" in caplog.text


def test_batch_queue_scores_what_waits_together_and_isolates_failures():
    from flipvqa.serve.batching import BatchQueue

    started, release, calls = threading.Event(), threading.Event(), []

    def score(payloads):
        started.set()
        release.wait(10)
        calls.append(list(payloads))
        if "bad" in payloads:
            raise ValueError("bad payload")
        return [p.upper() for p in payloads]

    queue = BatchQueue(score, max_batch=3)
    first = queue.submit("a")
    assert started.wait(10)  # the worker scores "a" alone; the others queue up meanwhile
    rest = [queue.submit(p) for p in ("b", "bad", "c", "d", "e")]
    release.set()
    assert first.result(10).result == "A"
    results = []
    for future in rest:
        try:
            results.append(future.result(10).result)
        except ValueError as err:
            results.append(str(err))
    assert results == ["B", "bad payload", "C", "D", "E"]
    # what waited went together (up to max_batch); the failed batch again one by one
    assert calls == [["a"], ["b", "bad", "c"], ["b"], ["bad"], ["c"], ["d", "e"]]
    assert rest[-1].result().batch_size == 2
    stats = queue.stats()
    assert (stats["batches"], stats["questions"], stats["largest_batch"], stats["failed_batches"]) == (4, 5, 2, 2)
    queue.close()
    assert not queue.alive


def test_ask_many_equals_ask():
    """One batch over questions with different numbers of choices gives each one's own numbers."""
    import torch

    from flipvqa.ask import Answerer, Question

    answerer = Answerer(CHECKPOINT, llama_model_path=str(ASSETS), model="demo-llama", device="cpu")
    feats = torch.load(FEATURES, weights_only=True)
    examples = json.loads((ASSETS / "examples.json").read_text())
    asked = [Question(feats[e["video"]].float(), e["question"], e["choices"][:2 + k % 4])
             for k, e in enumerate(examples)]
    batched = answerer.ask_many(asked, explain=True)
    for request, many in zip(asked, batched):
        one = answerer.ask(*request, explain=True)
        assert many.choice == one.choice and len(many.ranked) == len(request.choices)
        for (c1, p1, s1), (c2, p2, s2) in zip(many.ranked, one.ranked):
            assert c1 == c2 and p1 == pytest.approx(p2, abs=1e-5) and s1 == pytest.approx(s2, abs=1e-5)
        assert many.frame_attention == pytest.approx(one.frame_attention, abs=1e-5)
    assert answerer.ask_many([]) == []


# ---------------------------------------------------------------------- uploads


@pytest.fixture(scope="module")
def clip_server(tmp_path_factory, tiny_clip):
    log = tmp_path_factory.mktemp("serve-clip") / "server.log"
    with ServerProcess(["--clip_model", str(tiny_clip), "--max_upload_mb", "1", "--max_seconds", "5"],
                       log=log) as running:
        yield running


def upload(server, video: bytes, question="what happens first?", choices=("a dog runs", "a cat sleeps", "rain"),
           name="clip.mp4", subtitles: bytes | None = None) -> httpx.Response:
    files = [("video", (name, video, "video/mp4"))]
    if subtitles is not None:
        files.append(("subtitles", ("clip.srt", subtitles, "application/x-subrip")))
    data = {"choices": list(choices)} if question is None else {"question": question, "choices": list(choices)}
    return httpx.post(server.url + "/api/ask", data=data, files=files, timeout=120)


def test_upload_a_video(clip_server, tiny_clip, tmp_path):
    video = make_video(tmp_path / "clip.mp4", 50, noise=True)  # 2 s: 2 frames at 1 fps
    response = upload(clip_server, video.read_bytes())
    assert response.status_code == 200, response.text
    answer = response.json()
    out = subprocess.run([*ASK, str(video), "--clip_model", str(tiny_clip), "--question", "what happens first?",
                          "--choices", "a dog runs", "a cat sleeps", "rain", "--explain", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert_same(answer, json.loads(out.stdout.strip().splitlines()[-1]))
    assert answer["n_frames"] == 2 and answer["video"] == "clip.mp4"
    thumbs = answer["thumbnails"]
    assert len(thumbs) == len(answer["frame_attention"]) and thumbs[2] is None
    assert all(t.startswith("data:image/jpeg;base64,") for t in thumbs[:2])
    assert set(answer["timings"]) == {"queue", "model", "video", "total"}

    srt = b"1\n00:00:00,000 --> 00:00:01,500\nA dog barks.\n\n2\n00:00:01,500 --> 00:00:02,000\nIt runs.\n"
    assert upload(clip_server, video.read_bytes(), subtitles=srt).status_code == 200

    long_video = make_video(tmp_path / "long.mp4", 80, rate=10)  # 8 s > --max_seconds 5
    assert_one_line_error(upload(clip_server, long_video.read_bytes()), 413, "--max_seconds")
    assert_one_line_error(upload(clip_server, b"\x00" * (2 << 20)), 413, "--max_upload_mb")
    assert_one_line_error(upload(clip_server, b"this is not a video at all"), 400, "clip.mp4")
    assert_one_line_error(upload(clip_server, video.read_bytes(), choices=["only one"]), 400, "2 to 26")
    assert_one_line_error(upload(clip_server, video.read_bytes(), question=None), 400, "question")
    no_video = httpx.post(clip_server.url + "/api/ask", data={"question": "why?", "choices": ["a", "b"]},
                          files={"subtitles": ("a.srt", srt, "text/plain")})
    assert_one_line_error(no_video, 400, "video")
    assert clip_server.health()["status"] == "ok"


# ---------------------------------------------------------------------- the page in a browser


def test_the_page_in_headless_chromium(server, examples, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    first, second = examples[0], examples[2]
    want = {e["id"]: post(server, {"example": e["id"]}).json()["choice"] for e in (first, second)}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}/?example={first['id']}")
            page.wait_for_selector('#result[data-state="done"]', timeout=30_000)
            assert page.inner_text("#top-choice") == want[first["id"]]
            assert page.locator("#ranked .row").count() == len(first["choices"])
            assert page.locator("#frames .slot").count() > 0

            page.goto(server.url + "/")
            page.wait_for_selector(f'#example option[value="{second["id"]}"]', state="attached")
            page.select_option("#example", second["id"])
            assert page.input_value("#question") == second["question"]
            page.click("#ask")
            page.wait_for_selector('#result[data-state="done"]', timeout=30_000)
            assert page.inner_text("#top-choice") == want[second["id"]]
            assert f"example={second['id']}" in page.url  # the link shares the result
            shot = page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            Path("/tmp/serve_page.png").write_bytes(shot)
            assert not errors, errors
        finally:
            browser.close()
