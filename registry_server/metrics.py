"""``/metrics`` (Prometheus text exposition format 0.0.4) and the access log
(spec/serve.md, "Operations").

:class:`Metrics` is thread-safe: routes count through ``ServerContext.count(name, n)``
(names: ``bytes_served``, ``upload_bytes``, ``mirror_hits``, ``mirror_misses``; others
become ``blobctl_<name>_total``), the access-log middleware counts requests by method and
status. The exposition is written here (a few lines; no client library needed).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["AccessLog", "Metrics"]

log = logging.getLogger("blobctl.serve.access")

_HELP = {
    "bytes_served": ("blobctl_bytes_served_total", "Blob bytes sent to clients."),
    "upload_bytes": ("blobctl_upload_bytes_total", "Blob bytes received by uploads."),
    "mirror_hits": ("blobctl_mirror_hits_total", "Misses served from the upstream mirror."),
    "mirror_misses": ("blobctl_mirror_misses_total", "Misses the upstream did not have."),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, float] = {k: 0.0 for k in _HELP}
        self._requests: dict[tuple[str, str], int] = {}
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def count(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self._counters[name] = self._counters.get(name, 0.0) + value

    def request(self, method: str, status: int) -> None:
        with self._lock:
            key = (method, str(status))
            self._requests[key] = self._requests.get(key, 0) + 1

    def value(self, name: str) -> float:
        with self._lock:
            return self._counters.get(name, 0.0)

    def render(self) -> str:
        with self._lock:
            counters = dict(self._counters)
            requests = dict(self._requests)
        out = ["# HELP blobctl_http_requests_total HTTP requests by method and status.",
               "# TYPE blobctl_http_requests_total counter"]
        for (method, status), n in sorted(requests.items()):
            out.append(f'blobctl_http_requests_total{{method="{_escape(method)}",'
                       f'status="{status}"}} {n}')
        for key, value in sorted(counters.items()):
            metric, help_text = _HELP.get(key, (f"blobctl_{key}_total", key))
            out += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter",
                    f"{metric} {_number(value)}"]
        for metric, (help_text, fn) in sorted(self.gauges.items()):
            out += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge",
                    f"{metric} {_number(fn())}"]
        return "\n".join(out) + "\n"

    def routes(self) -> list[BaseRoute]:
        async def metrics(request: Request) -> Response:
            return Response(self.render(), media_type="text/plain; version=0.0.4")

        return [Route("/metrics", metrics, methods=["GET"])]


class AccessLog:
    """ASGI middleware: one line per request on ``stream`` (remote, method, path,
    status, bytes, ms, subject) and the request counters."""

    def __init__(self, app: ASGIApp, metrics: Metrics, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.stream = stream
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 0
        sent = 0

        async def wrapped(message: Message) -> None:
            nonlocal status, sent
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
            elif kind == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)
            if kind == "http.response.zerocopy":  # the server says how much it sent
                sent += int(message.get("sent", message.get("count", 0)))

        try:
            await self.app(scope, receive, wrapped)
        finally:
            self.metrics.request(scope["method"], status or 500)
            if self.enabled:
                client = scope.get("client") or ("-", 0)
                path = scope.get("raw_path", b"").decode("latin-1") or scope["path"]
                if scope.get("query_string"):
                    path += "?" + scope["query_string"].decode("latin-1")
                ms = (time.perf_counter() - t0) * 1000
                line = (f'{client[0]}:{client[1]} {scope["method"]} {path} {status or "-"} '
                        f'{sent} {ms:.1f}ms {scope.get("blobctl.subject", "-")}\n')
                stream = self.stream or sys.stderr
                try:
                    stream.write(line)
                    stream.flush()
                except (OSError, ValueError):
                    pass


def _number(value: float) -> str:
    """A sample value: a whole number exactly (``%g`` kept 6 digits, so a byte counter
    moved in steps of up to 10 MB: found from outside), else Python's shortest repr."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))
