"""Reading a request's body within a limit, whether it declares its length or comes chunked.

A body with a Content-Length over the limit is refused before it is read. A body sent with
``Transfer-Encoding: chunked`` declares no length: it is read chunk by chunk and refused as soon
as it passes the limit, before anything parses it; the form parser then closes (and so deletes)
the temporary file an upload was being written to.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator, Optional

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from .checks import RequestError

MAX_JSON_BYTES = 1 << 20
FORM_SLACK = 1 << 20  # what a multipart body may hold besides the video (fields, subtitles)


class BodyTooLarge(Exception):
    """The body passed its limit: ``size`` bytes declared, or more than ``size`` read so far."""

    def __init__(self, size: int, declared: bool):
        super().__init__(size)
        self.size, self.declared = size, declared

    def amount(self) -> str:
        """How large the body is, as far as the server knows ("250.0 MB", "more than 2.0 MB")."""
        mb = f"{self.size / 2**20:.1f} MB"
        return mb if self.declared else "more than " + mb


def declared_length(request: Request) -> Optional[int]:
    length = request.headers.get("content-length", "")
    return int(length) if length.isdigit() else None


async def capped(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks; :class:`BodyTooLarge` as soon as more than ``limit`` bytes came or are declared."""
    length = declared_length(request)
    if length is not None and length > limit:
        raise BodyTooLarge(length, True)
    seen = 0
    async with contextlib.aclosing(request.stream()) as chunks:
        async for chunk in chunks:
            seen += len(chunk)
            if seen > limit:
                raise BodyTooLarge(seen, False)
            yield chunk


async def read_json(request: Request) -> Any:
    """The JSON body (at most :data:`MAX_JSON_BYTES`), or a one-line 4xx."""
    try:
        async with contextlib.aclosing(capped(request, MAX_JSON_BYTES)) as chunks:
            raw = b"".join([chunk async for chunk in chunks])
    except BodyTooLarge as err:
        size = f"of {err.size} bytes" if err.declared else f"of more than {MAX_JSON_BYTES} bytes"
        raise RequestError(413, f"a JSON body {size}; the API takes at most {MAX_JSON_BYTES}") from None
    if not raw.strip():
        raise RequestError(400, "the body is empty: send a JSON object such as {\"example\": ID}")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the body is not JSON ({err})") from None
    except RecursionError:  # json.loads recurses once per level: 100,000 "[" exhaust the stack
        raise RequestError(400, "the body nests lists or objects too deeply (the API's bodies are one object "
                                "of strings, numbers and a list of strings)") from None


async def read_form(request: Request, limit: int) -> FormData:
    """The multipart form of at most ``limit`` bytes (:class:`BodyTooLarge` past it), files spooled
    to temporary files."""
    try:
        async with contextlib.aclosing(capped(request, limit)) as chunks:
            return await MultiPartParser(request.headers, chunks, max_files=2, max_fields=64).parse()
    except MultiPartException as err:
        raise RequestError(400, f"unreadable form data ({err.message})") from None
