"""A stand-in for the Hugging Face Hub on 127.0.0.1, plus a "CDN" on another port.

``HFServer`` answers ``GET /api/models/{org}/{repo}/tree/{revision}`` (the JSON shape of
the real API, paged with ``Link: rel="next"`` when ``page_size`` is set; ``bad_paging``
and ``pad`` make a listing that loops, never ends, or is too large) and
``/{org}/{repo}/resolve/{revision}/{path}`` with a 302 to the ``CDNServer`` (another
origin, as huggingface.co redirects LFS files to its CDN). With ``token`` set, both API
and resolve require ``Authorization: Bearer <token>``. The CDN serves ``Range`` requests
and can reset connections for ranges at or past ``fail_from`` (an interrupted download).
Every request's headers are recorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@dataclass
class CDNServer:
    files: dict[str, bytes] = field(default_factory=dict)  # sha256 hex -> bytes
    log: list[Seen] = field(default_factory=list)
    fail_from: int | None = None    # reset ranged requests starting at/after this offset
    wrong_bytes: bool = False       # serve different bytes (digest mismatch)
    head_status: int | None = None  # answer HEAD with this (a presigned URL: 403)
    _httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> CDNServer:
        srv = self

        class H(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, *, head: bool) -> None:
                srv.log.append(Seen(self.command, self.path, dict(self.headers.items())))
                if head and srv.head_status is not None:
                    self.send_response(srv.head_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                key = urlsplit(self.path).path.strip("/").split("/")[-1]
                data = srv.files.get(key)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if srv.wrong_bytes:
                    data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
                start, end = 0, len(data) - 1
                rng = self.headers.get("Range")
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
                if m:
                    start = int(m.group(1))
                    end = min(end, int(m.group(2))) if m.group(2) else end
                    if srv.fail_from is not None and start >= srv.fail_from and not head:
                        self.connection.close()  # a reset before any byte
                        self.close_connection = True
                        return
                    if start >= len(data):  # as real servers (S3, nginx) answer: 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                if not head:
                    self.wfile.write(data[start:end + 1])

        self._httpd = _Quiet(("127.0.0.1", 0), H)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


@dataclass
class HFServer:
    cdn: CDNServer
    repos: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)
    token: str | None = None
    page_size: int | None = None
    no_lfs: set[str] = field(default_factory=set)  # paths listed without LFS metadata
    lfs_sizes: dict[str, int] = field(default_factory=dict)  # path -> the LFS size listed
    # a broken listing: "loop" (next = the page itself), "endless" (always a next page),
    # or pad each page with this many bytes of JSON whitespace
    bad_paging: str | None = None
    pad: int = 0
    log: list[Seen] = field(default_factory=list)
    _httpd: ThreadingHTTPServer | None = None

    def add_file(self, repo: str, path: str, data: bytes) -> str:
        org, name = repo.split("/")
        self.repos.setdefault((org, name), {})[path] = data
        h = hashlib.sha256(data).hexdigest()
        self.cdn.files[h] = data
        return h

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HFServer:
        srv = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms wait

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                srv.log.append(Seen(self.command, self.path, dict(self.headers.items())))
                if srv.token and self.headers.get("Authorization") != f"Bearer {srv.token}":
                    self._send(401, b'{"error":"Invalid credentials"}',
                               {"Content-Type": "application/json"})
                    return
                parts = urlsplit(self.path)
                m = re.fullmatch(r"/api/models/([^/]+)/([^/]+)/tree/([^/]+)", parts.path)
                if m:
                    self._tree(m.group(1), m.group(2), parse_qs(parts.query))
                    return
                m = re.fullmatch(r"/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", parts.path)
                if m:
                    files = srv.repos.get((m.group(1), m.group(2)), {})
                    data = files.get(unquote(m.group(4)))
                    if data is None:
                        self._send(404, b"Entry not found")
                        return
                    h = hashlib.sha256(data).hexdigest()
                    self._send(302, b"", {"Location": f"{srv.cdn.url}/repos/{h}?X-Sig=secret"})
                    return
                self._send(404, b'{"error":"Repository not found"}')

            def _tree(self, org: str, name: str, query: dict[str, list[str]]) -> None:
                files = srv.repos.get((org, name))
                if files is None:
                    self._send(404, b'{"error":"Repository not found"}',
                               {"Content-Type": "application/json"})
                    return
                entries: list[dict[str, Any]] = [{"type": "directory", "oid": "0" * 40,
                                                  "size": 0, "path": "sub"}]
                for path, data in sorted(files.items()):
                    entry: dict[str, Any] = {
                        "type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data),
                        "path": path}
                    if path not in srv.no_lfs:
                        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(),
                                        "size": srv.lfs_sizes.get(path, len(data)),
                                        "pointerSize": 134}
                    entries.append(entry)
                headers = {"Content-Type": "application/json"}
                if srv.page_size:
                    start = int(query.get("cursor", ["0"])[0])
                    page = entries[start:start + srv.page_size]
                    if start + srv.page_size < len(entries):
                        nxt = (f"{srv.url}{urlsplit(self.path).path}?recursive=true"
                               f"&cursor={start + srv.page_size}")
                        headers["Link"] = f'<{nxt}>; rel="next"'
                    entries = page
                    if srv.bad_paging == "loop":
                        headers["Link"] = f'<{srv.url}{self.path}>; rel="next"'
                    elif srv.bad_paging == "endless":
                        headers["Link"] = (f'<{srv.url}{urlsplit(self.path).path}?recursive='
                                           f'true&cursor={start + srv.page_size}>; rel="next"')
                body = json.dumps(entries).encode()
                self._send(200, body[:1] + b" " * srv.pad + body[1:], headers)

        self._httpd = _Quiet(("127.0.0.1", 0), H)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
