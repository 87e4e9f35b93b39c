"""Blob streams under load, against a real ``blobctl serve`` process or the app under
uvicorn with serve's own protocol (spec/serve.md, "Operations"; found from outside):

* a client that stopped reading a blob GET was kept forever, holding its socket, the
  blob's descriptor and its lease (GC could never collect that blob): ``--send-timeout``;
* out of file descriptors, a blob GET was uvicorn's bare text/plain 500 (or 200 with a
  Content-Length and no byte, when ``os.dup`` failed inside zero-copy): now an OCI 503
  with ``Retry-After`` before any head;
* when the shutdown grace ran out, each running stream or upload logged "Exception in
  ASGI application" with a traceback, and a PATCH still uploading got a bare 500: now
  its connection is cut quietly, with one log line, and the upload stays resumable;
* a mirror whose store disk is full answered ``200 Content-Length: N`` and cut at 0
  bytes: now 507 before any head.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore import Digest, Store
from registry_server.app import close_app, create_app
from registry_server.context import ServeOptions, ServerContext
from registry_server.server import stack_options
from tests.cli.test_pull_cli import tmpfs
from tests.registry_server.conftest import ServeProc, add_model, serving, start_serve
from tests.servers import FaultServer

MiB = 1 << 20
BIG = os.urandom(24 * MiB)  # more than the kernel's socket buffers hold
BIG_DIGEST = Digest.of_bytes(BIG)
BLOB_PATH = f"/v2/library/big/blobs/{BIG_DIGEST}"


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _stalled_get(url: str, path: str, *, rng: str | None = None,
                 read: int = 0) -> socket.socket:
    """A GET whose client reads ``read`` bytes, then stops reading (a tiny receive
    buffer, so the server's sends block soon)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(_host_port(url))
    extra = f"Range: {rng}\r\n" if rng else ""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    got = 0
    while got < read:
        b = s.recv(min(65536, read - got))
        if not b:
            break
        got += len(b)
    return s


def _drain(s: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Read until the server closes (EOF or reset): (the first bytes, whether it closed)."""
    head = b""
    while time.monotonic() < deadline:
        try:
            b = s.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            return head, True
        except TimeoutError:
            continue
        if not b:
            return head, True
        if len(head) < 4096:
            head += b[:4096]
    return head, False


def _active_streams(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    line = next(ln for ln in text.splitlines() if ln.startswith("blobctl_active_streams"))
    return int(float(line.split()[1]))


# ---------------------------------------------------------------- 1. --send-timeout
SEND_TIMEOUT = 0.5


def _serving(tmp: Path, ref: str, layer: bytes, *args: str) -> Iterator[ServeProc]:
    """A real serve (``args``) of a store holding the model ``ref`` of one ``layer``."""
    store = Store(tmp / "s")
    add_model(store, ref, [layer])
    store.close()
    sp = start_serve(store.root, *args, log_dir=tmp / "logs")
    yield sp
    sp.stop()


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProc]:
    yield from _serving(tmp_path_factory.mktemp("sendtimeout"), "library/big:1", BIG,
                        "--send-timeout", str(SEND_TIMEOUT))


@pytest.mark.timeout(120)
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(read=st.sampled_from([0, 1, 300_000, 3 * MiB]),  # bytes read before it stalls
       rng=st.sampled_from([None, "bytes=0-", f"bytes={5 * MiB}-{20 * MiB}"]))
def test_a_client_that_stops_reading_is_cut_and_releases_the_blob(
        timed: ServeProc, read: int, rng: str | None) -> None:
    before = timed.log().count("connection cut (--send-timeout)")
    s = _stalled_get(timed.url, BLOB_PATH, rng=rng, read=read)
    with s:
        deadline = time.monotonic() + 10
        while timed.log().count("connection cut (--send-timeout)") == before:
            assert time.monotonic() < deadline, timed.log()[-3000:]
            time.sleep(0.05)
        deadline = time.monotonic() + 5
        while _active_streams(timed.url) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _active_streams(timed.url) == 0  # the route ended: its fd is closed
        head, closed = _drain(s, time.monotonic() + 10)
        assert closed, "the server kept the stalled connection"
        assert read or head[:12] in (b"HTTP/1.1 200", b"HTTP/1.1 206"), head[:100]
    log = timed.log()
    assert log.count("connection cut (--send-timeout)") == before + 1, log[-3000:]
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


@pytest.mark.timeout(60)
def test_the_stalled_clients_lease_is_released_so_gc_can_collect(
        timed: ServeProc, tmp_path: Path) -> None:
    leases = Path(timed.stderr_path).parent.parent / "s" / ".blobctl" / "leases"
    s = _stalled_get(timed.url, BLOB_PATH)
    with s:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (_active_streams(timed.url)
                                               or any(leases.iterdir())):
            time.sleep(0.1)
        assert not any(leases.iterdir()), list(leases.iterdir())
        assert _drain(s, time.monotonic() + 10)[1]


@pytest.mark.timeout(60)
def test_a_slow_client_that_keeps_reading_is_not_cut(timed: ServeProc) -> None:
    """The timeout is about progress: a client taking ~2.5 MB/s, slower than the whole
    response in ``--send-timeout``, gets every byte."""
    want = 6 * MiB
    with httpx.stream("GET", f"{timed.url}{BLOB_PATH}", timeout=30,
                      headers={"Range": f"bytes=0-{want - 1}"}) as r:
        assert r.status_code == 206
        got = bytearray()
        for piece in r.iter_bytes(256 * 1024):
            got += piece
            time.sleep(0.1)
    assert bytes(got) == BIG[:want]


# ---------------------------------------------------------------- 2. out of descriptors
SMALL = os.urandom(3 * MiB + 17)
SMALL_DIGEST = Digest.of_bytes(SMALL)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProc]:
    yield from _serving(tmp_path_factory.mktemp("emfile"), "library/small:1", SMALL)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """A whole HTTP/1.1 response with a Content-Length (or what came before a close)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        b = s.recv(65536)
        if not b:
            raise AssertionError(f"closed before a response head: {buf!r}")
        buf += b
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    want = int(headers.get("content-length", "0"))
    while len(body) < want:
        b = s.recv(1 << 20)
        if not b:
            break
        body += b
    return int(lines[0].split()[1]), headers, body


@pytest.mark.timeout(180)
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(free=st.integers(0, 4),  # descriptors the server has left when the GET arrives
       ranged=st.booleans())
def test_a_blob_get_out_of_descriptors_is_an_oci_503_or_the_whole_blob(
        plain: ServeProc, free: int, ranged: bool) -> None:
    pid = plain.proc.pid
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    s = socket.create_connection(_host_port(plain.url), timeout=20)
    with s:
        # the connection is accepted (one descriptor more) before the limit drops
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(s)[0] == 200
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (_fds(pid) + free, old[1]))
        try:
            rng = "Range: bytes=100-2000000\r\n" if ranged else ""
            s.sendall(f"GET /v2/library/small/blobs/{SMALL_DIGEST} HTTP/1.1\r\n"
                      f"Host: x\r\n{rng}\r\n".encode())
            status, headers, body = _response(s)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
    if status == 503:
        assert headers.get("content-type") == "application/json", headers
        assert headers.get("retry-after"), headers
        assert b'"UNAVAILABLE"' in body, body
    else:
        want = SMALL[100:2000001] if ranged else SMALL
        assert status == (206 if ranged else 200), (status, body[:200])
        assert body == want, f"{status} with {len(body)} of {len(want)} bytes"
    r = httpx.get(f"{plain.url}/v2/library/small/blobs/{SMALL_DIGEST}", timeout=20)
    assert r.status_code == 200 and r.content == SMALL  # nothing leaked
    log = plain.log()
    assert "Exception in ASGI" not in log and "Traceback" not in log, log[-3000:]
    assert " - 0 " not in log, log[-3000:]  # the access log names the real status


# ---------------------------------------------------------------- 3. shutdown
@contextlib.contextmanager
def _stack_server(ctx: ServerContext, grace: float) -> Iterator[tuple[str, threading.Thread,
                                                                      uvicorn.Server]]:
    """The app under uvicorn with serve's own protocol (``server.stack_options``) and a
    short shutdown grace, in a thread; uvicorn's own logging left to the root logger."""
    app = create_app(ctx, access_log=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning",
                            timeout_graceful_shutdown=grace, **stack_options())
    server = uvicorn.Server(config)
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert t.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", t, server
    finally:
        server.should_exit = True
        t.join(15)
        sock.close()
        close_app(app)


def _patch_started(url: str, total: int, send: int) -> tuple[socket.socket, str]:
    """An upload whose PATCH declared ``total`` bytes and sent ``send`` of them."""
    r = httpx.post(f"{url}/v2/push/r/blobs/uploads/", timeout=10)
    assert r.status_code == 202, r.text
    loc = r.headers["location"]
    s = socket.create_connection(_host_port(url), timeout=10)
    s.sendall(f"PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n".encode())
    s.sendall(os.urandom(send))
    return s, loc


@pytest.mark.timeout(120)
@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(["get", "range", "patch"]), min_size=1, max_size=3))
def test_requests_cut_by_the_shutdown_grace_end_quietly_and_uploads_stay_resumable(
        kinds: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "s")
        add_model(store, "library/big:1", [BIG])
        ctx = ServerContext(store, ServeOptions(push=True))
        held: list[tuple[str, socket.socket, str]] = []
        with caplog.at_level(logging.WARNING):
            with _stack_server(ctx, grace=0.5) as (url, t, server):
                for kind in kinds:
                    if kind == "patch":
                        s, loc = _patch_started(url, 8 * MiB, 3 * MiB)
                    else:
                        s = _stalled_get(url, BLOB_PATH,
                                         rng="bytes=1000-" if kind == "range" else None)
                        loc = ""
                    held.append((kind, s, loc))
                time.sleep(0.5)  # the bytes sent are in
                server.should_exit = True
                t.join(15)
                assert not t.is_alive()
            for kind, s, _ in held:
                with s:
                    head, closed = _drain(s, time.monotonic() + 10)
                    assert closed, kind
                    if kind == "patch":  # no response at all: never a bare 500
                        assert head == b"", head[:200]
        # (uvicorn's own one line "Cancel N running task(s), timeout graceful shutdown
        # exceeded" is the shutdown's, not a request's)
        records = [r for r in caplog.records
                   if (r.levelno >= logging.ERROR and "Cancel" not in r.getMessage())
                   or "Exception in ASGI" in r.getMessage()]
        assert not records, [r.getMessage() for r in records]
        cuts = [r.getMessage() for r in caplog.records
                if "cut when the grace ran out" in r.getMessage()]
        assert len(cuts) == len(kinds), cuts
        # an upload cut by the shutdown is resumable on the next server
        with serving(store, push=True) as (url2, _ctx):
            for kind, _, loc in held:
                if kind == "patch":
                    r = httpx.get(f"{url2}{loc}", timeout=10)
                    assert r.status_code == 204, (r.status_code, r.text)
                    assert r.headers.get("range", "").startswith("0-"), r.headers
        store.close()


# ---------------------------------------------------------------- 4. mirror, full disk
@pytest.mark.timeout(120)
def test_a_mirror_on_a_full_disk_answers_507_before_any_head(tmp_path: Path) -> None:
    layer = os.urandom(12 * MiB)
    with FaultServer() as up, tmpfs(tmp_path / "small", "8m") as mnt:
        digest = up.add_blob(layer)
        sp = start_serve(mnt / "s", "--upstream", up.url, "--insecure-upstream",
                         log_dir=tmp_path / "logs")
        try:
            results: list[Any] = []

            def get(rng: str | None) -> None:
                headers = {"Range": rng} if rng else {}
                try:
                    results.append(httpx.get(f"{sp.url}/v2/library/x/blobs/{digest}",
                                             headers=headers, timeout=60))
                except httpx.HTTPError as exc:
                    results.append(exc)

            threads = [threading.Thread(target=get, args=(rng,))
                       for rng in (None, None, "bytes=0-99", f"bytes={6 * MiB}-")]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
            get(None)  # and again, after those failed
            for r in results:
                assert isinstance(r, httpx.Response), r
                assert r.status_code == 507, (r.status_code, r.headers, r.content[:200])
                assert "not enough disk space" in r.json()["errors"][0]["message"]
        finally:
            sp.stop()
            log = sp.log()
    assert "cut after 0" not in log and "Traceback" not in log, log[-3000:]
