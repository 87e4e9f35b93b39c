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
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from registry_server.responses import CUT

__all__ = ["ZEROCOPY", "ZeroCopyHttpToolsProtocol", "native_sendfile"]

ZEROCOPY = "http.response.zerocopy"


def native_sendfile(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop.sendfile`` uses the kernel here (asyncio's own unix selector loop)."""
    return isinstance(loop, asyncio.unix_events.SelectorEventLoop)


class ZeroCopyHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the zero-copy extension (on asyncio's own loop)
    and blobctl's ``CUT`` (``responses.cut_response``: a response ended mid-body closes
    its connection without uvicorn's "Exception in ASGI application" traceback)."""

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        extensions = cycle.scope.setdefault("extensions", {})
        extensions[CUT] = {}
        zerocopy = native_sendfile(self.loop)
        if zerocopy:
            extensions[ZEROCOPY] = {}
        plain = cycle.send

        async def send(message: Any) -> None:
            if message["type"] == CUT:
                _cut(cycle, abort=bool(message.get("abort")))
            elif message["type"] == ZEROCOPY and zerocopy:
                await _send_zerocopy(self.loop, cycle, plain, message)
            else:
                await plain(message)

        cycle.send = send  # type: ignore[method-assign]
        super()._start_asgi_task(cycle, app)


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


PIECE = 8 << 20  # bytes per loop.sendfile call: a cut connection is noticed per piece


async def _send_zerocopy(loop: asyncio.AbstractEventLoop, cycle: RequestResponseCycle,
                         plain: Any, message: Any) -> None:
    """Send the file range with ``loop.sendfile`` in ``PIECE`` steps. Sets
    ``message["sent"]`` to the bytes the kernel took. A client that goes away ends the
    response quietly (the connection is closed, as uvicorn does for a disconnect).

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
            await cycle.flow.drain()
        # (loop.sendfile needs a file object: one over the same descriptor, left open)
        with os.fdopen(int(message["file"]), "rb", closefd=False) as f:
            done = 0
            while done < count:
                n = min(PIECE, count - done)
                try:
                    sent = await loop.sendfile(cycle.transport, f, offset + done, n)
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
    await plain({"type": "http.response.body", "body": b"", "more_body": more})
