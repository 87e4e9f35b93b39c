"""A deadline for request heads (spec/serve.md, "Operations": slow clients).

uvicorn's httptools protocol closes a keep-alive connection idle for 5 s, but any byte
cancels that timer, and a new connection that sends nothing has no timer at all: a client
(or thousands of them) opening connections and sending nothing, or a request head a byte
every few seconds, held each connection and its file descriptor forever, until the
process ran out of descriptors and served no one (the "slowloris" attack; nginx's
``client_header_timeout`` and Go's ``ReadHeaderTimeout`` are the usual cure).

:func:`with_head_deadline` makes a subclass of an ``HttpToolsProtocol`` in which every
request head must be complete within ``seconds`` of the moment the connection began
waiting for it: its accept, or the end of the response before it. A head not complete
by then gets ``408 Request Timeout`` (when some of it came; silence is just closed) and
the connection is closed. The clock runs only between requests: from the accept, or
from when the last response is out and the last request's body is all in (a route that
answers before reading a body, e.g. 401, leaves uvicorn draining it: not a head's time).
Bodies are not clocked here: a slow upload is the route's business (its session survives
the connection).

A head is also bounded in size: over ``MAX_HEAD_BYTES`` (64 KiB) or ``MAX_HEAD_LINES``
(128 header lines) it gets ``431 Request Header Fields Too Large`` and the connection is
closed (uvicorn's httptools protocol keeps every header line, a Python tuple each: a head
of many short lines cost the server ~20x what the client sent).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["DEFAULT_HEAD_TIMEOUT", "with_head_deadline"]

DEFAULT_HEAD_TIMEOUT = 30.0

# a request head's size and line count (nginx keeps 4 x 8 KiB buffers, Apache 100 fields):
# each header line costs the protocol a Python tuple of two bytes objects, so a head of many
# short lines grew the server by ~20x what a client sent (found from outside: two clients
# sending header lines for 6 s took it from 49 MB to 3 GB)
MAX_HEAD_BYTES = 64 * 1024
MAX_HEAD_LINES = 128

_TOO_LARGE_RESPONSE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                       b"content-type: text/plain\r\ncontent-length: 25\r\n"
                       b"connection: close\r\n\r\nrequest head is too large")

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                     b"content-length: 33\r\nconnection: close\r\n\r\n"
                     b"request head not complete in time")


def with_head_deadline(base: type[HttpToolsProtocol],
                       seconds: float) -> type[HttpToolsProtocol]:
    """A subclass of ``base`` that gives each request head ``seconds`` to arrive whole."""

    class HeadDeadlineProtocol(base):  # type: ignore[valid-type,misc]
        head_timeout = seconds

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            self._in_head = False       # a request has begun and its head is not whole
            self._message_done = True   # the last request's body is all in (or none yet)
            self._head_size = 0         # bytes and lines of the head being received
            self._head_lines = 0
            self._head_raw = 0          # bytes received while the head is not whole
            self._too_large = False

        def _waiting_for_head(self) -> bool:
            """Between requests: the last response is out and the last request's body is
            in (a route may answer before reading the body; uvicorn then drains it, and
            that is no head's time)."""
            return ((self.cycle is None or self.cycle.response_complete)
                    and self._message_done and not self.pipeline)

        def _arm_head(self) -> None:
            self._cancel_head()
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_expired)

        def _cancel_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not (self._in_head or self._waiting_for_head()):
                return
            if self._in_head:  # part of a head came (silence is just closed)
                self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm_head()

        def on_message_begin(self) -> None:
            self._in_head = True
            self._message_done = False
            self._head_size = self._head_lines = self._head_raw = 0
            super().on_message_begin()

        def _count_head(self, n: int, lines: int = 0) -> None:
            self._head_size += n
            self._head_lines += lines
            if self._head_size > MAX_HEAD_BYTES or self._head_lines > MAX_HEAD_LINES:
                # raised inside httptools' callback: the parser stops, and uvicorn answers
                # through send_400_response (below: 431 instead) and closes
                self._too_large = True
                raise ValueError("request head too large")

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self._too_large and not self.transport.is_closing():
                # all of ``data`` went into a head still not whole: one endless header
                # line is buffered by the parser until its end, never seen by on_header
                self._head_raw += len(data)
                if self._head_raw > MAX_HEAD_BYTES:
                    self._too_large = True
                    self.send_400_response("request head too large")

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4, 1)
            super().on_header(name, value)

        def send_400_response(self, msg: str) -> None:
            if not self._too_large:
                super().send_400_response(msg)
                return
            self._cancel_head()
            if not self.transport.is_closing():
                self.transport.write(_TOO_LARGE_RESPONSE)
                self.transport.close()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._cancel_head()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._message_done = True
            if not self.transport.is_closing() and self._waiting_for_head():
                self._arm_head()  # the response went out before the body was all in

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self._waiting_for_head():
                self._arm_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head()
            super().connection_lost(exc)

    HeadDeadlineProtocol.__name__ = HeadDeadlineProtocol.__qualname__ = (
        f"HeadDeadline{base.__name__}")
    return HeadDeadlineProtocol
