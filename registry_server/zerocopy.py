"""The ASGI ``http.response.zerocopy`` extension for uvicorn's httptools protocol
(spec/serve.md, "Zero-copy").

uvicorn has no ``pathsend``/``zerocopy`` support of its own: Starlette's ``FileResponse``
then reads the file in 64 KiB pieces through a thread each. This protocol adds the
extension to every HTTP scope; a ``{"type": "http.response.zerocopy", "file": fd,
"offset": o, "count": n, "more_body": False}`` message makes the event loop copy the
bytes file → socket in the kernel (``loop.sendfile``, i.e. ``os.sendfile`` on asyncio's
selector loop; uvloop has no native sendfile, so the extension is offered only on the
asyncio loop). The response's ``Content-Length`` bookkeeping of uvicorn's cycle is kept
exact: the extension's count is deducted from it before the body ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from registry_server.responses import CUT, DEFAULT_SEND_TIMEOUT, SEND_TIMEOUT

__all__ = ["ZEROCOPY", "ZeroCopyHttpToolsProtocol", "native_sendfile"]

log = logging.getLogger("blobctl.serve")

ZEROCOPY = "http.response.zerocopy"


def native_sendfile(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop.sendfile`` uses the kernel here (asyncio's own unix selector loop)."""
    return isinstance(loop, asyncio.unix_events.SelectorEventLoop)


class ZeroCopyHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the zero-copy extension (on asyncio's own loop),
    blobctl's ``CUT`` (``responses.cut_response``: a response ended mid-body closes
    its connection without uvicorn's "Exception in ASGI application" traceback) and
    ``SEND_TIMEOUT`` (a client that takes nothing for that long is cut: found from
    outside, a client that stopped reading held its socket, the blob's descriptor and the
    blob's lease for as long as it stayed connected, so GC could never collect that blob).

    A request still running when the shutdown grace is over (uvicorn then cancels its
    task) has its connection cut with one log line, not uvicorn's traceback and, before
    a response began, its bare text/plain 500 (found from outside: five stalled blob GETs
    gave five tracebacks; a PATCH still uploading got ``500``)."""

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        extensions: dict[str, Any] = cycle.scope.setdefault("extensions", {})
        extensions[CUT] = {}
        limit: dict[str, float] = {"seconds": DEFAULT_SEND_TIMEOUT}  # the app may set it
        extensions[SEND_TIMEOUT] = limit
        zerocopy = native_sendfile(self.loop)
        if zerocopy:
            extensions[ZEROCOPY] = {}
        plain = cycle.send
        loop = self.loop

        async def send(message: Any) -> None:
            kind = message["type"]
            if kind == CUT:
                _cut(cycle, abort=bool(message.get("abort")))
            elif kind == ZEROCOPY and zerocopy:
                await _send_zerocopy(loop, cycle, plain, message, limit["seconds"])
            elif kind == "http.response.body":
                await _bounded(loop, cycle, plain(message), limit["seconds"])
            else:
                await plain(message)

        async def guarded(scope: Any, receive: Any, send: Any) -> None:
            try:
                await app(scope, receive, send)
            except asyncio.CancelledError:
                # uvicorn cancels a request's task only when the shutdown grace is over
                # (Server.shutdown); what the route did so far stands (an upload keeps
                # the bytes it received, for a restarted server)
                _cut(cycle, abort=True)
                log.warning("shutdown: %s cut when the grace ran out (%s)",
                            _request(cycle), "response begun" if cycle.response_started
                            else "no response sent")

        cycle.send = send  # type: ignore[method-assign]
        super()._start_asgi_task(cycle, guarded)


def _request(cycle: RequestResponseCycle) -> str:
    scope = cycle.scope
    client = scope.get("client") or ("-", 0)
    path = scope.get("raw_path", b"").decode("latin-1") or scope.get("path", "")
    return f"{client[0]}:{client[1]} {scope.get('method', '-')} {path}"


def _cut(cycle: RequestResponseCycle, *, abort: bool = False) -> None:
    """Close the connection mid-response: the client sees a short body. Marked as a
    disconnect, so uvicorn neither logs the unfinished response nor sends more.
    ``abort``: drop unsent bytes at once (a close waits for a client that stopped
    reading to take them, holding the socket and the server's shutdown)."""
    cycle.disconnected = True
    if abort:
        cycle.transport.abort()
    else:
        cycle.transport.close()


def _stalled(cycle: RequestResponseCycle, seconds: float) -> None:
    """A send the client did not take within ``seconds``: cut it (releasing what its response
    holds: the route sees a disconnect)."""
    if cycle.disconnected or cycle.transport.is_closing():
        return
    log.warning("%s: the client stopped reading (a send stalled %gs), connection cut "
                "(--send-timeout)", _request(cycle), seconds)
    _cut(cycle, abort=True)


async def _bounded(loop: asyncio.AbstractEventLoop, cycle: RequestResponseCycle,
                   sending: Any, seconds: float) -> None:
    """Await uvicorn's ``send`` (which waits while the socket's buffer is full) with a
    timer: a client that takes nothing for ``seconds`` is cut, which ends the wait."""
    timer = loop.call_later(seconds, _stalled, cycle, seconds) if seconds > 0 else None
    try:
        await sending
    finally:
        if timer is not None:
            timer.cancel()


# bytes per loop.sendfile call: a cut connection is noticed per piece, and the send
# timeout asks a client to take one piece in that time
PIECE = 1 << 20


async def _send_zerocopy(loop: asyncio.AbstractEventLoop, cycle: RequestResponseCycle,
                         plain: Any, message: Any, seconds: float) -> None:
    """Send the file range with ``loop.sendfile`` in ``PIECE`` steps. Sets
    ``message["sent"]`` to the bytes the kernel took. A client that goes away ends the
    response quietly (the connection is closed, as uvicorn does for a disconnect); one
    that takes no piece within ``seconds`` is cut.

    Uses the caller's descriptor as it is (no ``dup``): nothing here needs a new one, so
    running out of descriptors cannot strand a response whose head is sent (found from
    outside: ``os.dup`` failing under load sent 200 with a Content-Length and no byte)."""
    count = int(message["count"])
    offset = int(message.get("offset", 0))
    more = bool(message.get("more_body", False))
    message["sent"] = 0
    if not cycle.response_started or cycle.response_complete:
        raise RuntimeError("zerocopy message outside a response body")
    if cycle.disconnected:
        return
    if cycle.scope["method"] != "HEAD" and count:
        if cycle.chunked_encoding or count > cycle.expected_content_length:
            raise RuntimeError("zerocopy needs a Content-Length covering its count")
        if cycle.flow.write_paused:
            await _bounded(loop, cycle, cycle.flow.drain(), seconds)
            if cycle.disconnected:
                return
        # (loop.sendfile needs a file object: one over the same descriptor, left open)
        with os.fdopen(int(message["file"]), "rb", closefd=False) as f:
            done = 0
            while done < count:
                n = min(PIECE, count - done)
                try:
                    piece = loop.sendfile(cycle.transport, f, offset + done, n)
                    sent = await (asyncio.wait_for(piece, seconds) if seconds > 0 else piece)
                except asyncio.TimeoutError:  # the client took nothing for that long
                    _stalled(cycle, seconds)
                    return
                except ConnectionError:  # reset / broken pipe: the client went away
                    cycle.disconnected = True
                    cycle.transport.close()
                    return
                except RuntimeError:  # the transport was closed under us: the same
                    if cycle.disconnected or cycle.transport.is_closing():
                        return
                    raise
                if sent != n:
                    raise OSError(f"sendfile sent {sent} of {n} bytes (file shorter?)")
                done += n
                message["sent"] = done
                cycle.expected_content_length -= n
                if cycle.disconnected:
                    return
    await _bounded(loop, cycle, plain({"type": "http.response.body", "body": b"",
                                       "more_body": more}), seconds)
