"""OCI error bodies, ranges and the blob body sender (spec/serve.md, "API").

Blob bytes go out in one of two ways:

* the server offers the ASGI ``http.response.zerocopy`` extension (``server.py`` adds it
  to uvicorn): one message hands it the open file, offset and count, and the kernel
  copies file to socket (``sendfile``);
* otherwise the file is read in ``CHUNK`` pieces in a worker thread (``os.pread``) and
  sent as ordinary body messages; memory per stream stays at one chunk.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import anyio.to_thread
import msgspec
from starlette.responses import Response
from starlette.types import Send

__all__ = ["CHUNK", "CUT", "DEFAULT_SEND_TIMEOUT", "SEND_TIMEOUT", "ZEROCOPY", "ResponseCut",
           "cut_response", "oci_error", "parse_range", "send_file_body"]

CHUNK = 1 << 20
ZEROCOPY = "http.response.zerocopy"
# blobctl's protocols (zerocopy.py) offer this ASGI extension: the message closes the
# connection mid-body, quietly (the route has said why in one log line); with
# ``"abort": True`` it drops what is still unsent (a client that stopped reading)
CUT = "blobctl.response.cut"
# blobctl's protocols (zerocopy.py) offer this ASGI extension as ``{"seconds": s}``: a
# response send (a body message, or a zero-copy piece) that the client does not take
# within ``s`` seconds cuts the connection (one log line); the app sets ``seconds`` from
# ``serve --send-timeout`` (spec/serve.md, "Operations": slow clients)
SEND_TIMEOUT = "blobctl.send_timeout"
DEFAULT_SEND_TIMEOUT = 60.0  # nginx's send_timeout


class ResponseCut(Exception):
    """Raised to end a response mid-body on a server without the ``CUT`` extension: the
    server logs it and closes the connection, so the client sees a short body."""


async def cut_response(scope: Mapping[str, Any], send: Send, *, abort: bool = False) -> None:
    """End a started response by closing its connection before the body is complete, so
    the client sees a short body (never a complete wrong one). With the ``CUT`` extension
    the server does it quietly; otherwise :class:`ResponseCut` is raised, which any ASGI
    server answers by closing the connection (and logging it). ``abort``: drop the bytes
    the server still holds for the client (reset) rather than wait to flush them, for a
    client that stopped reading (a plain close would keep its socket until it reads)."""
    if CUT in (scope.get("extensions") or {}):
        await send({"type": CUT, "abort": abort})
        return
    raise ResponseCut("response cut mid-body")


def oci_error(status: int, code: str, message: str, *, detail: Any = None,
              headers: Mapping[str, str] | None = None) -> Response:
    """An OCI distribution error response (``{"errors": [{code, message, detail}]}``)."""
    err: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        err["detail"] = detail
    body = msgspec.json.encode({"errors": [err]})
    extra = {k: v for k, v in (headers or {}).items() if k.lower() != "content-length"}
    return Response(body, status, headers=extra, media_type="application/json")


def os_error(exc: OSError, message: str, headers: Mapping[str, str]) -> Response:
    """The OCI error for an OS error met before a response began: out of file
    descriptors (EMFILE/ENFILE) is a passing overload, 503 ``UNAVAILABLE`` with
    ``Retry-After``; any other a 500 ``UNKNOWN`` (never uvicorn's bare text/plain 500)."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return oci_error(503, "UNAVAILABLE", message, headers={**headers, "Retry-After": "1"})
    return oci_error(500, "UNKNOWN", message, headers=headers)


_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII)  # RFC 9110: DIGIT is ASCII


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """A single ``Range`` header against ``size``: ``(start, end_inclusive)``; None when
    absent or not a single byte range (served whole, RFC 9110 allows ignoring it);
    ``"unsatisfiable"`` for 416."""
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None:
        return None
    a, b = m.groups()
    if not a and not b:
        return None
    if not a:  # suffix range: the last b bytes
        n = int(b)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(a)
    end = int(b) if b else size - 1
    if b and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


async def send_file_body(send: Send, extensions: Mapping[str, Any], fd: int, offset: int,
                         count: int, sent: Callable[[int], None]) -> None:
    """Send ``count`` bytes of ``fd`` from ``offset`` as the whole response body.

    Raises OSError if the file ends early (the connection is then cut: never a short
    body passed off as whole)."""
    if ZEROCOPY in extensions and count > 0:
        message: dict[str, Any] = {"type": ZEROCOPY, "file": fd, "offset": offset,
                                   "count": count, "more_body": False}
        await send(message)
        sent(int(message.get("sent", count)))
        return
    end = offset + count
    pos = offset
    if count == 0:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    while pos < end:
        n = min(CHUNK, end - pos)
        data = await anyio.to_thread.run_sync(os.pread, fd, n, pos)
        if not data:
            raise OSError(f"blob file ended at {pos}, {end - pos} bytes short")
        pos += len(data)
        await send({"type": "http.response.body", "body": data, "more_body": pos < end})
        sent(len(data))
