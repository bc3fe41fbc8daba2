"""``flipvqa serve``: a web page and a JSON API answering questions about videos: ranking choices,
or in words.

    flipvqa serve                      # the bundled demo model and its examples, http://127.0.0.1:7860
    flipvqa serve --resume checkpoint_best.pth --llama_model_path pretrained/llama/ --model 7B \\
        --clip_model clip-vit-large-patch14/ --features clipvitl14.pth

The API (every error is ``{"error": "<one line>"}`` with a 4xx status, or 500 for a server bug;
with ``--token``/``FLIPVQA_TOKEN`` every route but ``/api/health`` needs ``Authorization: Bearer
<token>``, else 401):

* ``GET /api/health``: ``{"status": "ok", "model", "checkpoint", "max_seq_len", "max_choices" (the
  most choices that fit the model, one-word ones), "token_required", ...}``, the multiple-choice batch
  counters (``batches``, ``questions``, ``largest_batch``) and ``generation``: the sampling
  defaults (``max_new_tokens``, ``temperature``, ``top_p``, ``seed``), the counters of the
  answers in words and ``cancelled`` (streams whose client went away before their answer);
* ``GET /api/examples``: the bundled examples ``{"id", "question", "choices", "frames", ...}``, or
  with ``--features`` one entry per video of that file (no question: ask your own);
* ``POST /api/ask``: JSON ``{"example": ID}``, optionally with ``"question"`` and ``"choices"``; or
  multipart form data with a ``video`` file, ``question``, repeated ``choices`` and an optional
  ``subtitles`` .srt file (needs ``--clip_model``). The answer is ``flipvqa ask --json --explain``'s
  (``choice``, ``index``, ``n_frames``, ``ranked``, ``frame_attention``) plus ``timings`` (seconds)
  and ``frames`` (an example's frame labels) or ``thumbnails`` (an upload's sampled frames).
  A ``question`` without ``choices`` (none, null or [] in JSON; no ``choices`` field in a form) is
  answered in words: ``flipvqa ask --json``'s ``answer``, ``tokens`` (``{"token", "probability"}``
  each), ``cut``, ``n_frames``, plus ``settings`` and the same ``timings`` (with ``first_token``),
  ``batch_size``, ``frames``/``thumbnails``. Optional fields ``max_new_tokens`` (1 to the server's
  --max_new_tokens), ``temperature``, ``top_p``, ``seed`` (defaults: the server's flags). A body
  with only ``example`` ranks the example's own choices, as before.
* ``POST /api/ask/stream``: the same request; the answer in words as Server-Sent Events, an
  ``event: token`` (data ``{"token", "probability"}``) per token as it is generated, then
  ``event: done`` (data: what ``/api/ask`` returns) or ``event: error`` (``{"error"}``). A bad
  request is a JSON 4xx as above; a question with choices gets one ``done`` event.

The model loads once. Requests that arrive together are answered in one batch
(:mod:`flipvqa.serve.batching`; :meth:`flipvqa.ask.Answerer.ask_many`, or
:meth:`~flipvqa.ask.Answerer.generate_many` for answers in words, :mod:`flipvqa.serve.words`),
each with the same answer as alone. A client that leaves mid-stream frees its row of the batch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import socket
from pathlib import Path

from ..config import add_run_arguments
from ..errors import FlipVQAError
from .auth import access_token, is_loopback

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; "
                                                            "0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--token", help="access token: every API route but /api/health then needs the header "
                                        "'Authorization: Bearer TOKEN' (the page asks for it once). "
                                        "FLIPVQA_TOKEN in the environment does the same, out of the process list")
    parser.add_argument("--features", help="a clipvitl14.pth-style file: each of its videos is offered as an "
                                           "example to ask your own questions about")
    parser.add_argument("--clip_model", help="local folder (or hub id) of CLIP ViT-L/14, to answer about "
                                             "uploaded videos")
    parser.add_argument("--fps", type=float, default=1.0, help="frames per second sampled from an upload "
                                                               "(default: 1)")
    parser.add_argument("--max_upload_mb", type=float, default=200, help="largest upload (default: 200)")
    parser.add_argument("--max_seconds", type=float, default=600, help="longest uploaded video in seconds "
                                                                       "(default: 600)")
    parser.add_argument("--max_batch", type=int, default=32, help="most questions scored in one batch "
                                                                  "(default: 32)")
    parser.add_argument("--batch_wait_ms", type=float, default=2.0,
                        help="how long the first waiting question waits for others to join its batch "
                             "(default: 2)")
    add_run_arguments(parser, "ask", shown_as="serve")
    for action in parser._actions:  # serve's --max_new_tokens is also the most a request may ask for
        if action.dest == "max_new_tokens":
            action.help = ("most tokens of an answer in words: the default, and the most a request's "
                           "max_new_tokens may ask for (default: 32)")


def require_dependencies() -> None:
    """Import the ``serve`` extra's packages: at run time, not at import, so that ``flipvqa serve
    --help`` works without them. A missing one is one line naming the extra."""
    for names in (("fastapi",), ("uvicorn",), ("python_multipart", "multipart")):  # multipart: before 0.0.13
        for name in names:
            try:
                importlib.import_module(name)
                break
            except ModuleNotFoundError:
                continue
        else:
            raise FlipVQAError(f"flipvqa serve needs the Python package '{names[0].replace('_', '-')}': "
                               "pip install 'flipvqa[serve]'")


def run(ns: argparse.Namespace) -> int:
    require_dependencies()
    for flag in ("fps", "max_upload_mb", "max_seconds", "max_batch"):
        if getattr(ns, flag) <= 0:
            raise FlipVQAError(f"--{flag} must be positive (got {getattr(ns, flag)})")
    if ns.batch_wait_ms < 0:
        raise FlipVQAError(f"--batch_wait_ms must be 0 or more (got {ns.batch_wait_ms})")
    if not 0 < ns.port < 65536:
        raise FlipVQAError(f"--port must be in 1..65535 (got {ns.port})")
    settings = sampling(ns)
    token = access_token(ns.token)
    if token is None and not is_loopback(ns.host):
        log.warning("warning: --host %s answers anyone who can reach it, uploads included: give --token (or "
                    "FLIPVQA_TOKEN) to require an access token", ns.host)
    check_port(ns.host, ns.port)  # before loading the model, which can take minutes
    backend = load_backend(ns, settings)
    import uvicorn

    from .app import create_app

    app = create_app(backend, token)
    log.info("serving %s (%s) on http://%s:%d", backend.checkpoint, backend.answerer.args.model, ns.host, ns.port)
    try:
        uvicorn.run(app, host=ns.host, port=ns.port, log_level="warning" if ns.quiet else "info",
                    timeout_graceful_shutdown=5)
    except OSError as err:  # e.g. the port is taken
        raise FlipVQAError(f"cannot listen on {ns.host}:{ns.port} ({err.strerror or err})") from None
    return 0


def check_port(host: str, port: int) -> None:
    """Fail now, in one line, when ``host:port`` cannot be listened on (uvicorn binds the same way)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise FlipVQAError(f"--host {host}: unknown address ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise FlipVQAError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None


def sampling(ns: argparse.Namespace):
    """The sampling flags (``flipvqa ask``'s defaults where not given), checked."""
    from ..ask import check_sampling
    from .words import Settings

    pick = lambda value, default: default if value is None else value  # noqa: E731
    settings = Settings(pick(ns.max_new_tokens, 32), pick(ns.temperature, 0.0), pick(ns.top_p, 1.0),
                        pick(ns.seed, 0))
    check_sampling(settings.max_new_tokens, settings.temperature, settings.top_p)
    return settings


def load_backend(ns: argparse.Namespace, settings=None):
    """The Answerer (the demo model without --resume), the examples and the batch queues."""
    from ..ask import OPTIONS, Answerer
    from ..demo import ASSETS
    from .backend import Backend, demo_examples, feature_examples

    options = {k: getattr(ns, k, None) for k in OPTIONS}
    if ns.resume:
        checkpoint = Path(ns.resume)
        if not checkpoint.is_file():
            raise FlipVQAError(f"{checkpoint}: checkpoint not found")
        device = ns.device
    else:
        checkpoint = ASSETS / "checkpoint.pth"
        if not checkpoint.is_file():
            raise FlipVQAError(f"{checkpoint}: the demo model is missing (python scripts/build_demo_checkpoint.py "
                               "writes it), or pass --resume")
        if options["model"] is None and options["llama_model_path"] is None:
            options.update(model="demo-llama", llama_model_path=str(ASSETS))
        device = ns.device or "cpu"  # a tiny model: the CPU answers faster than a GPU's launch overheads
    if ns.features:
        examples = feature_examples(Path(ns.features))
    else:
        examples = [] if ns.resume else demo_examples(ASSETS)
    answerer = Answerer(checkpoint, clip_model=ns.clip_model, fps=ns.fps, device=device, **options)
    for example in examples[:1]:
        answerer.check_features(example.features)
    if ns.clip_model:  # load CLIP now: a bad folder fails here, and the first upload waits for nothing
        import numpy as np

        log.info("loading CLIP from %s", ns.clip_model)
        answerer.embed_frames(np.zeros((1, 224, 224, 3), np.uint8))
    return Backend(answerer, checkpoint.resolve(), examples, max_upload_mb=ns.max_upload_mb,
                   max_seconds=ns.max_seconds, max_batch=ns.max_batch, max_wait=ns.batch_wait_ms / 1000,
                   settings=settings or sampling(ns))
