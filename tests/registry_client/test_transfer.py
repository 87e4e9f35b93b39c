"""RangeReader over a real TCP socket: a plain connection is a blocking socket whose stall
timeout is kept by the kernel (SO_RCVTIMEO) and whose body reads wait for a whole view
(MSG_WAITALL). These tests hold it to spec/pull.md, "Stalls": bytes that arrive are never
lost, a trickle slower than the kernel's tick is not a stall, silence for the stall
timeout is, and abort() wakes a blocked reader at once."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry_client.download.transfer import RangeReader, RawResponse

# what the server does, in order: bytes to send, or seconds to wait
Script = list[bytes | float]


@contextmanager
def scripted_server(script: Script, *, then_hold: float = 0.0) -> Iterator[httpx.URL]:
    """A one-connection TCP server that reads a request head, then plays ``script``, then
    keeps the connection open for ``then_hold`` seconds (a stall) and closes it."""
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        conn, _ = lsock.accept()
        with conn:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            try:
                for step in script:
                    if isinstance(step, float):
                        time.sleep(step)
                    else:
                        conn.sendall(step)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client had all it wanted and hung up
            stop.wait(then_hold)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield httpx.URL(f"http://127.0.0.1:{port}/blob")
    finally:
        stop.set()
        t.join(10)
        lsock.close()


def head(length: int) -> bytes:
    return (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {length}\r\n"
            f"Content-Range: bytes 0-{length - 1}/{length}\r\n\r\n").encode()


def read_while_aborting(resp: RawResponse, abort: Callable[[], object],
                        ) -> tuple[bytearray, BaseException | None, float]:
    """Read the body in 1 MiB views while ``abort`` runs from another thread after 0.5 s;
    what arrived, the error that ended it, and how long the reading took."""
    timer = threading.Timer(0.5, abort)
    timer.start()
    t0 = time.monotonic()
    got, error = read_all(resp, 1 << 20)
    waited = time.monotonic() - t0
    timer.join()
    return got, error, waited


def read_all(resp: RawResponse, view_size: int) -> tuple[bytearray, BaseException | None]:
    """Read the body in views of ``view_size``; what arrived, and the error that ended it."""
    out = bytearray()
    buf = memoryview(bytearray(view_size))
    try:
        while n := resp.readinto(buf):
            out += buf[:n]
    except (OSError, ConnectionError) as exc:
        return out, exc
    return out, None


@pytest.mark.timeout(120)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(min_size=1, max_size=300_000),
       cuts=st.lists(st.integers(0, 300_000), max_size=6),
       view_size=st.integers(1, 400_000), truncate=st.booleans())
def test_every_byte_that_arrives_is_returned(body: bytes, cuts: list[int], view_size: int,
                                             truncate: bool) -> None:
    """Whatever the segmentation, a whole body reads back exactly; a body cut short
    returns every byte that came, then fails (never a silent short body)."""
    sent = body[: len(body) // 2] if truncate else body
    points = sorted({c % (len(sent) + 1) for c in cuts} | {0, len(sent)})
    script: Script = [head(len(body))]
    for a, b in itertools.pairwise(points):
        script += [sent[a:b], 0.002]
    reader = RangeReader(insecure=False, connect_timeout=5, stall_timeout=5)
    with scripted_server(script) as url, reader.get(url, 0, len(body), None) as resp:
        assert resp.status == 206 and resp.length == len(body)
        got, error = read_all(resp, view_size)
    reader.close()
    assert bytes(got) == sent
    if truncate:
        assert isinstance(error, ConnectionError)
    else:
        assert error is None


@pytest.mark.timeout(60)
def test_silence_for_the_stall_timeout_is_a_stall() -> None:
    stall = 0.8
    reader = RangeReader(insecure=False, connect_timeout=5, stall_timeout=stall)
    server = scripted_server([head(1_000_000), b"x" * 70_000], then_hold=30)
    with server as url, reader.get(url, 0, 1_000_000, None) as resp:
        t0 = time.monotonic()
        got, error = read_all(resp, 1 << 20)
        waited = time.monotonic() - t0
    reader.close()
    assert bytes(got) == b"x" * 70_000  # the bytes before the stall are kept
    assert isinstance(error, TimeoutError)
    # found between 1 and 1.25 stall timeouts after the last byte (generous upper margin:
    # the machine is shared)
    assert stall <= waited < stall * 1.25 + 3.0


@pytest.mark.timeout(60)
def test_a_trickle_slower_than_the_kernel_tick_is_not_a_stall() -> None:
    """Bytes every 0.35 s with a stall timeout of 0.8 s (kernel tick 0.2 s): each gap
    outlasts a kernel timeout but not the stall timeout, so the read goes on."""
    parts = [bytes([i]) * 1000 for i in range(8)]
    script: Script = [head(8000)]
    for p in parts:
        script += [0.35, p]
    reader = RangeReader(insecure=False, connect_timeout=5, stall_timeout=0.8)
    with scripted_server(script) as url, reader.get(url, 0, 8000, None) as resp:
        got, error = read_all(resp, 1 << 20)
    reader.close()
    assert error is None
    assert bytes(got) == b"".join(parts)


@pytest.mark.timeout(60)
def test_a_late_head_within_the_stall_timeout_is_waited_for() -> None:
    reader = RangeReader(insecure=False, connect_timeout=5, stall_timeout=1.0)
    with scripted_server([0.6, head(5), b"hello"]) as url, reader.get(url, 0, 5, None) as resp:
        got, error = read_all(resp, 64)
    reader.close()
    assert (bytes(got), error) == (b"hello", None)


@pytest.mark.timeout(60)
def test_abort_wakes_a_reader_blocked_in_a_whole_view_read() -> None:
    """A reader waiting for a 1 MiB view (MSG_WAITALL) with a 30 s stall timeout wakes as
    soon as abort() shuts the socket down, keeping the bytes that came."""
    reader = RangeReader(insecure=False, connect_timeout=5, stall_timeout=30)
    server = scripted_server([head(1 << 20), b"y" * 1000], then_hold=30)
    with server as url, reader.get(url, 0, 1 << 20, None) as resp:
        got, error, waited = read_while_aborting(resp, reader.abort)
    assert bytes(got) == b"y" * 1000
    assert isinstance(error, (OSError, ConnectionError))
    assert waited < 10


@pytest.mark.timeout(60)
def test_a_slow_connection_returns_what_came_at_least_every_quarter_second() -> None:
    """A 1 MiB view over a connection trickling 500 bytes every 0.05 s (stall timeout
    30 s): each read returns within about 0.25 s with what had arrived, so the engine
    sees the connection's rate (spec/pull.md, "Laggards")."""
    script: Script = [head(1 << 20)]
    script += [b"z" * 500, 0.05] * 40
    reader = RangeReader(insecure=False, connect_timeout=5, stall_timeout=30)
    with scripted_server(script, then_hold=5) as url, reader.get(url, 0, 1 << 20, None) as resp:
        buf = memoryview(bytearray(1 << 20))
        times = []
        for _ in range(4):
            t0 = time.monotonic()
            n = resp.readinto(buf)
            times.append(time.monotonic() - t0)
            assert 0 < n < 1 << 20
    reader.close()
    # (the first read may return at once: bytes that came with the head)
    assert max(times) < 0.25 + 0.5, times   # (margin: a shared machine)
    assert min(times[1:]) > 0.1, times       # whole views would be kept waiting for


@pytest.mark.timeout(60)
def test_abort_of_one_response_wakes_its_reader_and_keeps_the_bytes() -> None:
    """RawResponse.abort() from another thread (the engine moving a laggard): the blocked
    read returns the bytes that came, the next read fails, the connection is not reused."""
    reader = RangeReader(insecure=False, connect_timeout=5, stall_timeout=30)
    server = scripted_server([head(1 << 20), b"w" * 3000], then_hold=30)
    with server as url, reader.get(url, 0, 1 << 20, None) as resp:
        got, error, waited = read_while_aborting(resp, resp.abort)
    assert bytes(got) == b"w" * 3000
    assert isinstance(error, ConnectionError)
    assert waited < 5.0
    assert resp.abort() is False  # closed: nothing left to break off
    assert not reader._idle, "an aborted connection went back to the pool"
    reader.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("gap", [0.05, 0.3])
def test_a_head_that_trickles_in_past_the_stall_timeout_is_a_timeout(gap: float) -> None:
    """Each byte of the head comes well within the stall timeout, the head never ends: a
    ``TimeoutError`` once the stall timeout has passed since the request (spec/pull.md,
    "Stalls"), not a wait forever."""
    script: Script = [b"HTTP/1.1 206 Partial Content\r\nX-Pad: "]
    script += [step for _ in range(int(20 / gap)) for step in (b"a", gap)]
    reader = RangeReader(insecure=False, connect_timeout=5, stall_timeout=1.0)
    t0 = time.monotonic()
    with scripted_server(script) as url, pytest.raises(TimeoutError, match="head not complete"):
        reader.get(url, 0, 5, None)
    reader.close()
    assert time.monotonic() - t0 < 3
