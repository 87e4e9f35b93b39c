"""The page's routes, assembled for one :class:`ServerContext`."""

from __future__ import annotations

import time
import weakref
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from blobstore import ModelName
from blobstore.errors import BlobctlError
from registry_server.context import Action, ServerContext
from registry_server.oci import SUBJECT_KEY
from registry_server.web import render
from registry_server.web.actions import WebState, action_routes_handlers, caller_subject
from registry_server.web.data import bench_rows, model_rows, usage_view
from registry_server.web.events import HEARTBEAT, events_endpoint, visible_activity

__all__ = ["STATIC", "close", "open_streams", "routes"]

STATIC = Path(__file__).resolve().parent / "static"
STREAM_LIFETIME = 30.0

# by id(ctx), with a weak reference to check it (ServerContext is not hashable)
_STATES: dict[int, tuple[weakref.ref[ServerContext], WebState]] = {}


def close(ctx: ServerContext) -> None:
    """End every event stream of the page served for ``ctx`` (within ``events.WAIT``
    seconds); later streams end at once. Idempotent."""
    entry = _STATES.get(id(ctx))
    if entry is not None and entry[0]() is ctx:
        entry[1].closing.set()


def _note(ctx: ServerContext, request: Request, state: WebState) -> tuple[str, str] | None:
    """The one-time note of ``?note=``: only for the caller who acted (same policy
    subject), and never one naming a model the caller may not see (then it stays)."""
    n = request.query_params.get("note", "")
    if not n:
        return None
    note = state.take_note(n, caller_subject(ctx, request),
                           lambda repo: ctx.policy.visible(request.headers, repo))
    return (note.kind, note.text) if note is not None else None


def routes(ctx: ServerContext, *, stream_lifetime: float = STREAM_LIFETIME,
           heartbeat: float = HEARTBEAT) -> list[BaseRoute]:
    """The page's routes (see the package docstring). ``stream_lifetime`` and
    ``heartbeat`` (seconds) shape ``/ui/events`` (spec/serve.md, "Live transfers")."""
    state = WebState()
    for k in [k for k, (ref, _) in _STATES.items() if ref() is None]:
        del _STATES[k]
    _STATES[id(ctx)] = (weakref.ref(ctx), state)
    headers_nocache = {"Cache-Control": "no-store"}

    def can_admin(request: Request, repos: list[str]) -> set[str]:
        return {r for r in repos
                if ctx.policy.authorize(request.headers, r, Action.ADMIN, None).allowed}

    def index(request: Request) -> Response:  # sync: Starlette runs it in a worker thread
        t0 = time.monotonic()
        h = request.headers
        caller_subject(ctx, request)
        du = ctx.store.disk_usage()
        rows = model_rows(ctx, h, du)
        admin = can_admin(request, [r.repository for r in rows])
        can_pull = ctx.policy.authorize(h, None, Action.ADMIN, None).allowed
        anonymous = ctx.policy.authorize(h, None, Action.READ, None).status == 401
        version, acts = ctx.activity.snapshot()
        confirm = ""
        target = request.query_params.get("remove")
        if target:
            try:
                ModelName.parse(target)
                confirm = render.confirm_section(target)
            except BlobctlError:
                confirm = ""
        transfers = render.transfers_section(visible_activity(ctx, h, acts), can_pull,
                                             sign_in=anonymous)
        body = render.page(
            store_path=str(ctx.store.root), models=render.models_section(rows, admin),
            usage=render.usage_section(usage_view(ctx, h, du)), transfers=transfers,
            bench=render.bench_section(bench_rows(ctx.store, ctx, h)),
            note=_note(ctx, request, state), confirm=confirm, version=version,
            render_ms=(time.monotonic() - t0) * 1000)
        return HTMLResponse(body, headers={**headers_nocache,
                                           "Referrer-Policy": "same-origin",
                                           "X-Content-Type-Options": "nosniff",
                                           "Content-Security-Policy":
                                               "default-src 'self'; style-src 'self' "
                                               "'unsafe-inline'; frame-ancestors 'none'"})

    def api_models(request: Request) -> Response:
        caller_subject(ctx, request)
        rows = model_rows(ctx, request.headers)
        return JSONResponse({"models": [r.as_json() for r in rows]}, headers=headers_nocache)

    def api_usage(request: Request) -> Response:
        caller_subject(ctx, request)
        return JSONResponse(usage_view(ctx, request.headers).as_json(),
                            headers=headers_nocache)

    def api_activity(request: Request) -> Response:
        caller_subject(ctx, request)
        version, acts = ctx.activity.snapshot()
        return JSONResponse({"version": version, "items": [
            a.as_json() for a in visible_activity(ctx, request.headers, acts)]},
            headers=headers_nocache)

    def api_bench(request: Request) -> Response:
        caller_subject(ctx, request)
        return JSONResponse({"bench": [b.as_json() for b in
                                       bench_rows(ctx.store, ctx, request.headers)]},
                            headers=headers_nocache)

    def login(request: Request) -> Response:
        # a caller who sent no credentials where the policy wants some is challenged,
        # whatever its anonymous rights allow (found by review: with anonymous push
        # rights, sign-in answered 303 to / and a token holder could never sign in)
        d = ctx.policy.authorize(request.headers, None, Action.READ, None)
        if d.status != 401:
            d = ctx.policy.authorize(request.headers, None, Action.ADMIN, None)
        request.scope[SUBJECT_KEY] = d.subject
        if d.allowed:
            return RedirectResponse("/", status_code=303)
        extra = {"WWW-Authenticate": d.challenge} if d.status == 401 and d.challenge else {}
        return HTMLResponse(render.error_page(d.status, "sign in with a token that has the "
                                              "admin right"), status_code=d.status,
                            headers=extra)

    acts = action_routes_handlers(ctx, state)
    return [
        Route("/", index, methods=["GET"], name="web-index"),
        Route("/ui/api/models", api_models, methods=["GET"]),
        Route("/ui/api/usage", api_usage, methods=["GET"]),
        Route("/ui/api/activity", api_activity, methods=["GET"]),
        Route("/ui/api/bench", api_bench, methods=["GET"]),
        Route("/ui/events", events_endpoint(ctx, state, stream_lifetime, heartbeat),
              methods=["GET"]),
        Route("/ui/login", login, methods=["GET"]),
        *[Route(f"/ui/actions/{k}", fn, methods=["POST"]) for k, fn in acts.items()],
        Mount("/ui/static", StaticFiles(directory=STATIC), name="web-static"),
    ]


def open_streams(ctx: ServerContext) -> int:
    """How many ``/ui/events`` streams are open for ``ctx`` (for metrics and tests)."""
    entry = _STATES.get(id(ctx))
    return entry[1].streams if entry is not None and entry[0]() is ctx else 0
