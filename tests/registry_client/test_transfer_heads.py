"""Response heads the range reader must read as httpx (h11) reads them (spec/pull.md,
"Data path": the fast path is used only where it cannot change behaviour).

Found from outside: heads whose lines end with a bare LF (httpx and curl take them) were
taken for unfinished by the range reader, which looked only for CRLFCRLF. The first range
(httpx) worked; every later one either failed "response head too large" (large chunks,
exit 6) or, on a kept-alive connection, waited out the stall timeout (8 tries of 30 s a
range) before exit 6.

Hypothesis writes heads (each line's ending, reason phrase or none, header names' case,
folded lines, now and then a line h11 refuses) cut into segments; the reader must give
what h11 gives, or ``UnreadableHead`` where h11 refuses, never a stall. End to end, a
server with such heads (or one with a head over the reader's 64 KiB, which httpx takes)
is fetched whole, quickly.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from registry_client.download.transfer import RangeReader, UnreadableHead
from tests.cli.clirun import run
from tests.helpers import make_gguf
from tests.registry_client.test_transfer import Script, read_all, scripted_server

_NAMES = ["Content-Type", "x-a", "X-Cache", "ETag", "server", "Accept-Ranges", "Via"]
_VALUES = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0,
                  max_size=12)


@st.composite
def heads(draw: st.DrawFn, body: bytes) -> bytes:
    """A response head for ``body`` (a 206 of all of it), now and then with a line h11
    refuses."""
    eol = st.sampled_from([b"\r\n", b"\n"])
    status = draw(st.sampled_from([b"206 Partial Content", b"206", b"206 ", b"206 Odd  x"]))
    lines = [b"HTTP/1.1 " + status]
    fields: list[tuple[bytes, bytes]] = [
        (b"Content-Length", str(len(body)).encode()),
        (b"Content-Range", f"bytes 0-{len(body) - 1}/{len(body)}".encode())]
    for _ in range(draw(st.integers(0, 4))):
        fields.append((draw(st.sampled_from(_NAMES)).encode(), draw(_VALUES).encode()))
    fields = draw(st.permutations(fields))
    for name, value in fields:
        lines.append(name + b":" + draw(st.sampled_from([b"", b" ", b"\t "])) + value)
        if draw(st.integers(0, 5)) == 0 and not name.startswith(b"Content-"):
            lines.append(draw(st.sampled_from([b" ", b"\t"])) + b"folded more")
    if draw(st.integers(0, 7)) == 0:  # a line h11 refuses
        lines.insert(draw(st.integers(1, len(lines))),
                     draw(st.sampled_from([b"no colon here", b"bad\x01name: x"])))
    return b"".join(line + draw(eol) for line in lines) + draw(eol)


def h11_reads(raw: bytes) -> tuple[int, dict[str, str]] | None:
    """What httpx's parser makes of a response head: status and headers (lower-cased
    names, repeated ones joined with ", "), or None if it refuses the head."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/blob", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    assert isinstance(event, h11.Response)
    out: dict[str, str] = {}
    for name, value in event.headers:
        k, v = name.decode().lower(), value.decode("latin-1")
        out[k] = f"{out[k]}, {v}" if k in out else v
    return event.status_code, out


@pytest.mark.timeout(180)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), body=st.binary(min_size=1, max_size=5000),
       cuts=st.lists(st.integers(0, 10_000), max_size=4))
def test_the_range_reader_reads_a_head_as_h11_does(data: st.DataObject, body: bytes,
                                                   cuts: list[int]) -> None:
    raw = data.draw(heads(body))
    want = h11_reads(raw)
    sent = raw + body
    points = sorted({c % (len(sent) + 1) for c in cuts} | {0, len(sent)})
    script: Script = []
    for a, b in itertools.pairwise(points):
        script += [sent[a:b], 0.002]
    stall = 1.0
    reader = RangeReader(insecure=False, connect_timeout=5, stall_timeout=stall)
    t0 = time.monotonic()
    # the connection is kept open past the stall timeout, as a kept-alive one is
    with scripted_server(script, then_hold=3 * stall) as url:
        if want is None:
            with pytest.raises(UnreadableHead):
                reader.get(url, 0, len(body), None)
        else:
            with reader.get(url, 0, len(body), None) as resp:
                assert (resp.status, resp.headers) == want
                got, error = read_all(resp, 4096)
            assert error is None and bytes(got) == body
    reader.close()
    assert time.monotonic() - t0 < stall  # never a wait for more head


def _serve_ranges(data: bytes, write_head: Callable[[int, int, int], bytes],
                  ) -> tuple[socket.socket, str]:
    """A kept-alive HTTP/1.1 server of ``data`` with ranges, its heads made by
    ``write_head(status, start, end)``; returns its listening socket and URL."""
    lsock = socket.create_server(("127.0.0.1", 0))

    def conn(c: socket.socket) -> None:
        f = c.makefile("rb")
        try:
            while True:
                request = f.readline()
                if not request:
                    return
                rng = ""
                while (line := f.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.strip().lower() == "range":
                        rng = value.strip()
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
                start, end = 0, len(data) - 1
                if m:
                    start = int(m[1])
                    end = min(end, int(m[2])) if m[2] else end
                body = data[start:end + 1]
                head = write_head(206 if m else 200, start, end)
                c.sendall(head + (b"" if request.startswith(b"HEAD") else body))
        except OSError:
            pass
        finally:
            c.close()

    def accept() -> None:
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=conn, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return lsock, f"http://127.0.0.1:{lsock.getsockname()[1]}/f"


@contextmanager
def ranges_server(data: bytes, eols: list[bytes], pad: int) -> Iterator[str]:
    def write_head(status: int, start: int, end: int) -> bytes:
        lines = [f"HTTP/1.1 {status} {'Partial Content' if status == 206 else 'OK'}",
                 f"Content-Length: {end - start + 1}", "Accept-Ranges: bytes"]
        if status == 206:
            lines.append(f"Content-Range: bytes {start}-{end}/{len(data)}")
        if pad:
            lines.append("X-Pad: " + "p" * pad)
        out = b"".join(line.encode() + eols[i % len(eols)] for i, line in enumerate(lines))
        return out + eols[-1]

    lsock, url = _serve_ranges(data, write_head)
    try:
        yield url
    finally:
        lsock.close()


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small GGUF (about 290 KB): what ``fetch`` makes a model of."""
    return make_gguf(tmp_path_factory.mktemp("g") / "m.gguf", n_embd=64,
                     n_vocab=1000).read_bytes()


@pytest.mark.timeout(180)
@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(eols=st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=1, max_size=4),
       chunk=st.sampled_from(["4K", "16K", "64K"]), pad=st.sampled_from([0, 0, 70_000]))
@example(eols=[b"\r\n"], chunk="64K", pad=70_000)  # (httpx reads it, the range reader not)
def test_fetch_from_a_server_with_bare_lf_or_large_heads_is_whole_and_quick(
        gguf: bytes, tmp_path_factory: pytest.TempPathFactory, eols: list[bytes], chunk: str,
        pad: int) -> None:
    """Every range after the first goes over the range reader, on kept-alive
    connections: bare-LF heads must be read; a head over its 64 KiB (httpx takes up to
    100 KiB) sends the blob back to httpx at once, not to a retry or a stall."""
    store = tmp_path_factory.mktemp("s")
    digest = hashlib.sha256(gguf).hexdigest()
    with ranges_server(gguf, eols, pad) as url:
        t0 = time.monotonic()
        r = run("--store", str(store), "fetch", url, "--sha256",
                digest, "--name", "x/t:q4", "--chunk-size", chunk,
                "--connections", "4", "--stall-timeout", "3", "--retries", "2")
        took = time.monotonic() - t0
    assert r.code == 0, r.err
    assert "warning" not in r.err, r.err
    assert took < 10, took
    assert (Path(store) / "blobs" / f"sha256-{digest}").read_bytes() == gguf
