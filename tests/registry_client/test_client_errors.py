"""The client's error contract: odd headers ignored, unreachable registries fail fast."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from blobstore.name import ModelName
from registry_client.client import RegistryClient
from registry_client.errors import TransferError
from registry_client.retry import RetryPolicy
from tests.servers import free_port

MANIFEST = b'{"schemaVersion":2,"layers":[]}'


class _Handler(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True
    digest_header = ""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        self.send_header("Content-Length", str(len(MANIFEST)))
        self.send_header("Docker-Content-Digest", self.server.digest_header)  # type: ignore[attr-defined]
        self.end_headers()
        self.wfile.write(MANIFEST)


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("header", ["md5:0123456789abcdef", "sha256:short", "nonsense"])
def test_a_digest_header_we_cannot_verify_is_ignored(server: ThreadingHTTPServer,
                                                     header: str) -> None:
    server.digest_header = header  # type: ignore[attr-defined]
    name = ModelName.parse(f"http://127.0.0.1:{server.server_address[1]}/ns/m:t")
    with RegistryClient(retry=RetryPolicy(attempts=1)) as client:
        raw, _ = client.get_manifest(name, "t")
    assert raw == MANIFEST


@pytest.mark.timeout(60)
def test_a_digest_header_that_does_not_match_still_fails(server: ThreadingHTTPServer) -> None:
    from blobstore.errors import DigestMismatch

    server.digest_header = "sha256:" + hashlib.sha256(b"other").hexdigest()  # type: ignore[attr-defined]
    name = ModelName.parse(f"http://127.0.0.1:{server.server_address[1]}/ns/m:t")
    with RegistryClient(retry=RetryPolicy(attempts=1)) as client, \
            pytest.raises(DigestMismatch):
        client.get_manifest(name, "t")


@pytest.mark.timeout(60)
def test_a_refused_connection_on_first_contact_fails_fast_with_a_hint() -> None:
    name = ModelName.parse(f"http://127.0.0.1:{free_port()}/ns/m:t")  # nobody listens
    t0 = time.monotonic()
    with RegistryClient(retry=RetryPolicy(attempts=8, base_delay=1.0)) as client, \
            pytest.raises(TransferError) as info:
        client.get_manifest(name, "t")
    assert time.monotonic() - t0 < 5
    port = name.host.rpartition(":")[2]
    assert f"cannot reach 127.0.0.1:{port}:" in info.value.message  # (the port may be the typo)
    assert info.value.hint and "--retries" in info.value.hint


@pytest.mark.timeout(60)
def test_https_to_a_plain_http_registry_suggests_insecure(server: ThreadingHTTPServer) -> None:
    """Found from outside: TLS to a plain-HTTP registry failed with WRONG_VERSION_NUMBER
    and a DNS/proxy hint; the hint is --insecure."""
    name = ModelName.parse(f"127.0.0.1:{server.server_address[1]}/ns/m:t")  # https
    with RegistryClient(retry=RetryPolicy(attempts=1)) as client, \
            pytest.raises(TransferError) as info:
        client.get_manifest(name, "t")
    assert info.value.hint and "--insecure" in info.value.hint, info.value


@pytest.mark.timeout(60)
def test_unreachable_attempts_can_ask_for_more() -> None:
    name = ModelName.parse(f"http://127.0.0.1:{free_port()}/ns/m:t")
    tries: list[float] = []
    policy = RetryPolicy(attempts=4, base_delay=0.01, unreachable_attempts=4)

    class Counting(RegistryClient):
        def _send_once(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
            tries.append(time.monotonic())
            return super()._send_once(*args, **kwargs)  # type: ignore[arg-type]

    with Counting(retry=policy) as client, pytest.raises(TransferError):
        client.get_manifest(name, "t")
    assert len(tries) == 4


@pytest.mark.parametrize(("body", "code", "text"), [
    (b'{"errors":[{"code":"UNKNOWN","message":"unknown error","detail":"write /d/data: no '
     b'space left on device"}]}', "UNKNOWN", "unknown error; write /d/data: no space left on "
                                             "device"),
    (b'{"errors":[{"code":"UNKNOWN","message":"unknown error","detail":{"DriverName":'
     b'"filesystem","Enclosed":{"Op":"write","Path":"/d/data","Err":28}}}]}', "UNKNOWN",
     "unknown error; write /d/data: no space left on device"),
    (b'{"errors":[{"code":"UNKNOWN","message":"unknown error","detail":{"Op":"write",'
     b'"Err":28}}]}', "UNKNOWN", "unknown error; write: no space left on device"),
    (b'{"errors":[{"code":"DENIED","message":"no"}]}', "DENIED", "no"),
    (b"<html>busy</html>", "", "<html>busy</html>"),
    (b"", "", ""),
])
def test_error_text_of_a_registry_error_body(body: bytes, code: str, text: str) -> None:
    """docker-registry's 500 for a failed storage write carries the cause in ``detail``
    (a string, or the Go error as an object with ``Err`` 28 = ENOSPC)."""
    from registry_client.client import error_text

    assert error_text(body) == (code, text)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [400, 403, 404, 500, 503])
def test_an_endless_error_body_is_read_only_in_part(status: int) -> None:
    """An error's body is read for its message only: at most 64 KiB of it (found by a
    fix helper: it was read whole, so a server answering an error with an endless or
    huge body held the client, and its memory grew with it)."""
    import socket

    from registry_client.errors import RegistryError

    lsock = socket.create_server(("127.0.0.1", 0))
    sent = [0]
    stop = threading.Event()

    def answer() -> None:
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(f"HTTP/1.1 {status} Oops\r\nContent-Type: text/plain\r\n"
                                 f"Content-Length: {1 << 40}\r\n\r\n".encode())
                    chunk = b"x" * 65536
                    while not stop.is_set():
                        conn.sendall(chunk)
                        sent[0] += len(chunk)
                except OSError:
                    pass

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        client = RegistryClient(insecure=True, retry=RetryPolicy(attempts=1))
        t0 = time.monotonic()
        with client, pytest.raises(RegistryError):
            client.get_manifest(ModelName.parse(f"127.0.0.1:{lsock.getsockname()[1]}/a/b:1"),
                                "1")
        assert time.monotonic() - t0 < 10
    finally:
        stop.set()
        lsock.close()
        t.join(5)
    assert sent[0] < 64 << 20, sent[0]  # (what the kernel's buffers took, not the body)


@pytest.mark.timeout(60)
def test_a_trickling_error_body_is_cut_at_its_deadline() -> None:
    """Found by review: an error body that trickles (a byte every 0.2 s: never a stall)
    held the client for as long as the server kept it up (64 KiB at that pace: ~4 h).
    It gets the time a whole body of 64 KiB gets; what came by then is the message."""
    import socket

    from registry_client.errors import RegistryError

    lsock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def one(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 400 Bad\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 100000\r\n\r\nslow")
                while not stop.wait(0.2):
                    conn.sendall(b".")
            except OSError:
                pass

    def answer() -> None:  # (the client tries TLS first: every connection is answered)
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        client = RegistryClient(insecure=True, stall_timeout=0.5,
                                retry=RetryPolicy(attempts=1))
        t0 = time.monotonic()
        with client, pytest.raises(RegistryError) as exc:
            client.get_manifest(ModelName.parse(f"127.0.0.1:{lsock.getsockname()[1]}/a/b:1"),
                                "1")
        took = time.monotonic() - t0
    finally:
        stop.set()
        lsock.close()
        t.join(5)
    assert took < 2 * 0.5 + 65536 / 16384 + 4, took
    assert "slow" in str(exc.value), exc.value
