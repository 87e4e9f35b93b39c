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
the connection is closed. The clock runs between requests: from the accept, or from when
the last response is out and the last request's body is all in (or the next head has
begun). A route that answers before reading a body (e.g. 401) leaves uvicorn draining it:
that gets ``2 * seconds`` from the response's end, then the connection closes (nginx's
lingering close; found by review: nothing bounded it).
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
            self._begins = 0            # requests begun on this connection
            self._too_large = False

        def _response_out(self) -> bool:
            return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

        def _waiting_for_head(self) -> bool:
            """Between requests: the last response is out and the next head is awaited,
            or has begun (a head begun while the last response was going out counts from
            that response's end: found by review, it was never clocked)."""
            return self._response_out() and (self._message_done or self._in_head)

        def _draining(self) -> bool:
            """A route answered before the request's body was all in: uvicorn reads the
            rest and drops it. No route clocks that, so it gets ``2 * head_timeout`` from
            the response's end (as nginx's lingering close), then the connection closes."""
            return self._response_out() and not self._message_done and not self._in_head

        def _arm_head(self, seconds: float | None = None) -> None:
            self._cancel_head()
            self._head_timer = self.loop.call_later(
                self.head_timeout if seconds is None else seconds, self._head_expired)

        def _cancel_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self._waiting_for_head():
                if self._in_head:  # part of a head came (silence is just closed)
                    self.transport.write(_TIMEOUT_RESPONSE)
                self.transport.close()
            elif self._draining():
                self.transport.close()

        def _after_response_or_body(self) -> None:
            if self.transport.is_closing():
                return
            if self._waiting_for_head():
                self._arm_head()
            elif self._draining():
                self._arm_head(2 * self.head_timeout)

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm_head()

        def on_message_begin(self) -> None:
            self._in_head = True
            self._message_done = False
            self._begins += 1
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
            begins = self._begins
            super().data_received(data)
            if (self._in_head and self._begins == begins and not self._too_large
                    and not self.transport.is_closing()):
                # all of ``data`` went into a head begun before it and still not whole
                # (one endless header line is buffered by the parser until its end, never
                # seen by on_header); a head that began inside ``data`` is counted from
                # the next read (found by review: a body's bytes before it were counted)
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
            self._after_response_or_body()  # (after an early answer: the drain is over)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._after_response_or_body()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head()
            super().connection_lost(exc)

    HeadDeadlineProtocol.__name__ = HeadDeadlineProtocol.__qualname__ = (
        f"HeadDeadline{base.__name__}")
    return HeadDeadlineProtocol
