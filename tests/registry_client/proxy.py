"""A counting HTTP proxy in front of a registry, and a registry that refuses pushes.

``CountingProxy`` forwards every request to ``upstream`` (Host header kept as the
proxy's, so the registry's absolute upload URLs point back at the proxy), counts the
request body bytes it forwarded, can read request bodies slowly (``rate``), and sets
``patch_started`` when the body of PATCH number ``signal_patch`` starts arriving. A
body that does not arrive in full (its client was killed) is never forwarded.

``RefusingRegistry``: answers an OCI push the way a registry that only takes standard
media types does: blobs are taken, a manifest with other media types is refused with
``400 MANIFEST_INVALID``.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


def _peer_gone(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@dataclass
class CountingProxy:
    upstream: str
    rate: int = 0                       # body bytes per second read from clients (0: fast)
    signal_patch: int = 0               # 1-based number of the PATCH that sets the event
    body_bytes: int = 0                 # forwarded request body bytes
    patches: int = 0
    patch_started: threading.Event = field(default_factory=threading.Event)
    token: str | None = None            # require "Authorization: Bearer <token>"
    token_scopes: list[str] = field(default_factory=list)  # scopes asked at /token
    # requests whose response is lost after the registry applied them: method -> the
    # 1-based numbers of that method's requests (the client's connection is reset)
    lose: dict[str, set[int]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: _Server | None = None

    @property
    def netloc(self) -> str:
        assert self._httpd is not None
        return f"127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> CountingProxy:
        proxy = self
        client = httpx.Client(timeout=60)

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _deny(self) -> bool:
                if proxy.token is None:
                    return False
                if self.path.startswith("/token"):
                    from urllib.parse import parse_qs, urlsplit

                    q = parse_qs(urlsplit(self.path).query)
                    with proxy.lock:
                        proxy.token_scopes.extend(q.get("scope", []))
                    body = json.dumps({"token": proxy.token, "expires_in": 300}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return True
                if self.headers.get("Authorization") == f"Bearer {proxy.token}":
                    return False
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                repo = self.path.split("/v2/", 1)[-1].split("/blobs/")[0].split("/manifests/")[0]
                self.send_response(401)
                self.send_header("WWW-Authenticate",
                                 f'Bearer realm="http://{proxy.netloc}/token",'
                                 f'service="proxy",scope="repository:{repo}:pull,push"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True

            def _any(self) -> None:
                if self._deny():
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if self.command == "PATCH":
                    with proxy.lock:
                        proxy.patches += 1
                        if proxy.patches == proxy.signal_patch:
                            proxy.patch_started.set()
                body = bytearray()
                step = 65536
                while len(body) < length:
                    piece = self.rfile.read(min(step, length - len(body)))
                    if not piece:
                        self.close_connection = True
                        return  # the client died mid-body: forward nothing
                    body += piece
                    if proxy.rate:
                        time.sleep(len(piece) / proxy.rate)
                if self.command == "PATCH" and _peer_gone(self.connection):
                    self.close_connection = True
                    return  # the client was killed after sending: forward nothing
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "transfer-encoding",
                                                "authorization")}
                resp = client.request(self.command, proxy.upstream + self.path,
                                      headers=headers, content=bytes(body))
                with proxy.lock:
                    proxy.body_bytes += len(body)
                    n = proxy.seen[self.command] = proxy.seen.get(self.command, 0) + 1
                    lost = n in proxy.lose.get(self.command, set())
                if lost:  # applied upstream, the answer never reaches the client
                    self.close_connection = True
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    return
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                data = b"" if self.command == "HEAD" else resp.content
                self.send_header("Content-Length",
                                 resp.headers.get("content-length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_PATCH = do_HEAD = do_DELETE = _any

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


@dataclass
class RefusingRegistry:
    blobs: dict[str, bytes] = field(default_factory=dict)
    _httpd: _Server | None = None

    @property
    def netloc(self) -> str:
        assert self._httpd is not None
        return f"127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> RefusingRegistry:
        reg = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, headers: dict[str, str] | None = None,
                       doc: Any = None) -> None:
                body = json.dumps(doc).encode() if doc is not None else b""
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self) -> None:
                self._reply(200, doc={})

            def do_HEAD(self) -> None:
                d = self.path.rsplit("/", 1)[-1]
                self._reply(200 if d in reg.blobs else 404)

            def do_POST(self) -> None:
                self._body()
                self._reply(202, {"Location": "/v2/upload/1"})

            def do_PUT(self) -> None:
                data = self._body()
                if "/manifests/" in self.path:
                    doc = json.loads(data)
                    odd = [x["mediaType"] for x in doc["layers"]
                           if not x["mediaType"].startswith("application/vnd.oci.")]
                    if odd:
                        self._reply(400, doc={"errors": [{
                            "code": "MANIFEST_INVALID", "message": "manifest invalid",
                            "detail": f"unsupported layer media type {odd[0]}"}]})
                        return
                    self._reply(201)
                    return
                d = "sha256:" + hashlib.sha256(data).hexdigest()
                reg.blobs[d] = data
                self._reply(201, {"Docker-Content-Digest": d})

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
