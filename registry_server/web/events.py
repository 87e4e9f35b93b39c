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
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from blobstore import ModelName
from blobstore.errors import BlobctlError
from registry_server.context import Activity, ServerContext
from registry_server.web.actions import WebState
from registry_server.web.data import url_repository
from registry_server.web.render import activity_items

__all__ = ["HEARTBEAT", "WAIT", "events_endpoint", "visible_activity"]

HEARTBEAT = 10.0
WAIT = 1.0
MAX_STREAMS = 64


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

        async def stream() -> AsyncIterator[str]:
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

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    return events
