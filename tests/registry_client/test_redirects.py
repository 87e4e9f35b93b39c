"""Redirects the client cannot follow: one clean ProtocolError (exit 6), never a traceback.

A tiny server on 127.0.0.1 answers every request with a 302 whose ``Location`` is the
one under test (malformed, or a scheme httpx cannot speak).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from registry_client.client import RegistryClient
from registry_client.errors import ProtocolError
from registry_client.retry import RetryPolicy
from tests.cli.clirun import run


class _Redirector:
    def __init__(self) -> None:
        self.location = ""
        self.hits = 0
        srv = self

        class H(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                srv.hits += 1
                self.send_response(302)
                self.send_header("Location", srv.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def redirector() -> Iterator[_Redirector]:
    r = _Redirector()
    yield r
    r.stop()


@pytest.mark.parametrize(("location", "why"), [
    ("http://cdn.example:port/blob?X-Sig=secret", "an invalid URL"),
    ("http://[::1/blob", "an invalid URL"),
    ("ftp://cdn.example/blob?X-Sig=secret", "an unsupported URL scheme"),
])
def test_bad_redirect_location_is_a_protocol_error(redirector: _Redirector, location: str,
                                                   why: str) -> None:
    redirector.location = location
    with RegistryClient(retry=RetryPolicy(attempts=3, base_delay=0.01)) as client, \
            pytest.raises(ProtocolError) as exc:
        client.request("GET", f"{redirector.url}/file", scope="", what="file")
    assert exc.value.url == f"{redirector.url}/file"
    assert why in exc.value.message and "secret" not in exc.value.message
    assert redirector.hits == 1  # the server's answer will not change: no retries


def test_bad_redirect_location_cli_error_line(redirector: _Redirector, tmp_path: Path) -> None:
    redirector.location = "http://cdn.example:port/blob?X-Sig=secret"
    url = f"{redirector.url}/file"
    r = run("fetch", url, "--sha256", "0" * 64, "--name", "mine/x:1", "--backoff", "0.01",
            "--store", str(tmp_path / "s"))
    assert r.code == 6, r.err
    assert r.err.splitlines()[0] == (
        f"error: {url} redirected to an invalid URL: 'http://cdn.example:port/blob'")
