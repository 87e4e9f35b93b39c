"""``/ui/events``: live pulls and mirror fetches as server-sent events.

One event per change of the activity feed (``event: activity``, ``data:`` a JSON
object ``{"version", "items", "html"}``), a comment line as heartbeat every
``HEARTBEAT`` seconds of silence. ``ActivityFeed.wait_change`` blocks, so it runs in a
worker thread under a limiter of its own (SSE clients never starve the default
thread pool) for at most ``WAIT`` seconds at a time. A stream ends when the client
disconnects (Starlette cancels it), when :func:`registry_server.web.close` is called
(the server is shutting down), or after ``lifetime`` seconds; the browser's
``EventSource`` then reconnects by itself, so a server that never calls ``close``
still shuts down within that bound.

Those ends are checked when the stream resumes, which a ``send`` blocked on a client
that stopped reading never does (found from outside: five such clients kept their
streams past the lifetime and held serve's shutdown for its whole 10 s grace, each
ending in an "Exception in ASGI application" traceback). So every send is bounded:
one the client has not taken within ``SEND_TIMEOUT`` seconds, or still waiting when
``close`` is called, cuts the connection (``responses.cut_response`` with ``abort``:
the unsent bytes are dropped, quietly on serve's protocol).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from blobstore import ModelName
from blobstore.errors import BlobctlError
from registry_server.context import Activity, ServerContext
from registry_server.responses import cut_response
from registry_server.web.actions import WebState, caller_subject
from registry_server.web.data import url_repository
from registry_server.web.render import activity_items

__all__ = ["HEARTBEAT", "SEND_TIMEOUT", "WAIT", "events_endpoint", "visible_activity"]

HEARTBEAT = 10.0
WAIT = 1.0
MAX_STREAMS = 64
SEND_TIMEOUT = 5.0    # a client that takes no event for this long is dropped
CLOSING_SEND = 0.5    # once close() was called: how long a send may still wait
CLOSE_POLL = 0.2      # how often a stream looks at the closing flag while it sends


class EventStreamResponse(Response):
    """A ``text/event-stream`` response whose every send is bounded (module docstring).

    Ends cleanly (the last chunk of the chunked body) when ``chunks`` is exhausted and
    the client took it; is cut when a send does not finish within ``SEND_TIMEOUT`` (or
    ``CLOSING_SEND`` after ``closing`` is set, a send already waiting then is cut at
    once); stops when the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncGenerator[str, None], closing: threading.Event,
                 headers: Mapping[str, str], send_timeout: float = SEND_TIMEOUT) -> None:
        self.chunks = chunks
        self.closing = closing
        self.send_timeout = send_timeout
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sending: list[anyio.CancelScope] = []

        async def bounded(message: dict[str, Any]) -> bool:
            """Send ``message``; False when it was not taken in time (nothing of it went
            out: uvicorn waits for room before it writes)."""
            limit = CLOSING_SEND if self.closing.is_set() else self.send_timeout
            with anyio.move_on_after(limit) as sc:
                sending.append(sc)
                try:
                    await send(message)
                finally:
                    sending.remove(sc)
            return not sc.cancelled_caught

        gone = taken = False

        async def until_disconnect() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            tg.cancel_scope.cancel()

        async def until_closing() -> None:
            while not self.closing.is_set():
                await anyio.sleep(CLOSE_POLL)
            for sc in sending:  # later sends get CLOSING_SEND
                sc.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(until_disconnect)
            tg.start_soon(until_closing)
            if await bounded({"type": "http.response.start", "status": self.status_code,
                              "headers": self.raw_headers}):
                async with aclosing(self.chunks):
                    async for chunk in self.chunks:
                        if not await bounded({"type": "http.response.body",
                                              "body": chunk.encode(), "more_body": True}):
                            break
                    else:
                        taken = await bounded({"type": "http.response.body", "body": b"",
                                               "more_body": False})
            tg.cancel_scope.cancel()
        if not taken and not gone:
            await cut_response(scope, send, abort=True)


def visible_activity(ctx: ServerContext, headers: Mapping[str, str],
                     items: list[Activity]) -> list[Activity]:
    out = []
    for a in items:
        try:
            repo = url_repository(ModelName.parse(a.name))
        except BlobctlError:
            repo = a.name
        if ctx.policy.visible(headers, repo):
            out.append(a)
    return out


def events_endpoint(ctx: ServerContext, state: WebState, lifetime: float,
                    heartbeat: float = HEARTBEAT) -> Callable[[Request], Awaitable[Response]]:
    async def events(request: Request) -> Response:
        if state.limiter is None:
            state.limiter = anyio.CapacityLimiter(MAX_STREAMS)
        headers = request.headers
        caller_subject(ctx, request)

        async def stream() -> AsyncGenerator[str, None]:
            assert state.limiter is not None
            with state.lock:
                state.streams += 1
            try:
                yield "retry: 2000\n\n"
                seen = -1
                last_sent = time.monotonic()
                end = last_sent + lifetime
                while not state.closing.is_set() and time.monotonic() < end:
                    version, items = ctx.activity.snapshot()
                    now = time.monotonic()
                    if version != seen:
                        seen = version
                        shown = visible_activity(ctx, headers, items)
                        doc = {"version": version, "items": [a.as_json() for a in shown],
                               "html": activity_items(shown)}
                        yield (f"event: activity\nid: {version}\n"
                               f"data: {json.dumps(doc, separators=(',', ':'))}\n\n")
                        last_sent = now
                    elif now - last_sent >= heartbeat:
                        yield ": heartbeat\n\n"
                        last_sent = now
                    await anyio.to_thread.run_sync(ctx.activity.wait_change, seen,
                                                   min(WAIT, heartbeat),
                                                   limiter=state.limiter,
                                                   abandon_on_cancel=True)
            finally:
                with state.lock:
                    state.streams -= 1

        return EventStreamResponse(stream(), state.closing,
                                   {"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return events
