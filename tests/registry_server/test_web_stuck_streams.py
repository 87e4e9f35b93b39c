"""``/ui/events`` clients that stop reading, against a real ``blobctl serve``.

Found from outside: five event-stream clients with a 1 KB receive buffer, while the feed
changed, kept their streams open past the 30 s lifetime (the lifetime and ``close`` are
checked only when the stream resumes, never while ``send`` waits on a full socket), and
SIGTERM then took the whole 10 s grace with one "Exception in ASGI application"
traceback per stream. Now every send is bounded (``events.SEND_TIMEOUT``) and shutdown
cuts a send that waits.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from blobstore.store import Store
from registry_server.web.events import SEND_TIMEOUT
from tests.registry_server.conftest import ServeProc, start_serve


def stuck_client(url: str) -> socket.socket:
    """An event-stream client with a tiny receive buffer that reads nothing."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    s.connect((host, int(port)))
    s.sendall(f"GET /ui/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return s


def churn(url: str, count: int, tag: str) -> None:
    """``count`` page pulls that fail at once (nothing listens on port 1): each a feed
    item that stays, so every event grows."""
    for i in range(count):
        req = urllib.request.Request(
            f"{url}/ui/actions/pull", method="POST",
            data=f"name=127.0.0.1:1/nope/{tag}{i}-{'a' * 60}:1".encode(),
            headers={"Origin": url, "Accept": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()


def ends_within(s: socket.socket, seconds: float) -> bool:
    """Read (now at last) until the server ends the stream: a close, a reset, or the
    last chunk; False if it is still going after ``seconds``."""
    s.settimeout(0.2)
    tail = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            b = s.recv(1 << 16)
        except TimeoutError:
            continue
        except OSError:
            return True
        if not b:
            return True
        tail = (tail + b)[-16:]
        if tail.endswith(b"\r\n0\r\n\r\n"):
            return True
    return False


@pytest.fixture
def served(tmp_path: pytest.TempPathFactory, store: Store) -> Iterator[ServeProc]:
    sp = start_serve(store.root, log_dir=tmp_path / "logs")  # type: ignore[operator]
    try:
        yield sp
    finally:
        if sp.proc.poll() is None:
            sp.stop()


@pytest.mark.timeout(90)
def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(
        served: ServeProc) -> None:
    clients = [stuck_client(served.url) for _ in range(3)]
    try:
        churn(served.url, 150, "a")
        time.sleep(SEND_TIMEOUT + 2)
        # its stream was cut: what is left ends at once, not at the 30 s lifetime
        assert all(ends_within(c, 4) for c in clients)
    finally:
        for c in clients:
            c.close()
    assert served.stop() == 0
    log = served.log()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


@pytest.mark.timeout(90)
def test_shutdown_ends_streams_stuck_in_a_send_at_once(served: ServeProc) -> None:
    clients = [stuck_client(served.url) for _ in range(5)]
    try:
        churn(served.url, 150, "b")
        t0 = time.monotonic()
        assert served.stop() == 0
        took = time.monotonic() - t0
    finally:
        for c in clients:
            c.close()
    log = served.log()
    assert took < 3, (took, log[-3000:])
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
    assert "graceful shutdown exceeded" not in log, log[-3000:]
