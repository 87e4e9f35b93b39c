"""Slow clients against a real `blobctl serve` process: a connection that sends nothing,
or a request head a byte at a time, held its socket and descriptor forever (uvicorn arms
no timer before a request's first byte, and any byte cancels its keep-alive timer), so
enough of them (20000 here: `ulimit -n`) left the server serving no one. Each request head
must now be whole within `--head-timeout` of the moment the connection began waiting for
it (spec/serve.md, "Operations")."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.store import Store
from tests.blobstore.gcutil import add_model, digest_of
from tests.registry_server.conftest import ServeProc, start_serve

HEAD_TIMEOUT = 1.0
LAYER = os.urandom(100_003)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.settimeout(10)
    return s


def _read_until_closed(s: socket.socket, deadline: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or a reset); with the time it closed."""
    got = b""
    while time.monotonic() < deadline:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            continue
        if not b:
            break
        got += b
    return got, time.monotonic()


REQUEST = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> ServeProc:
    tmp = tmp_path_factory.mktemp("slow")
    store = Store(tmp / "s")
    add_model(store, "library/tiny:1", [LAYER])
    store.close()
    sp = start_serve(store.root, "--head-timeout", str(HEAD_TIMEOUT), log_dir=tmp / "logs")
    yield sp  # type: ignore[misc]
    sp.stop()


@pytest.mark.timeout(240)
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.integers(0, 2),          # whole requests answered first on the connection
       sent=st.integers(0, len(REQUEST) - 1),  # bytes of the next head sent, then …
       trickle=st.sampled_from([0.0, 0.2, 0.45]),  # … one more byte every this many s
       pause=st.floats(0.0, 0.4))         # before the slow head begins
def test_a_head_not_whole_in_time_ends_its_connection(served: ServeProc, before: int,
                                                      sent: int, trickle: float,
                                                      pause: float) -> None:
    s = _connect(served.url)
    with s:
        for _ in range(before):
            s.sendall(REQUEST)
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            body = head.split(b"\r\n\r\n", 1)[1]
            while len(body) < length:
                body += s.recv(65536)
        waiting_since = time.monotonic()
        time.sleep(pause)
        if sent:
            s.sendall(REQUEST[:sent])
        pos = sent
        closed_at = None
        got = b""
        if trickle:
            # a byte every `trickle` s: never whole before the deadline (len(REQUEST)
            # bytes at ≥ 0.2 s each take longer than HEAD_TIMEOUT), yet never idle 1 s
            s.settimeout(trickle)
            while pos < len(REQUEST) - 1:
                try:
                    b = s.recv(65536)
                except TimeoutError:
                    b = None
                if b is not None:  # data or EOF: the server answered and/or closed
                    got += b
                    closed_at = time.monotonic()
                    break
                try:
                    s.sendall(REQUEST[pos:pos + 1])
                except (BrokenPipeError, ConnectionResetError):
                    closed_at = time.monotonic()
                    break
                pos += 1
        if closed_at is None or (got and not got.endswith(b"in time")):
            s.settimeout(0.5)
            more, closed_at = _read_until_closed(s, time.monotonic() + 10)
            got += more
        took = closed_at - waiting_since
        # (after a response the server's clock starts when it wrote it, the client's when
        # it had read it: on a loaded machine that may be a while later)
        low = HEAD_TIMEOUT - (0.5 if before else 0.15)
        assert low <= took < HEAD_TIMEOUT + 1.5, (took, got)
        if not pos:
            assert got == b"", got  # silence is just closed
        elif not trickle:
            assert got.startswith(b"HTTP/1.1 408 "), got
        else:  # a byte sent after the server closed may draw a reset that drops the 408
            assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got


@pytest.mark.timeout(120)
def test_idle_connections_are_let_go_and_others_are_served(served: ServeProc) -> None:
    d = digest_of(LAYER)
    time.sleep(HEAD_TIMEOUT + 0.5)  # connections of earlier tests are gone
    base = _open_fds(served.proc.pid)
    idle = [_connect(served.url) for _ in range(300)]
    try:
        for s in idle[::2]:
            s.sendall(b"GET /v2/ HTTP/1.1\r\n")  # half of them begin a head
        deadline = time.monotonic() + HEAD_TIMEOUT * 0.8
        while _open_fds(served.proc.pid) < base + 300 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _open_fds(served.proc.pid) >= base + 300
        # a client with a whole head is served meanwhile, and a slow but timely head too
        with httpx.Client(base_url=served.url, timeout=10) as c:
            r = c.get(f"/v2/library/tiny/blobs/{d}")
            assert r.status_code == 200 and r.content == LAYER
        s = _connect(served.url)
        with s:
            for i in range(0, len(REQUEST), 8):
                s.sendall(REQUEST[i:i + 8])
                time.sleep(HEAD_TIMEOUT / 2 / (len(REQUEST) / 8))
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + HEAD_TIMEOUT + 5
        while _open_fds(served.proc.pid) > base + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _open_fds(served.proc.pid) <= base + 2, "idle connections still held"
    finally:
        for s in idle:
            s.close()


def _exchange(s: socket.socket, request: bytes) -> bytes:
    """Send ``request`` on ``s`` and read its whole response; its head."""
    s.sendall(request)
    return _response(s)


def _response(s: socket.socket) -> bytes:
    """The next whole response on ``s`` (Content-Length framed); its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, f"connection closed mid-body: {head!r}"
        body += chunk
    return head


@pytest.mark.timeout(60)
def test_keep_alive_between_timely_requests_still_works(served: ServeProc) -> None:
    """The deadline clocks heads only: a client that comes back within the time with a
    whole head is served on the same connection (a raw socket: httpx would reconnect
    without a word)."""
    s = _connect(served.url)
    with s:
        for _ in range(3):
            assert _exchange(s, REQUEST).startswith(b"HTTP/1.1 200")
            time.sleep(HEAD_TIMEOUT * 0.5)
        d = digest_of(LAYER).encode()
        head = _exchange(s, b"GET /v2/library/tiny/blobs/" + d + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("body_seconds", [1.5, 4.0])
def test_a_body_drained_after_an_early_answer(served: ServeProc,
                                              body_seconds: float) -> None:
    """Found by review: the head clock started when the response was out, though uvicorn
    was still draining the body of a request answered early (a write to a read-only
    serve: 405 before the body is read), so a slow body drew a stray 408; and, once that
    was mended, nothing bounded the drain at all. The drain now gets 2 x --head-timeout
    from the response's end (nginx's lingering close): within it the connection serves
    the next request, past it the connection closes (no 408)."""
    s = _connect(served.url)
    with s:
        steps = 10
        body = b"x" * 200 * steps
        s.sendall(b"PUT /v2/library/tiny/blobs/uploads/x HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        head = _response(s)  # the early answer, before any body byte
        assert head.startswith(b"HTTP/1.1 4"), head
        t0 = time.monotonic()
        closed = False
        for i in range(0, len(body), 200):
            try:
                s.sendall(body[i:i + 200])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(body_seconds / steps)
        if body_seconds < 2 * HEAD_TIMEOUT:
            assert not closed
            head = _exchange(s, REQUEST)  # the same connection serves the next request
            assert head.startswith(b"HTTP/1.1 200"), head
        else:
            s.settimeout(0.5)
            got, at = _read_until_closed(s, time.monotonic() + 10)
            assert got == b"", got  # closed, no 408
            assert at - t0 < 2 * HEAD_TIMEOUT + 1.5


@pytest.mark.timeout(60)
def test_a_head_begun_while_the_response_went_out_is_clocked(served: ServeProc) -> None:
    """Found by review: a next head whose first bytes came with the previous request was
    never clocked (its 'message done' flag was down), so a byte every 0.2 s after that
    held the connection forever. It is clocked from the response's end: 408 and close."""
    s = _connect(served.url)
    with s:
        s.sendall(REQUEST + b"GE")
        head = _response(s)
        assert head.startswith(b"HTTP/1.1 200"), head
        t0 = time.monotonic()
        got = b""
        s.settimeout(0.2)
        for b in b"T /v2/ HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                s.sendall(bytes([b]))
                got += s.recv(65536)
                break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        took = time.monotonic() - t0
        assert took < HEAD_TIMEOUT + 1.5, took
        assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got


@pytest.mark.timeout(60)
def test_a_head_after_a_large_body_in_one_read_is_not_too_large(served: ServeProc) -> None:
    """Found by review: when one read held more than 64 KiB of a body and ended inside the
    next head, all of it counted as head: a false 431."""
    s = _connect(served.url)
    with s:
        body = b"x" * 100_000
        s.sendall(b"PUT /v2/library/tiny/blobs/uploads/x HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 100000\r\n\r\n" + body + REQUEST[:10])
        head = _response(s)
        assert head.startswith(b"HTTP/1.1 4"), head
        time.sleep(0.2)
        s.sendall(REQUEST[10:])
        head = _response(s)
        assert head.startswith(b"HTTP/1.1 200"), head


def test_head_timeout_is_validated(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="head-timeout"):
        start_serve(tmp_path / "s", "--head-timeout", "0", log_dir=tmp_path / "logs")


def _rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) // 1024


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", ["many lines", "one long line", "long url"])
def test_a_head_too_large_is_431_and_memory_stays_flat(served: ServeProc, shape: str) -> None:
    """Found from outside: a head of many short header lines was kept whole in memory
    (a Python tuple a line, ~20x what the client sent): two clients took the server from
    49 MB to 3 GB in 6 s. A head over 64 KiB or 128 header lines is 431 and closed."""
    before = _rss_mib(served.proc.pid)
    s = _connect(served.url)
    with s:
        if shape == "long url":
            s.sendall(b"GET /v2/" + b"a" * 70_000)
        else:
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        line = b"a: b\r\n" if shape == "many lines" else b"x-long: " + b"v" * 1000
        sent, got = 0, b""
        try:
            while sent < 50_000_000:
                s.sendall(line * 1000)
                sent += len(line) * 1000
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(5)
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert sent < 20_000_000, f"the server took {sent} bytes of head"
    assert got == b"" or got.startswith(b"HTTP/1.1 431 "), got[:80]
    assert _rss_mib(served.proc.pid) < before + 50
    # ordinary heads, with a large token, still work
    with httpx.Client(base_url=served.url, timeout=10) as c:
        assert c.get("/v2/", headers={"Authorization": "Bearer " + "t" * 8000}).status_code \
            in (200, 401)
