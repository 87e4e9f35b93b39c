"""Real HTTP servers for tests, bound to 127.0.0.x only.

``FaultServer``: a small OCI distribution server (manifests, blobs with Range, a Bearer
token endpoint) whose responses can be made to fail in scripted ways: connection resets,
truncated or corrupted bodies, 429/503 with Retry-After, ignored or wrong ranges, stalls,
throttling, and redirects to another host. It records every request it served.

``DockerRegistry``: the real CNCF distribution registry (Debian ``docker-registry``),
started with a config written here, plus ``push`` to upload a model with plain HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_manifest(config: bytes, layers: list[tuple[str, bytes]], *,
                  media_type: str = DOCKER_MANIFEST,
                  config_type: str = "application/vnd.docker.container.image.v1+json") -> bytes:
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type,
                           "config": {"mediaType": config_type, "digest": sha(config),
                                      "size": len(config)},
                           "layers": [{"mediaType": mt, "digest": sha(b), "size": len(b)}
                                      for mt, b in layers]}
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class Fault:
    """One scripted misbehaviour, applied to the next ``times`` matching requests."""

    kind: str            # reset, truncate, corrupt, status, ignore_range, stall, wrong_range,
                         # redirect, slow; "head": answer HEAD requests with ``status``;
                         # trickle_head: a head that never ends, a byte every ``seconds``
                         # trickle_body (manifests, /token): the body a byte every ``seconds``
                         # (blobs, manifests, /token); manifests and /token also take
                         # status, truncate and stall (the body cut or held at ``after``)
    match: str = "/blobs/"
    times: int = 1
    after: int = 0       # bytes sent before the fault strikes (reset/truncate/stall/corrupt)
    status: int = 503
    retry_after: str | None = None
    seconds: float = 0.0
    rate: int = 0        # bytes per second, for "slow"
    target: str = ""     # base URL, for "redirect"
    only_range_start: int | None = None  # match only ranged requests starting here


@dataclass
class Served:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    sent: int = 0


@dataclass
class FaultServer:
    host: str = "127.0.0.1"
    port: int = 0                     # 0: any free port
    token: str | None = None          # require "Authorization: Bearer <token>"
    basic: tuple[str, str] | None = None  # credentials the token endpoint accepts
    basic_only: bool = False          # challenge with Basic (no token service) instead
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    log: list[Served] = field(default_factory=list)
    default_rate: int = 0             # throttle every blob response (bytes/s)
    max_range: int = 0                # send at most this many bytes per ranged response
    active: int = 0                   # requests being served right now
    lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ content
    def add_blob(self, data: bytes) -> str:
        d = sha(data)
        self.blobs[d] = data
        return d

    def add_model(self, repo: str, tag: str, config: bytes,
                  layers: list[tuple[str, bytes]], **kw: Any) -> bytes:
        self.add_blob(config)
        for _, b in layers:
            self.add_blob(b)
        raw = make_manifest(config, layers, **kw)
        media = kw.get("media_type", DOCKER_MANIFEST)
        self.manifests[(repo, tag)] = (raw, media)
        self.manifests[(repo, sha(raw))] = (raw, media)
        return raw

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    @property
    def netloc(self) -> str:
        return self.url.removeprefix("http://")

    def start(self) -> FaultServer:
        server = self

        class Handler(_Handler):
            srv = server

        self._httpd = _QuietServer((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers
    def take_fault(self, path: str, range_start: int | None, *,
                   head: bool = False) -> Fault | None:
        """The next matching fault; ``head`` faults apply to HEAD requests only."""
        with self.lock:
            for f in self.faults:
                if (f.kind == "head") != head:
                    continue
                if f.times > 0 and f.match in path and (
                        f.only_range_start is None or f.only_range_start == range_start):
                    f.times -= 1
                    return f
        return None

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no request is being served (e.g. after a client was killed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.active == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError("server still busy")

    def blob_bytes_sent(self) -> int:
        with self.lock:
            return sum(s.sent for s in self.log if "/blobs/" in s.path and s.method == "GET")


class _QuietServer(ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops the SYNs of a client opening many
    # connections at once, and each dropped one costs a 1 s retransmit
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients resetting connections is part of the tests


class QuietHandler(BaseHTTPRequestHandler):
    """A test server's HTTP/1.1 handler: keep-alive, no log lines, and ``TCP_NODELAY``
    (as nginx and docker-registry have it: without it, Nagle holds a keep-alive
    response's body ~40 ms for the client's delayed ACK)."""

    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ThreadedHTTP:
    """A ``ThreadingHTTPServer`` with ``handler`` on a free port of ``host``, serving in a
    thread until :meth:`stop` (or the end of its ``with`` block); clients that drop a
    connection print nothing."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1") -> None:
        self.host = host
        self.httpd = _QuietServer((host, 0), handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> ThreadedHTTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    # TCP_NODELAY, as nginx and docker-registry have it: without it, Nagle holds a
    # keep-alive response's body ~40 ms for the client's delayed ACK
    disable_nagle_algorithm = True
    srv: FaultServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _record(self, status: int, sent: int) -> None:
        with self.srv.lock:
            self.srv.log.append(Served(self.command, self.path, dict(self.headers.items()),
                                       status, sent))

    def _send_json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._record(status, 0)

    def _authorized(self) -> bool:
        if self.srv.basic_only and self.srv.basic is not None:
            import base64
            want = "Basic " + base64.b64encode(":".join(self.srv.basic).encode()).decode()
            if self.headers.get("Authorization") == want:
                return True
            self._send_json(401, {"errors": [{"code": "UNAUTHORIZED", "message": "auth"}]},
                            {"WWW-Authenticate": 'Basic realm="fault"'})
            return False
        if self.srv.token is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {self.srv.token}":
            return True
        realm = f"{self.srv.url}/token"
        self._send_json(401, {"errors": [{"code": "UNAUTHORIZED", "message": "auth"}]}, {
            "WWW-Authenticate": f'Bearer realm="{realm}",service="fault",'
                                f'scope="repository:x:pull"'})
        return False

    def do_HEAD(self) -> None:
        fault = self.srv.take_fault(self.path, None, head=True)
        if fault is not None:
            return self._send_json(fault.status, {"errors": [{"code": "UNSUPPORTED",
                                                              "message": "no HEAD here"}]})
        self.do_GET()

    def do_GET(self) -> None:
        with self.srv.lock:
            self.srv.active += 1
        try:
            self._get()
        finally:
            with self.srv.lock:
                self.srv.active -= 1

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/token":
            return self._token()
        if path == "/v2/":
            if self._authorized():
                self._send_json(200, {})
            return
        if not self._authorized():
            return
        parts = path.split("/")
        # /v2/<repo...>/manifests/<ref> or /v2/<repo...>/blobs/<digest>
        if len(parts) >= 5 and parts[-2] in ("manifests", "blobs"):
            repo, kind, ref = "/".join(parts[2:-2]), parts[-2], parts[-1]
            if kind == "manifests":
                return self._manifest(repo, ref)
            return self._blob(ref)
        self._send_json(404, {"errors": [{"code": "NAME_UNKNOWN", "message": "no route"}]})

    def _trickle_head(self, fault: Fault) -> None:
        """A response head that never ends: one byte every ``fault.seconds`` (for a minute
        at most, or until the client hangs up)."""
        sent = 0
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: ")
            self.wfile.flush()
            until = time.monotonic() + 60
            while time.monotonic() < until:
                self.wfile.write(b"a")
                self.wfile.flush()
                sent += 1
                time.sleep(fault.seconds)
        except OSError:
            pass
        self.close_connection = True
        self._record(0, sent)

    def _small_head(self, body: bytes, media: str, headers: dict[str, str] | None) -> None:
        """A 200 head for a whole ``body`` (a faulty manifest or token answer follows)."""
        self.send_response(200)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _faulty_small(self, fault: Fault | None, body: bytes, media: str,
                      headers: dict[str, str] | None = None) -> bool:
        """Apply a manifest's or the token service's fault; True if it answered."""
        if fault is None:
            return False
        if fault.kind == "trickle_head":
            self._trickle_head(fault)
            return True
        if fault.kind == "status":
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            self._send_json(fault.status, {"errors": [{"code": "TOOMANYREQUESTS"
                            if fault.status == 429 else "UNAVAILABLE",
                            "message": "try later"}]}, extra)
            return True
        if fault.kind == "trickle_body" and self.command != "HEAD":
            # the whole head at once, then the body a byte every ``seconds`` (each read
            # well within the stall timeout)
            self._small_head(body, media, headers)
            sent = 0
            with contextlib.suppress(OSError):
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    sent += 1
                    time.sleep(fault.seconds)
            self.close_connection = True
            self._record(200, sent)
            return True
        if fault.kind in ("truncate", "stall") and self.command != "HEAD":
            self._small_head(body, media, headers)
            self.wfile.write(body[:min(fault.after, len(body) - 1)])
            self.wfile.flush()
            if fault.kind == "stall":
                time.sleep(fault.seconds)
            self.close_connection = True
            self._record(200, fault.after)
            return True
        return False

    def _token(self) -> None:
        fault = self.srv.take_fault(self.path, None)
        body = json.dumps({"token": self.srv.token, "expires_in": 300}).encode()
        if self._faulty_small(fault, body, "application/json"):
            return
        if self.srv.basic is not None:
            import base64
            want = "Basic " + base64.b64encode(":".join(self.srv.basic).encode()).decode()
            if self.headers.get("Authorization") != want:
                self._send_json(401, {"errors": [{"code": "UNAUTHORIZED", "message": "no"}]})
                return
        self._send_json(200, {"token": self.srv.token, "expires_in": 300})

    def _manifest(self, repo: str, ref: str) -> None:
        fault = self.srv.take_fault(self.path, None)
        hit = self.srv.manifests.get((repo, ref))
        if self._faulty_small(fault, hit[0] if hit else b"{}",
                              hit[1] if hit else "application/json"):
            return
        if hit is None:
            return self._send_json(404, {"errors": [{"code": "MANIFEST_UNKNOWN",
                                                     "message": "manifest unknown"}]})
        raw, media = hit
        self.send_response(200)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Docker-Content-Digest", sha(raw))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)
        self._record(200, len(raw))

    def _blob(self, digest: str) -> None:
        data = self.srv.blobs.get(digest)
        rng = self.headers.get("Range")
        start, end = 0, len(data or b"") - 1
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a)
            end = int(b) if b else end
        fault = self.srv.take_fault(self.path, start if rng else None)
        if fault is not None and fault.kind == "trickle_head":
            return self._trickle_head(fault)
        if fault is not None and fault.kind == "redirect":
            self.send_response(307)
            self.send_header("Location", f"{fault.target}{self.path}?sig=abc")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return self._record(307, 0)
        if fault is not None and fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return self._send_json(fault.status, {"errors": [{"code": "TOOMANYREQUESTS"
                                   if fault.status == 429 else "UNAVAILABLE",
                                   "message": "busy"}]}, headers)
        if data is None:
            return self._send_json(404, {"errors": [{"code": "BLOB_UNKNOWN",
                                                     "message": "blob unknown"}]})
        ranged = bool(rng) and not (fault is not None and fault.kind == "ignore_range")
        if ranged:
            if self.srv.max_range:  # a server may send less than asked (RFC 9110 14.2)
                end = min(end, start + self.srv.max_range - 1)
            body = data[start:end + 1]
            self.send_response(206)
            shift = 1 if fault is not None and fault.kind == "wrong_range" else 0
            self.send_header("Content-Range",
                             f"bytes {start + shift}-{end + shift}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Docker-Content-Digest", digest)
        self.end_headers()
        if self.command == "HEAD":
            return self._record(200, 0)
        self._write_body(body, fault)

    def _write_body(self, body: bytes, fault: Fault | None) -> None:
        sent = 0
        rate = fault.rate if fault is not None and fault.kind == "slow" else self.srv.default_rate
        step = 16384
        t0 = time.monotonic()
        try:
            while sent < len(body):
                if fault is not None and sent >= fault.after:
                    if fault.kind == "reset":
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   b"\x01\0\0\0\0\0\0\0")
                        self.close_connection = True
                        self.connection.close()
                        return
                    if fault.kind == "truncate":
                        self.close_connection = True
                        return
                    if fault.kind == "stall":
                        time.sleep(fault.seconds)
                        fault = None
                piece = body[sent:sent + step]
                if fault is not None and fault.kind == "corrupt" and sent <= fault.after < sent + len(piece):
                    i = fault.after - sent
                    piece = piece[:i] + bytes([piece[i] ^ 0xFF]) + piece[i + 1:]
                self.wfile.write(piece)
                sent += len(piece)
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
        finally:
            self._record(206 if self.headers.get("Range") else 200, sent)


# ---------------------------------------------------------------------- real registry
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DockerRegistry:
    root: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    htpasswd: Path | None = None  # require Basic auth with these users (bcrypt lines)

    @staticmethod
    def available() -> bool:
        return shutil.which("docker-registry") is not None

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.netloc}"

    def start(self) -> DockerRegistry:
        self.port = free_port()
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        cfg = self.root / "config.yml"
        cfg.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'data'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
            + (f"auth:\n  htpasswd:\n    realm: test\n    path: {self.htpasswd}\n"
               if self.htpasswd is not None else "")
        )
        # Its log goes to a file, never to a pipe nobody reads: every client that hangs up
        # mid-body logs an error, and a full pipe would block the registry's writes.
        log = self.root / "registry.log"
        with log.open("ab") as err_file:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(cfg)],
                                         stdout=subprocess.DEVNULL, stderr=err_file)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = log.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"docker-registry exited: {err}")
            try:
                if httpx.get(f"{self.url}/v2/", timeout=1).status_code in (200, 401):
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def push_blob(self, repo: str, data: bytes) -> str:
        d = sha(data)
        with httpx.Client(timeout=60) as c:
            if c.head(f"{self.url}/v2/{repo}/blobs/{d}").status_code == 200:
                return d
            r = c.post(f"{self.url}/v2/{repo}/blobs/uploads/")
            assert r.status_code == 202, r.text
            loc = httpx.URL(self.url).join(r.headers["Location"])
            r = c.put(loc.copy_merge_params({"digest": d}), content=data,
                      headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 201, r.text
        return d

    def push(self, repo: str, tag: str, config: bytes, layers: list[tuple[str, bytes]],
             **kw: Any) -> bytes:
        self.push_blob(repo, config)
        for _, b in layers:
            self.push_blob(repo, b)
        raw = make_manifest(config, layers, **kw)
        media = kw.get("media_type", DOCKER_MANIFEST)
        r = httpx.put(f"{self.url}/v2/{repo}/manifests/{tag}", content=raw,
                      headers={"Content-Type": media}, timeout=60)
        assert r.status_code == 201, r.text
        return raw


def running_registry(root: Path) -> Iterator[DockerRegistry]:
    """A real docker-registry under ``root`` for a test session (a fixture's body): in CI a
    missing package fails the run (``.ci/run`` installs it), elsewhere the tests skip."""
    import os

    import pytest

    if not DockerRegistry.available():
        if os.environ.get("CI"):
            pytest.fail("docker-registry is not installed (.ci/run installs it)")
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    reg = DockerRegistry(root).start()
    try:
        yield reg
    finally:
        reg.stop()


@contextmanager
def running_asgi(app: Any, *, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve an ASGI ``app`` with uvicorn on a free loopback port in a thread; yields its
    base URL and stops the server (and joins the thread) on exit."""
    import uvicorn

    # proto IPPROTO_TCP, as registry_server.server.bind makes it: asyncio sets TCP_NODELAY
    # only on sockets whose proto says TCP (accepted ones inherit it); with proto 0, Nagle
    # held each keep-alive response's body ~40 ms for the client's delayed ACK
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                         name="asgi-test-server")
    t.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()
