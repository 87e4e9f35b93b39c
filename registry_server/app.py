"""The ASGI application of ``blobctl serve`` (spec/serve.md).

:func:`create_app` assembles the rooms' routes over one :class:`ServerContext`: the OCI
distribution API (``oci``/``uploads``), ``/metrics``, and the rooms built beside it
(``auth`` for ``/token``, ``web`` for the page) when they are present.
"""

from __future__ import annotations

import logging
from typing import TextIO

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blobstore.errors import BlobctlError, InsufficientSpace, StoreBusy
from registry_server import auth, oci, web
from registry_server.context import ServerContext
from registry_server.metrics import AccessLog, Metrics
from registry_server.responses import SEND_TIMEOUT, oci_error, os_error

__all__ = ["create_app"]

log = logging.getLogger("blobctl.serve")


def create_app(ctx: ServerContext, *, access_log: bool = True,
               log_stream: TextIO | None = None) -> Starlette:
    """The server's ASGI app. Sets ``ctx.counter`` to the metrics' counter; the app's
    ``state`` holds ``metrics`` and ``oci`` (upload sessions, stream leases) for the runner
    to close at shutdown."""
    metrics = Metrics()
    ctx.counter = metrics.count
    api, oci_routes = oci.routes(ctx)
    metrics.gauges["blobctl_active_streams"] = (
        "Blob responses being sent.", lambda: float(api.active_streams))
    metrics.gauges["blobctl_upload_sessions"] = (
        "Open upload sessions.", lambda: float(len(api.uploads.sessions)))
    routes: list[BaseRoute] = [
        *oci_routes,
        *metrics.routes(),
        *auth.routes(ctx),
        *web.routes(ctx),  # "/" and /ui/...: after the API routes
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
    app.state.metrics = metrics
    app.state.oci = api
    app.state.ctx = ctx
    app.add_middleware(_ApiVersion)
    app.add_middleware(AccessLog, metrics=metrics, stream=log_stream,
                       enabled=access_log)
    app.add_middleware(_SendTimeout, seconds=ctx.options.send_timeout)
    return app


class _SendTimeout:
    """Tells a server that offers the ``SEND_TIMEOUT`` extension (``zerocopy.py``) the
    send timeout of ``serve --send-timeout`` (spec/serve.md, "Operations": slow clients)."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = (scope.get("extensions") or {}).get(SEND_TIMEOUT)
        if isinstance(limit, dict):
            limit["seconds"] = self.seconds
        await self.app(scope, receive, send)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (a method a route does not take: ``PUT /v2/``, ``TRACE``)
    are OCI errors under ``/v2`` (405 ``UNSUPPORTED``, with its ``Allow``), as every
    route's own are (found from outside: ``OPTIONS /v2/`` was a text/plain 405); plain
    text elsewhere, as Starlette answers."""
    assert isinstance(exc, HTTPException)
    if not request.url.path.startswith("/v2"):
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
    code = {405: "UNSUPPORTED", 404: "NAME_UNKNOWN"}.get(exc.status_code, "UNKNOWN")
    message = (f"{request.method} is not supported here" if exc.status_code == 405
               else str(exc.detail))
    return oci_error(exc.status_code, code, message,
                     headers={**oci.API_VERSION_HEADERS, **(exc.headers or {})})


def _store_error(exc: BlobctlError) -> Response:
    """A store error no route answered itself (a store on a read-only mount or a full
    disk, a busy lock) is an OCI error, not a bare text/plain 500 (found from outside)."""
    status = (507 if isinstance(exc, InsufficientSpace) else
              503 if isinstance(exc, StoreBusy) else 500)
    headers = dict(oci.API_VERSION_HEADERS)
    if status == 503:
        headers["Retry-After"] = "1"
    return oci_error(status, "UNKNOWN", exc.message, headers=headers)


def _os_error(exc: OSError) -> Response:
    """An OS error no route answered itself, before its response began: out of file
    descriptors (EMFILE/ENFILE; found from outside under ``ulimit -n 64``: even a lazy
    import failed) is a passing overload, 503 with ``Retry-After``; any other is a 500.
    Both OCI errors, never uvicorn's bare text/plain 500 with a traceback."""
    log.warning("request failed: %s", exc)
    return os_error(exc, exc.strerror or str(exc), oci.API_VERSION_HEADERS)


class _ApiVersion:
    """``Docker-Distribution-API-Version`` on every ``/v2/`` response, errors of every
    route included (spec/serve.md; found from outside: some 400s and 404s lacked it),
    and a store or OS error raised before a route's response began answered as an OCI
    error (one raised mid-body goes on up: the server cuts that connection)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v2"):
            await self.app(scope, receive, send)
            return

        started = False

        async def with_header(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"docker-distribution-api-version"
                           for k, _ in headers):
                    headers.append((b"docker-distribution-api-version", b"registry/2.0"))
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, with_header)
        except BlobctlError as exc:
            if started:
                raise
            await _store_error(exc)(scope, receive, send)
        except OSError as exc:
            if started:
                raise
            await _os_error(exc)(scope, receive, send)


def begin_shutdown(app: Starlette) -> None:
    """The server stops accepting: end the page's event streams (they would otherwise
    hold the graceful shutdown for its whole grace period)."""
    web.close(app.state.ctx)


def close_app(app: Starlette) -> None:
    """Release what the app holds (upload temp files, stream leases, the mirror's
    client); idempotent enough to call once at exit."""
    begin_shutdown(app)
    api = app.state.oci
    api.uploads.close()
    api.leases.close()
    mirror = app.state.ctx.mirror
    close = getattr(mirror, "close", None)
    if close is not None:
        close()
