"""``fetch`` and ``pull --file`` against servers whose HEAD lies or whose GET answers
compressed (spec/catalog.md, "Hugging Face files"; spec/pull.md, "Retries").

Found from outside:

* ``fetch`` trusted ``HEAD``'s ``Content-Length``: a HEAD saying 0 meant no GET at all and
  a digest mismatch of the empty file (exit 5); one saying 100 or twice the size a size
  mismatch whose "expected" was the server's HEAD; a HEAD answered gzip-compressed gave
  the compressed length; a HEAD answering 404 while the GET worked was exit 3. What the
  GET tells is what counts; HEAD is only a hint.
* Ranges answered with ``Content-Encoding: gzip`` (a server ignoring ``Accept-Encoding:
  identity``) were written to disk compressed: ~100 "body ended after N bytes" retries,
  then a digest mismatch (exit 5). Now one protocol error naming the encoding, exit 6,
  at once.

Hypothesis chooses how HEAD lies, whether the server honours ranges, the chunk size, the
encoding, and which GETs come encoded (every one, or from the k-th on: then the engine
meets it, not the size probe).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.name import ModelName
from blobstore.store import Store
from catalog.fetch import fetch_file
from registry_client.errors import ProtocolError
from registry_client.pull import PullOptions
from registry_client.retry import RetryPolicy
from tests.cli.clirun import run
from tests.helpers import make_gguf
from tests.hfserver import _Quiet
from tests.registry_client.test_pull_faults import opts
from tests.registry_client.test_pull_resume import CHUNK, leave_ranges, written_ranges


def _encode(coding: str, body: bytes) -> bytes:
    if coding == "gzip":
        return gzip.compress(body)
    if coding == "deflate":
        return zlib.compress(body)
    if coding in PLAIN_LABELS:
        return body
    return body[::-1]  # another compression: the bytes are not the file's either


# what servers put in Content-Encoding for bytes that are not encoded (S3 objects uploaded
# with such metadata): no compression, fetched as they are (found by review)
PLAIN_LABELS = ("none", "binary", "utf-8")


@dataclass
class QuirkyServer:
    """One file at any path. ``head``: how HEAD answers (``("length", n)``, ``("gzip",)``
    or ``("status", s)``; None: truthfully). ``ranges``: honour Range. ``encoding``: the
    Content-Encoding of GET bodies from the ``encode_from``-th GET on (1-based),
    ``chunked``: bodies sent chunked (no Content-Length)."""

    data: bytes
    head: tuple[Any, ...] | None = None
    ranges: bool = True
    encoding: str | None = None
    encode_from: int = 1
    chunked: bool = False
    gets: int = 0
    log: list[tuple[str, str]] = field(default_factory=list)  # (method, Range)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: _Quiet | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/files/m.gguf"

    def __enter__(self) -> QuirkyServer:
        srv = self

        class H(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                with srv.lock:
                    srv.log.append(("HEAD", self.headers.get("Range", "")))
                kind = srv.head[0] if srv.head else None
                self.send_response(srv.head[1] if kind == "status" else 200)
                if kind == "length":
                    self.send_header("Content-Length", str(srv.head[1]))
                elif kind == "gzip":
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(len(gzip.compress(srv.data))))
                else:
                    self.send_header("Content-Length", "0" if kind == "status"
                                     else str(len(srv.data)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self) -> None:
                with srv.lock:
                    srv.gets += 1
                    n = srv.gets
                    srv.log.append(("GET", self.headers.get("Range", "")))
                data = srv.data
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if m and srv.ranges:
                    start = int(m[1])
                    end = min(len(data) - 1, int(m[2])) if m[2] else len(data) - 1
                    body = data[start:end + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                if srv.encoding and n >= srv.encode_from:
                    body = _encode(srv.encoding, body)
                    self.send_header("Content-Encoding", srv.encoding)
                self.send_header("Accept-Ranges", "bytes" if srv.ranges else "none")
                if srv.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 65536):
                        part = body[i:i + 65536]
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        self._httpd = _Quiet(("127.0.0.1", 0), H)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small GGUF (about 290 KB): what ``fetch`` makes a model of."""
    return make_gguf(tmp_path_factory.mktemp("g") / "m.gguf", n_embd=64,
                     n_vocab=1000).read_bytes()


_seq = itertools.count()


def _heads(size: int) -> st.SearchStrategy[tuple[Any, ...] | None]:
    return st.one_of(
        st.none(),
        st.tuples(st.just("length"), st.sampled_from([0, 1, 100, size - 1, size + 1,
                                                      2 * size])),
        st.just(("gzip",)),
        st.tuples(st.just("status"), st.sampled_from([400, 401, 403, 404, 405, 500, 501])))


@pytest.mark.timeout(180)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), ranges=st.booleans(), chunk=st.sampled_from(["16K", "64K", "1M"]))
def test_fetch_takes_the_size_from_the_get_whatever_head_says(
        gguf: bytes, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject,
        ranges: bool, chunk: str) -> None:
    head = data.draw(_heads(len(gguf)), label="head")
    hexd = hashlib.sha256(gguf).hexdigest()
    store = tmp_path_factory.mktemp("s")
    with QuirkyServer(gguf, head=head, ranges=ranges) as srv:
        r = run("--store", str(store), "--json", "fetch", srv.url, "--sha256", hexd,
                "--name", f"x/t{next(_seq)}:q4", "--chunk-size", chunk, "--retries", "2")
    assert r.code == 0, r.err
    assert "warning" not in r.err, r.err
    assert (store / "blobs" / f"sha256-{hexd}").read_bytes() == gguf
    assert ("HEAD", "") not in srv.log  # the GET told the size: HEAD was not needed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("head", [None, ("length", 7)])
def test_a_get_without_a_size_takes_heads_as_a_hint(gguf: bytes, tmp_path: Path,
                                                    head: tuple[Any, ...] | None) -> None:
    """A server that ignores Range and sends the whole body chunked tells no size in its
    GET: HEAD's length is taken (the digest check still guards the bytes); a HEAD that
    lies then ends in one integrity error, not a retry storm."""
    hexd = hashlib.sha256(gguf).hexdigest()
    with QuirkyServer(gguf, head=head, ranges=False, chunked=True) as srv:
        r = run("--store", str(tmp_path / "s"), "fetch", srv.url, "--sha256", hexd,
                "--name", "x/t:q4", "--retries", "2")
    if head is None:
        assert r.code == 0, r.err
    else:  # the bytes past HEAD's length are not fetched: they do not verify
        lines = [x for x in r.err.splitlines() if x.startswith(("error: ", "hint: "))]
        assert r.code == 5, r.err
        assert lines[0].startswith("error: digest mismatch")
        assert lines[1] == ("hint: the server's GET tells no size; 7 bytes is what its "
                            "HEAD says, and HEAD and GET may disagree")
        assert "warning" not in r.err


@pytest.mark.timeout(180)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(coding=st.sampled_from(["gzip", "deflate", "br", "GZIP", "x-gzip, identity", "xz",
                               "lz4"]),
       encode_from=st.integers(1, 6), ranges=st.booleans(), chunked=st.booleans(),
       chunk=st.sampled_from(["16K", "64K", "1M"]), listed=st.booleans())
def test_an_encoded_body_is_one_protocol_error_at_once(
        gguf: bytes, tmp_path_factory: pytest.TempPathFactory, coding: str, encode_from: int,
        ranges: bool, chunked: bool, chunk: str, listed: bool) -> None:
    """``listed``: the size is known beforehand (a Hugging Face listing, ``pull --file``),
    so no size probe: the download engine meets the encoded body itself."""
    hexd = hashlib.sha256(gguf).hexdigest()
    store = tmp_path_factory.mktemp("s")
    with QuirkyServer(gguf, ranges=ranges, encoding=coding, encode_from=encode_from,
                      chunked=chunked) as srv:
        t0 = time.monotonic()
        if listed:
            opts = PullOptions(retry=RetryPolicy(attempts=3, base_delay=0.01),
                               stall_timeout=5.0, chunk_size=16 * 1024)
            error: BaseException | None = None
            try:
                fetch_file(Store(store), srv.url, Digest.parse(f"sha256:{hexd}"),
                           ModelName.parse(f"x/t{next(_seq)}:q4"), size=len(gguf),
                           options=opts)
            except ProtocolError as exc:
                error = exc
            took = time.monotonic() - t0
            encoded_gets = srv.gets - encode_from + 1
            if encoded_gets <= 0:  # every GET was over before the encoding began
                assert error is None
                return
            assert error is not None, srv.log
            message = str(error)
        else:
            r = run("--store", str(store), "fetch", srv.url, "--sha256", hexd, "--name",
                    f"x/t{next(_seq)}:q4", "--chunk-size", chunk, "--retries", "3")
            took = time.monotonic() - t0
            if srv.gets < encode_from:
                assert r.code == 0, r.err
                return
            assert r.code == 6, r.err
            lines = r.err.splitlines()
            errors = [x for x in lines if x.startswith("error: ")]
            assert len(errors) == 1 and lines[-1].startswith("hint: "), r.err
            assert not [x for x in lines if "warning" in x], r.err
            message = errors[0]
    assert f"Content-Encoding: {coding}" in message
    assert took < 10, took
    assert not list((store / "blobs").glob("sha256-*"))


@pytest.mark.timeout(120)
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(coding=st.sampled_from(PLAIN_LABELS), ranges=st.booleans(), chunked=st.booleans())
def test_a_content_encoding_that_names_no_compression_is_plain_bytes(
        gguf: bytes, tmp_path_factory: pytest.TempPathFactory, coding: str, ranges: bool,
        chunked: bool) -> None:
    hexd = hashlib.sha256(gguf).hexdigest()
    store = tmp_path_factory.mktemp("s")
    with QuirkyServer(gguf, ranges=ranges, encoding=coding, encode_from=1,
                      chunked=chunked) as srv:
        r = run("--store", str(store), "fetch", srv.url, "--sha256", hexd, "--name",
                f"x/p{next(_seq)}:q4", "--chunk-size", "64K")
    assert r.code == 0, r.err


# ---------------------------------------------------------------------- a server that ignores
# Range: the counts (the tester's repro_norange_resumed.sh)
@pytest.mark.timeout(120)
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), size_known=st.booleans(), connections=st.integers(1, 6))
def test_a_server_that_ignores_range_counts_what_it_sent_and_resumes_nothing(
        gguf: bytes, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject,
        size_known: bool, connections: int) -> None:
    """Whatever an earlier (killed) run left, a server that ignores Range sends the whole
    file again: nothing counts as resumed. When the size probe already got the whole file
    (200 to its range), the file is one stream at once: one GET after the probe, and
    bytes_fetched is the file's size (it was that plus the ranged stream it threw away)."""
    store = Store(tmp_path_factory.mktemp("s"))
    ranges = data.draw(written_ranges(len(gguf)), label="left by a killed run")
    if ranges:
        leave_ranges(store, gguf, ranges, durable=data.draw(st.booleans(), label="durable"))
    with QuirkyServer(gguf, ranges=False) as srv:
        r = fetch_file(store, srv.url, Digest.parse("sha256:" + hashlib.sha256(gguf).hexdigest()),
                       ModelName.parse(f"x/t{next(_seq)}:q4"),
                       size=len(gguf) if size_known else None,
                       options=opts(chunk_size=CHUNK, connections=connections))
    assert (store.root / "blobs" / f"sha256-{hashlib.sha256(gguf).hexdigest()}").read_bytes() \
        == gguf
    if sum(e - s for s, e in ranges) == len(gguf):  # all there: hashed, nothing asked
        assert (r.bytes_resumed, r.bytes_fetched) == (len(gguf), 0)
        return
    assert r.bytes_resumed == 0
    assert r.bytes_fetched >= len(gguf)
    if not size_known:
        assert [m for m, _ in srv.log].count("GET") == 2, srv.log
        assert r.bytes_fetched == len(gguf)
