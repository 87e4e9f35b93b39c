"""A front shaped like real registries, over the real ``docker-registry`` (tests/servers.py).

``RegistryFront`` listens on 127.0.0.1 and passes every request through to the registry,
except where its settings (plain attributes, changed at any time) say otherwise:

==================  =================================================================
``redirect``        blob ``GET``/``HEAD`` -> ``307`` to the object store, a server on
                    another origin (127.0.0.2) with a presigned-looking query string
``store_head``      what the object store answers to ``HEAD`` (200: the blob's headers,
                    as the registry gives them; anything else: that status, an S3-style
                    XML error; S3 and R2 answer 403 on a URL signed for ``GET`` only)
``store_fail``      the object store answers this many ``GET``\\ s with 500 first
``manifest_head``   what ``HEAD`` of a manifest answers: 0 passes it through; 200
                    passes it through without ``Docker-Content-Digest`` (as a few
                    registries and proxies do); anything else: that status, no body
==================  =================================================================

Only the object store serves blob bytes when ``redirect`` is on (``Range`` passed on).
Every request is recorded (``log``: ``(server, method, path, status)``).
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["RegistryFront"]

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "date",
                  "server"})


class _Server(ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up is part of the tests


class RegistryFront:
    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.redirect = False
        self.store_head = 200
        self.store_fail = 0
        self.manifest_head = 0
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, str, int]] = []
        self._servers: list[_Server] = []

    # ------------------------------------------------------------------ life
    def __enter__(self) -> RegistryFront:
        front = type("Front", (_FrontHandler,), {"front": self})
        store = type("Store", (_StoreHandler,), {"front": self})
        self._servers = [_Server(("127.0.0.1", 0), front), _Server(("127.0.0.2", 0), store)]
        for s in self._servers:
            threading.Thread(target=s.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()

    def __repr__(self) -> str:  # short: hypothesis prints fixtures with a failing example
        return f"RegistryFront({self.netloc})"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.netloc}"

    @property
    def store_url(self) -> str:
        return f"http://127.0.0.2:{self._servers[1].server_address[1]}"

    def record(self, server: str, method: str, path: str, status: int) -> None:
        with self.lock:
            self.log.append((server, method, path, status))

    def take_store_fail(self) -> bool:
        with self.lock:
            if self.store_fail > 0:
                self.store_fail -= 1
                return True
            return False

    def backend(self, method: str, path: str, headers: dict[str, str], body: bytes | None
                ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.backend_port, timeout=60)
        conn.request(method, path, body=body, headers=headers)
        return conn, conn.getresponse()


class _Handler(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    front: RegistryFront
    name = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def answer(self, status: int, body: bytes = b"",
               headers: list[tuple[str, str]] | None = None) -> None:
        self.front.record(self.name, self.command, self.path, status)
        self.send_response(status)
        for k, v in headers or []:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def relay(self, path: str, *, drop: frozenset[str] = frozenset()) -> None:
        """Pass the request to the registry as ``path`` and its answer back, streamed."""
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        hdrs = {k: v for k, v in self.headers.items()
                if k.lower() not in ("host", "connection", "authorization")}
        conn, r = self.front.backend(self.command, path, hdrs, body)
        try:
            self.front.record(self.name, self.command, self.path, r.status)
            self.send_response(r.status)
            for k, v in r.getheaders():
                if k.lower() in _HOP or k.lower() in drop:
                    continue
                if k.lower() == "location":
                    self.send_header(k, v.replace(f"127.0.0.1:{self.front.backend_port}",
                                                  self.front.netloc))
                else:
                    self.send_header(k, v)
            length = r.getheader("Content-Length")
            if length is not None:
                self.send_header("Content-Length", length)
            else:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command == "HEAD":
                return
            while block := r.read(1 << 16):
                if length is None:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                else:
                    self.wfile.write(block)
            if length is None:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            conn.close()


class _FrontHandler(_Handler):
    name = "front"

    def handle_any(self) -> None:
        f = self.front
        path = urllib.parse.urlsplit(self.path).path
        if "/manifests/" in path and self.command == "HEAD" and f.manifest_head:
            if f.manifest_head == 200:
                return self.relay(self.path, drop=frozenset({"docker-content-digest"}))
            return self.answer(f.manifest_head)
        if ("/blobs/" in path and "/uploads" not in path and f.redirect
                and self.command in ("GET", "HEAD")):
            repo, digest = path[len("/v2/"):].rpartition("/blobs/")[::2]
            query = urllib.parse.urlencode({"repo": repo, "X-Amz-Signature": "c0ffee"})
            return self.answer(307, headers=[("Location",
                                              f"{f.store_url}/store/{digest}?{query}")])
        return self.relay(self.path)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any


class _StoreHandler(_Handler):
    name = "store"

    def handle_any(self) -> None:
        f = self.front
        u = urllib.parse.urlsplit(self.path)
        if "Authorization" in self.headers:  # credentials never go to another origin
            return self.answer(400, b"<Error><Code>InvalidArgument</Code></Error>")
        repo = urllib.parse.parse_qs(u.query).get("repo", [""])[0]
        digest = u.path.rpartition("/")[2]
        if self.command == "HEAD" and f.store_head != 200:
            return self.answer(f.store_head, b"<Error><Code>AccessDenied</Code></Error>",
                               [("Content-Type", "application/xml")])
        if self.command == "GET" and f.take_store_fail():
            return self.answer(500, b"<Error><Code>InternalError</Code></Error>",
                               [("Content-Type", "application/xml")])
        if self.command not in ("GET", "HEAD"):
            return self.answer(405)
        return self.relay(f"/v2/{repo}/blobs/{digest}",
                          drop=frozenset({"docker-content-digest",
                                          "docker-distribution-api-version"}))

    do_GET = do_HEAD = do_POST = do_PUT = handle_any
