"""``flipvqa serve``: the real server on a free port, its API, its batching, its errors and its page.

The demo server (no --resume: the bundled demo model and examples) is started once for the module;
a second one with a tiny random CLIP answers uploads. Answers are checked against
``python -m flipvqa ask --json`` for the same input, answers in words also against
:meth:`flipvqa.ask.Answerer.generate` alone. The disconnect test runs the app in this process,
on a model whose answers never end by themselves.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
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


@pytest.fixture(scope="module")
def answerer():
    from flipvqa.ask import Answerer

    return Answerer(CHECKPOINT, llama_model_path=str(ASSETS), model="demo-llama", device="cpu")


@pytest.fixture(scope="module")
def features():
    import torch

    return torch.load(FEATURES, weights_only=True)


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
    generation = health["generation"]  # flipvqa ask's defaults, and the streams' counter
    assert (generation["max_new_tokens"], generation["temperature"], generation["top_p"]) == (32, 0.0, 1.0)
    assert generation["cancelled"] >= 0 and "batches" in generation
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
    ({"example": "{first}", "question": "why " * 300, "choices": ["a", "b"]}, 400, "max_seq_len"),  # no answer fits
    ({"example": "{first}", "question": "why " * 300}, 400, "max_seq_len"),  # in words: no room for the prompt
    ({"example": "{first}", "question": "  "}, 400, "empty"),
    ({"example": "{first}", "question": "why?", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ({"example": "{first}", "question": "why?", "max_new_tokens": 33}, 400, "1 to 32"),  # the server's limit
    ({"example": "{first}", "question": "why?", "max_new_tokens": "5"}, 400, "integer"),
    ({"example": "{first}", "question": "why?", "max_new_tokens": 2.5}, 400, "integer"),
    ({"example": "{first}", "question": "why?", "max_new_tokens": True}, 400, "integer"),
    ({"example": "{first}", "question": "why?", "temperature": -0.5}, 400, "temperature"),
    ({"example": "{first}", "question": "why?", "temperature": "hot"}, 400, "number"),
    ({"example": "{first}", "question": "why?", "top_p": 0}, 400, "top_p"),
    ({"example": "{first}", "question": "why?", "top_p": 1.5}, 400, "top_p"),
    ({"example": "{first}", "question": "why?", "seed": -1}, 400, "seed"),
    ({"example": "{first}", "max_new_tokens": 5}, 400, "leave out the choices"),  # its own choices: ranked
    ({"example": "{first}", "question": "why?", "choices": ["a", "b"], "temperature": 1}, 400, "choices"),
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
        for route in ("/api/ask", "/api/ask/stream"):  # the stream refuses before it starts
            response = httpx.post(server.url + route, content=text, headers={"Content-Type": "application/json"})
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
    for name in ("app.js", "words.js", "token.js", "style.css"):
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


def test_ask_many_equals_ask(answerer, features):
    """One batch over questions with different numbers of choices gives each one's own numbers."""
    from flipvqa.ask import Question

    feats = features
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


# ---------------------------------------------------------------------- answers in words


def stream_events(url: str, body, timeout: float = 60, **kwargs) -> list[tuple[str, dict]]:
    """The (event, data) pairs of POST /api/ask/stream."""
    events, event = [], None
    with httpx.stream("POST", url + "/api/ask/stream", json=body, timeout=timeout, **kwargs) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[len("data: "):])))
    return events


def alone(answerer, features, by_id: dict, body: dict) -> dict:
    """What Answerer.generate answers for the request alone."""
    settings = {k: body[k] for k in ("max_new_tokens", "temperature", "top_p", "seed") if k in body}
    video = features[by_id[body["example"]]["video"]].float()
    return answerer.generate(video, body["question"], **settings).to_dict()


def assert_same_words(got: dict, want: dict) -> None:
    assert got["answer"] == want["answer"] and got["cut"] == want["cut"] and got["n_frames"] == want["n_frames"]
    assert [t["token"] for t in got["tokens"]] == [t["token"] for t in want["tokens"]]
    assert [t["probability"] for t in got["tokens"]] == pytest.approx([t["probability"] for t in want["tokens"]],
                                                                      abs=1e-5)


def free_questions(examples: list[dict]) -> list[dict]:
    """Free questions over several examples: greedy with the default and smaller limits, and sampled."""
    asked = ["what happens first?", "why does the person do it?", "what is in the video?", "how does it end?"]
    out = [{"example": e["id"], "question": asked[k % len(asked)]} for k, e in enumerate(examples)]
    out += [{"example": examples[0]["id"], "question": "what happens first?", "max_new_tokens": 1},
            {"example": examples[1]["id"], "question": examples[1]["question"], "max_new_tokens": 7},
            {"example": examples[2]["id"], "question": "what is in the video?", "temperature": 0.8, "seed": 5},
            {"example": examples[3]["id"], "question": "how does it end?", "temperature": 1.5, "top_p": 0.9,
             "seed": 11, "max_new_tokens": 10}]
    return out


def test_free_questions_equal_the_library_streamed_and_batched(server, examples, answerer, features, capsys):
    by_id = {e["id"]: e for e in examples}
    requests = free_questions(examples)
    want = [alone(answerer, features, by_id, r) for r in requests]
    # flipvqa ask without --choices: the same answer as the server's defaults give
    example = by_id[requests[0]["example"]]
    capsys.readouterr()
    assert main(["-q", "ask", *ASK[4:], example["video"], "--features", str(FEATURES), "--question",
                 requests[0]["question"]]) == 0
    assert_same_words(json.loads(capsys.readouterr().out.strip().splitlines()[-1]), want[0])

    for request, expected in zip(requests, want):
        response = post(server, request)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert_same_words(answer, expected)
        assert answer["example"] == request["example"] and answer["question"] == request["question"]
        assert answer["frames"] == by_id[request["example"]]["frames"] and "choice" not in answer
        assert set(answer["timings"]) >= {"queue", "model", "total"}
        assert answer["settings"]["max_new_tokens"] == request.get("max_new_tokens", 32)

        events = stream_events(server.url, request)
        kinds = [kind for kind, _ in events]
        assert kinds == ["token"] * (len(events) - 1) + ["done"], kinds
        done = events[-1][1]
        assert_same_words(done, expected)
        assert [data for _, data in events[:-1]] == done["tokens"]  # the stream is the answer's tokens
        assert "".join(t["token"] for t in done["tokens"]).strip() == done["answer"]
    assert want[len(examples)]["cut"] and len(want[len(examples)]["tokens"]) == 1

    # a question with choices on the stream route: its answer as one event
    events = stream_events(server.url, {"example": examples[0]["id"]})
    assert [kind for kind, _ in events] == ["done"] and events[0][1]["choice"]

    # 20 concurrent free questions, half streamed, released together: each gets its answer alone
    burst = [i % len(requests) for i in range(20)]
    for attempt in range(3):
        before = httpx.get(server.url + "/api/health").json()["generation"]
        gate = threading.Barrier(len(burst))

        def one(k):
            gate.wait()
            request = requests[burst[k]]
            if k % 2:
                return stream_events(server.url, request)[-1][1]
            response = post(server, request)
            assert response.status_code == 200, response.text
            return response.json()

        with ThreadPoolExecutor(len(burst)) as pool:
            answers = list(pool.map(one, range(len(burst))))
        after = httpx.get(server.url + "/api/health").json()["generation"]
        for i, answer in zip(burst, answers):
            assert_same_words(answer, want[i])
        assert after["questions"] - before["questions"] == len(burst)
        assert after["failed_batches"] == before["failed_batches"]
        if max(a["batch_size"] for a in answers) > 1:
            break  # some were generated together
    else:
        pytest.fail(f"20 concurrent free questions were never generated together: {after}")
    assert after["largest_batch"] > 1


@contextlib.contextmanager
def app_server(backend, token=None):
    """The app (with ``token``: behind that access token) on a free port, served by uvicorn in a
    thread of this process."""
    import uvicorn

    from flipvqa.serve.app import create_app
    from flipvqa.serve.launch import free_port

    port = free_port()
    config = uvicorn.Config(create_app(backend, token), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(examples):
    """A stream's client leaves after one token: its row leaves the batch (generation ends long before
    its max_new_tokens), the cancelled count says so, the other streams and later requests go on."""
    from flipvqa.ask import Answerer
    from flipvqa.serve.backend import Backend, demo_examples
    from flipvqa.serve.words import Settings

    endless = Answerer(CHECKPOINT, llama_model_path=str(ASSETS), model="demo-llama", device="cpu")
    endless.tokenizer.stop_ids = ()  # answers end at max_new_tokens only
    generate_many, lengths = endless.generate_many, []

    def slow_generate_many(requests, on_token=None, **kwargs):  # 5 ms a token: 5000 would take 25 s
        def slow(row, text, probability):
            time.sleep(0.005)
            on_token(row, text, probability)

        answers = generate_many(requests, on_token=slow, **kwargs)
        lengths.append([len(a.tokens) for a in answers])
        return answers

    endless.generate_many = slow_generate_many
    backend = Backend(endless, CHECKPOINT, demo_examples(ASSETS), settings=Settings(max_new_tokens=5000))
    first = examples[0]["id"]
    long = {"example": first, "question": "describe the video", "max_new_tokens": 5000}
    with app_server(backend) as url, ThreadPoolExecutor(1) as pool:
        other = pool.submit(stream_events, url, {"example": first, "question": "what happens?",
                                                 "max_new_tokens": 60})
        start = time.monotonic()
        with httpx.stream("POST", url + "/api/ask/stream", json=long, timeout=30) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines) == "event: token" and next(lines).startswith("data: {")
        # leaving the block closed the connection mid-stream
        deadline = time.monotonic() + 20
        while backend.words.stats()["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.words.stats()["cancelled"] == 1
        done = other.result(timeout=30)[-1]
        assert done[0] == "done" and len(done[1]["tokens"]) == 60 and done[1]["cut"]
        response = httpx.post(url + "/api/ask", json={"example": first, "question": "and then?", "max_new_tokens": 4},
                              timeout=30)
        assert response.status_code == 200, response.text
        assert len(response.json()["tokens"]) == 4
        assert time.monotonic() - start < 20  # far less than the 25 s the left stream would have taken
        health = httpx.get(url + "/api/health").json()
        assert health["status"] == "ok" and health["generation"]["cancelled"] == 1
    assert all(n < 1000 for call in lengths for n in call), lengths  # no row ran on to 5000


# ---------------------------------------------------------------------- uploads


@pytest.fixture(scope="module")
def clip_server(tmp_path_factory, tiny_clip):
    log = tmp_path_factory.mktemp("serve-clip") / "server.log"
    with ServerProcess(["--clip_model", str(tiny_clip), "--max_upload_mb", "1", "--max_seconds", "5"],
                       log=log) as running:
        yield running


def upload(server, video: bytes, question="what happens first?", choices=("a dog runs", "a cat sleeps", "rain"),
           name="clip.mp4", subtitles: bytes | None = None, route="/api/ask", **fields) -> httpx.Response:
    files = [("video", (name, video, "video/mp4"))]
    if subtitles is not None:
        files.append(("subtitles", ("clip.srt", subtitles, "application/x-subrip")))
    data = {"choices": list(choices)} if question is None else {"question": question, "choices": list(choices)}
    data.update(fields)
    return httpx.post(server.url + route, data=data, files=files, timeout=120)


def test_upload_a_video(clip_server, tiny_clip, tmp_path, capsys):
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

    # no choices: an answer in words, as flipvqa ask without --choices gives it; streamed too
    words = upload(clip_server, video.read_bytes(), choices=(), max_new_tokens="6")
    assert words.status_code == 200, words.text
    capsys.readouterr()
    assert main(["-q", "ask", *ASK[4:], str(video), "--clip_model", str(tiny_clip), "--question",
                 "what happens first?", "--max_new_tokens", "6"]) == 0
    assert_same_words(words.json(), json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert len(words.json()["thumbnails"]) == len(thumbs) and "choices" not in words.json()
    streamed = upload(clip_server, video.read_bytes(), choices=(), subtitles=srt, route="/api/ask/stream")
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.rstrip().split("\n\n")[-1].startswith("event: done\ndata: {")
    assert_one_line_error(upload(clip_server, video.read_bytes(), choices=(), top_p="1.5"), 400, "top_p")
    assert_one_line_error(upload(clip_server, video.read_bytes(), choices=(), seed="x"), 400, "seed")

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
    words = post(server, {"example": second["id"], "question": "what happens first?"}).json()
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
            captions = page.locator("#frames .slot figcaption").all_inner_texts()
            assert all(c.endswith("%") for c in captions), captions  # percent, as ask --explain draws them

            page.goto(server.url + "/")
            page.wait_for_selector(f'#example option[value="{second["id"]}"]', state="attached")
            page.select_option("#example", second["id"])
            assert page.input_value("#question") == second["question"]
            page.click("#ask")
            page.wait_for_selector('#result[data-state="done"]', timeout=30_000)
            assert page.inner_text("#top-choice") == want[second["id"]]
            assert f"example={second['id']}" in page.url  # the link shares the result

            # a free question: the answer grows as it streams, then stands with its tokens
            page.click("#mode-words")
            assert page.locator("#choices").is_hidden()
            page.fill("#question", "what happens first?")
            page.click("#ask")
            page.wait_for_selector('#result[data-state="done"]', timeout=30_000)
            said = page.text_content("#words-text")
            assert said and said == words["answer"]
            assert page.locator("#tokens .tok").count() == len(words["tokens"])
            assert page.locator("#ranked-view").is_hidden() and "mode=words" in page.url
            shot = page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            Path("/tmp/serve_page.png").write_bytes(shot)
            assert not errors, errors
        finally:
            browser.close()
