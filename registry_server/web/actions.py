"""The page's actions: pin, unpin, remove, pull by name (spec/serve.md, "Web page").

Every action is a ``POST`` of an HTML form (``application/x-www-form-urlencoded``) and
answers in one of two ways:

* a plain form post gets **303 See Other** back to ``/`` with a one-time note id
  (POST-redirect-GET: reload never repeats the action; works without JavaScript);
* the page's script posts with ``Accept: application/json`` and gets
  ``{"ok": bool, "message": str}`` with the real status code.

Order of checks, before anything changes: (1) same-origin (CSRF): ``Origin`` must name
this host, else ``Referer`` must; ``Sec-Fetch-Site`` other than ``same-origin``/``none``
is refused; no header at all is refused — 403; (2) the caller's credentials: the admin
right on some repository (``authorize(headers, None, Action.ADMIN, None)``), else its
401 (with its challenge) or 403; (3) a declared ``Content-Length`` over ``MAX_FORM``:
413; (4) the body, which must be whole within ``options.head_timeout`` seconds of the
request's head (408); (5) the policy on the named model: ``authorize(headers,
repository, Action.ADMIN, None)`` must be 200, else its 401 or 403. Checks 1-3 need no
body: a request they refuse is answered with ``Connection: close`` and its body is never
read (found from outside: an anonymous head with ``Content-Length: 5000`` and no body
held its connection forever, the form being read before any check; 130 of them under
``ulimit -n 128`` left the server reachable by no one).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from blobstore import ModelName
from blobstore.errors import BlobctlError, ModelNotFound, ModelPinned
from registry_server.context import Action, Activity, Decision, ServerContext
from registry_server.oci import SUBJECT_KEY
from registry_server.web.data import url_repository

__all__ = ["Note", "WebState", "action_routes_handlers", "caller_subject", "same_origin"]

log = logging.getLogger("blobctl.serve.web")

MAX_FORM = 8192  # bytes: our forms carry a model name and a flag or two
PROGRESS_INTERVAL = 0.2  # seconds between progress updates a pull puts in the feed


@dataclass(frozen=True)
class Note:
    """A one-time note (POST-redirect-GET): the outcome of one caller's action."""

    kind: str                 # "ok" | "error"
    text: str
    subject: str              # the policy subject of the caller who acted
    repository: str | None    # the model it names (URL form), if any


@dataclass
class WebState:
    """Per-server state of the page: one-time notes (PRG), live SSE streams, closing."""

    notes: OrderedDict[str, Note] = field(default_factory=OrderedDict)
    streams: int = 0
    closing: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pulls: dict[str, threading.Thread] = field(default_factory=dict)
    limiter: anyio.CapacityLimiter | None = None  # SSE waiters (created on first use)

    def note(self, note: Note) -> str:
        """Keep ``note``; its id, random (a note is read only by the one redirected to
        it: found from outside, sequential ids let anyone read and consume the admin's
        "pinned secret:1")."""
        with self.lock:
            n = secrets.token_urlsafe(12)
            self.notes[n] = note
            while len(self.notes) > 200:
                self.notes.popitem(last=False)
            return n

    def take_note(self, n: str, subject: str, visible: Callable[[str], bool]) -> Note | None:
        """The note ``n`` if ``subject`` left it and the model it names is ``visible``
        to the caller (then it is gone); else None, and the note stays for its owner."""
        with self.lock:
            note = self.notes.get(n)
            if note is None or note.subject != subject or (
                    note.repository is not None and not visible(note.repository)):
                return None
            del self.notes[n]
            return note


def caller_subject(ctx: ServerContext, request: Request) -> str:
    """The policy subject of the caller (credentials only, no repository), recorded for
    the access log's SUBJECT (spec/serve.md, "Operations")."""
    subject = ctx.policy.authorize(request.headers, None, Action.READ, None).subject
    request.scope[SUBJECT_KEY] = subject
    return subject


def same_origin(headers: Mapping[str, str]) -> bool:
    """Whether a state-changing request comes from a page of this very server.

    ``Origin`` (sent by browsers on every POST) is compared with ``Host``; without it,
    ``Referer``; with neither, the request is refused. ``Sec-Fetch-Site``, when present,
    must be ``same-origin`` (or ``none``: typed by the user)."""
    host = headers.get("host", "").lower()
    if not host:
        return False
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    source = headers.get("origin") or headers.get("referer")
    if not source or source == "null":
        return False
    parts = urlsplit(source)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _refuse_early(ctx: ServerContext, request: Request) -> None:
    """The checks that need no body: same origin, then the admin right on some
    repository (the one the form names is checked once it is read), then a declared
    length over ``MAX_FORM``. Raises :class:`_Refused`."""
    if not same_origin(request.headers):
        raise _Refused(403, "refused: the request does not come from this page (CSRF check)")
    d = ctx.policy.authorize(request.headers, None, Action.ADMIN, None)
    request.scope[SUBJECT_KEY] = d.subject
    if not d.allowed:
        raise _denied(d, "no admin right")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.strip().isdigit()
                                 or int(declared) > MAX_FORM):
        raise _Refused(413, "form too large")


async def _body(request: Request, seconds: float) -> bytes:
    """The request's body, whole within ``seconds`` (else 408) and at most ``MAX_FORM``
    bytes (else 413)."""
    body = b""
    with anyio.move_on_after(seconds) as scope:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                raise _Refused(413, "form too large")
    if scope.cancelled_caught:
        raise _Refused(408, "the form did not arrive in time")
    return body


def _parse(body: bytes) -> dict[str, str]:
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=16)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Refused(400, "the form does not decode") from exc
    return {k: v[-1] for k, v in fields.items()}


def _name(fields: Mapping[str, str]) -> ModelName:
    text = fields.get("name", "").strip()
    if not text:
        raise _Refused(400, "no model name given")
    try:
        return ModelName.parse(text)
    except BlobctlError as exc:
        raise _Refused(400, exc.message) from exc


def _denied(d: Decision, reason: str) -> _Refused:
    extra = {"WWW-Authenticate": d.challenge} if d.status == 401 and d.challenge else {}
    msg = ("sign in with a token that has the admin right" if d.status == 401
           else f"not allowed: {d.reason or reason}")
    return _Refused(d.status, msg, extra)


def _authorize(ctx: ServerContext, request: Request, name: ModelName) -> Decision:
    d = ctx.policy.authorize(request.headers, url_repository(name), Action.ADMIN, None)
    request.scope[SUBJECT_KEY] = d.subject
    if not d.allowed:
        raise _denied(d, "no admin right on " + url_repository(name))
    return d


def _answer(request: Request, state: WebState, ok: bool, message: str,
            status: int = 200, headers: dict[str, str] | None = None,
            anchor: str = "", *, subject: str, repository: str | None = None) -> Response:
    if _wants_json(request):
        return JSONResponse({"ok": ok, "message": message}, status_code=status,
                            headers=headers)
    if status in (401, 403, 408, 413):
        # no redirect: the status is the answer (a browser answers 401 by asking for
        # credentials and posting again)
        from registry_server.web.render import error_page

        return HTMLResponse(error_page(status, message), status_code=status, headers=headers)
    n = state.note(Note("ok" if ok else "error", message, subject, repository))
    return RedirectResponse(f"/?note={n}{anchor}", status_code=303, headers=headers)


def _run_pull(ctx: ServerContext, state: WebState, name: ModelName, insecure: bool,
              act: Activity) -> None:
    """The body of a pull thread: ``registry_client.pull`` with its progress in the feed."""
    from registry_client import PullOptions, pull

    layers: dict[str, tuple[int, int]] = {}
    last = 0.0

    def progress(event: dict[str, Any]) -> None:
        nonlocal last
        digest = event.get("digest")
        if digest is None:
            return
        layers[str(digest)] = (int(event.get("total") or 0), int(event.get("completed") or 0))
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL:
            last = now
            ctx.activity.update(act, done=sum(c for _, c in layers.values()),
                                total=sum(t for t, _ in layers.values()))

    try:
        pull(name, store=ctx.store, progress=progress, options=PullOptions(insecure=insecure))
    except BlobctlError as exc:
        log.warning("pull %s from the web page failed: %s", name, exc.message)
        ctx.activity.end(act, error=exc.message)
    except Exception as exc:  # a thread's boundary: the feed must say it ended
        log.exception("pull %s from the web page failed", name)
        ctx.activity.end(act, error=f"{type(exc).__name__}: {exc}")
    else:
        ctx.activity.update(act, done=sum(c for _, c in layers.values()),
                            total=sum(t for t, _ in layers.values()))
        ctx.activity.end(act)
    finally:
        with state.lock:
            state.pulls.pop(name.key, None)


def start_pull(ctx: ServerContext, state: WebState, name: ModelName,
               insecure: bool) -> tuple[bool, str]:
    """Start pulling ``name`` in a background thread (one pull per name at a time)."""
    with state.lock:
        if name.key in state.pulls:
            return False, f"{name.display()} is already being pulled"
        act = ctx.activity.start("pull", str(name))
        t = threading.Thread(target=_run_pull, args=(ctx, state, name, insecure, act),
                             name=f"web-pull {name}", daemon=True)
        state.pulls[name.key] = t
    t.start()
    return True, f"pulling {name.display()}"


def action_routes_handlers(ctx: ServerContext, state: WebState) -> dict[str, Any]:
    """The four action endpoints, keyed by their path under ``/ui/actions/``."""

    async def handle(request: Request, kind: str) -> Response:
        name: ModelName | None = None
        body_read = False
        try:
            _refuse_early(ctx, request)
            body = await _body(request, ctx.options.head_timeout)
            body_read = True
            fields = _parse(body)
            name = _name(fields)
            subject = _authorize(ctx, request, name).subject
        except _Refused as r:
            subject = request.scope.get(SUBJECT_KEY) or caller_subject(ctx, request)
            headers = dict(r.headers)
            if not body_read:
                # the body is not read, nor drained: the connection ends with the answer
                headers["Connection"] = "close"
            return _answer(request, state, False, r.message, r.status, headers,
                           subject=subject,
                           repository=url_repository(name) if name is not None else None)
        anchor = ""
        repository = url_repository(name)

        def answer(ok: bool, message: str, status: int = 200, anchor: str = "") -> Response:
            return _answer(request, state, ok, message, status, anchor=anchor,
                           subject=subject, repository=repository)

        try:
            if kind in ("pin", "unpin"):
                canonical = await anyio.to_thread.run_sync(
                    ctx.store.set_pinned, name, kind == "pin")
                msg = f"{'pinned' if kind == 'pin' else 'unpinned'} {canonical.display()}"
                from registry_server.web.data import row_id

                anchor = f"#{row_id(canonical)}"
                return answer(True, msg, anchor=anchor)
            if kind == "remove":
                if fields.get("confirm") != "yes" and not _wants_json(request):
                    from urllib.parse import quote

                    return RedirectResponse(f"/?remove={quote(str(name))}#confirm",
                                            status_code=303)
                res = await anyio.to_thread.run_sync(ctx.store.remove_model, name)
                from blobstore.units import human_bytes

                return answer(True, f"removed {res.name.display()}: "
                                    f"{human_bytes(res.freed_bytes)} freed")
            ok, msg = start_pull(ctx, state, name, fields.get("insecure") in ("1", "on", "yes"))
            return answer(ok, msg, 202 if ok else 409, anchor="#transfers")
        except ModelPinned:
            return answer(False,
                          f"{name.display()} is pinned: unpin it first, then remove it", 409)
        except ModelNotFound:
            return answer(False, f"{name.display()} is not in the store", 404)
        except BlobctlError as exc:
            msg = exc.message + (f" ({exc.hint})" if exc.hint else "")
            return answer(False, msg, 409)

    async def pin(request: Request) -> Response:
        return await handle(request, "pin")

    async def unpin(request: Request) -> Response:
        return await handle(request, "unpin")

    async def remove(request: Request) -> Response:
        return await handle(request, "remove")

    async def pull_(request: Request) -> Response:
        return await handle(request, "pull")

    return {"pin": pin, "unpin": unpin, "remove": remove, "pull": pull_}
