"""The ASGI application of ``blobctl serve`` (spec/serve.md).

:func:`create_app` assembles the rooms' routes over one :class:`ServerContext`: the OCI
distribution API (``oci``/``uploads``), ``/metrics``, and the rooms built beside it
(``auth`` for ``/token``, ``web`` for the page) when they are present.
"""

from __future__ import annotations

from typing import TextIO

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from registry_server import auth, oci, web
from registry_server.context import ServerContext
from registry_server.metrics import AccessLog, Metrics

__all__ = ["create_app"]


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
    app = Starlette(routes=routes)
    app.state.metrics = metrics
    app.state.oci = api
    app.state.ctx = ctx
    app.add_middleware(AccessLog, metrics=metrics, stream=log_stream,
                       enabled=access_log)
    return app


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
