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
