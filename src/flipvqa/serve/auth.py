"""The optional access token of ``flipvqa serve`` (``--token`` or ``FLIPVQA_TOKEN``).

With a token, every API route but ``/api/health`` needs ``Authorization: Bearer <token>`` and
answers 401 in one line without it, before the body is read (an upload costs nothing until then).
The page and its files stay open: the page asks for the token and sends it. The check is a plain
ASGI middleware, so streamed answers pass through it untouched (and a client that leaves
mid-stream is still seen).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Optional

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import FlipVQAError

ENV = "FLIPVQA_TOKEN"
OPEN = frozenset({"/api/health"})  # the page learns from it whether to ask for the token


class TokenGate:
    """Refuse API requests without the bearer token (compared in constant time)."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.token = app, token.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/") and scope["path"] not in OPEN:
            refusal = self.refusal(dict(scope["headers"]).get(b"authorization"))
            if refusal is not None:
                response = JSONResponse({"error": refusal}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, header: Optional[bytes]) -> Optional[str]:
        """Why ``header`` (the Authorization header's value) is refused; None: it holds the token."""
        scheme, _, given = (header or b"").strip().partition(b" ")
        if not header or scheme.lower() != b"bearer":
            return ("this server needs its access token: send the header \"Authorization: Bearer <token>\" "
                    "(the token of flipvqa serve --token or FLIPVQA_TOKEN)")
        if not hmac.compare_digest(given.strip(), self.token):
            return "wrong access token (the header \"Authorization: Bearer <token>\" must hold the server's)"
        return None


def access_token(flag: Optional[str]) -> Optional[str]:
    """The token of ``--token``, else of ``$FLIPVQA_TOKEN`` (kept out of the process list), or None."""
    token = flag if flag is not None else (os.environ.get(ENV) or None)
    if token is None:
        return None
    where = "--token" if flag is not None else ENV
    if not token or not all(33 <= ord(c) < 127 for c in token):  # one header word, as a browser sends it
        raise FlipVQAError(f"{where}: give printable ASCII without spaces (got {len(token)} characters)")
    return token


def is_loopback(host: str) -> bool:
    """Whether ``--host`` listens on this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
