"""A HEAD stays a HEAD across every redirect (RFC 9110 15.4.4; httpx does the same), and
no HEAD reads a body. Found from outside: a blob HEAD answered ``303 See Other`` went on
as a GET whose whole body (a 300 MB layer: 623 MB peak RSS) was read into memory, and
every blob was downloaded one extra time. Used by pull's HEAD check, push's blob HEADs
and the mirror's HEAD.

Hypothesis chooses a chain of redirect statuses and the method; a real server on
127.0.0.1 records what reached the end of the chain and how many body bytes it sent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry_client.client import RegistryClient
from registry_client.retry import RetryPolicy
from tests.servers import QuietHandler, ThreadedHTTP

BIG = 64 << 20  # what the end of the chain offers to a GET
BLOCK = b"\0" * (1 << 20)


class _Chain:
    """``/hop/S1,S2,…`` redirects with S1 to ``/hop/S2,…``; ``/hop/`` is the target."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.sent = 0
        self.lock = threading.Lock()
        chain = self

        class H(QuietHandler):
            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                statuses = self.path.removeprefix("/hop/").split(",")
                if statuses[0]:
                    self.send_response(int(statuses[0]))
                    self.send_header("Location", "/hop/" + ",".join(statuses[1:]))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with chain.lock:
                    chain.seen.append(self.command)
                self.send_response(200)
                self.send_header("Content-Length", str(BIG))
                self.end_headers()
                if self.command == "HEAD":
                    return
                try:
                    for _ in range(BIG // len(BLOCK)):
                        self.wfile.write(BLOCK)
                        with chain.lock:
                            chain.sent += len(BLOCK)
                except OSError:
                    pass

            do_GET = do_HEAD = do_POST = do_PUT = _any

        self.server = ThreadedHTTP(H)
        self.url = self.server.url


@pytest.fixture(scope="module")
def chain() -> Iterator[_Chain]:
    c = _Chain()
    yield c
    c.server.stop()


@pytest.mark.timeout(60)
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hops=st.lists(st.sampled_from([301, 302, 303, 307, 308]), min_size=1, max_size=4))
def test_a_head_stays_a_head_across_redirects(chain: _Chain, hops: list[int]) -> None:
    chain.seen.clear()
    chain.sent = 0
    url = f"{chain.url}/hop/{','.join(map(str, hops))},"
    with RegistryClient(retry=RetryPolicy(attempts=1)) as client:
        resp = client.request("HEAD", url, scope="", what="blob")
        resp.close()
    assert chain.seen == ["HEAD"]
    assert chain.sent == 0
    assert resp.headers["content-length"] == str(BIG)


@pytest.mark.timeout(60)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hops=st.lists(st.sampled_from([301, 302, 303, 307, 308]), min_size=1, max_size=4),
       method=st.sampled_from(["GET", "PUT", "POST"]))
def test_other_methods_follow_the_redirect_rules(chain: _Chain, hops: list[int],
                                                 method: str) -> None:
    """303 turns any other method into a GET (without its body); 301/302/307/308 keep it
    (blobctl follows by hand, so an upload is not turned into a GET by a 301/302)."""
    chain.seen.clear()
    url = f"{chain.url}/hop/{','.join(map(str, hops))},"
    with RegistryClient(retry=RetryPolicy(attempts=1)) as client:
        resp = client.request(method, url, scope="", what="x", body=lambda: b"payload")
        resp.close()
    assert chain.seen == ["GET" if 303 in hops else method]
