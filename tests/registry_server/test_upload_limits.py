"""The upload-session limits of a server without ``--auth`` (spec/serve.md, "Uploads"):
every client is the caller "anonymous", so the per-caller share is counted per client
address. Found from outside: 32 sessions left open by one client made every other
client's push 429 "too many upload sessions (32 open, 32 of them yours)" though it had
none. Hypothesis plays opens and cancels by three loopback addresses against a model of
the limits; every 429 must say truthfully whose sessions fill the limit."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore import Store
from registry_server.context import ServerContext
from tests.registry_server.conftest import APPS, serving

pytestmark = pytest.mark.timeout(120)

ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
TOTAL, EACH = 5, 3


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServerContext]]:
    with serving(Store(tmp_path_factory.mktemp("limits")), push=True) as (url, ctx):
        uploads = APPS[id(ctx)].state.oci.uploads
        uploads.max_sessions, uploads.max_per_subject = TOTAL, EACH
        yield url, ctx


def _clients(url: str) -> list[httpx.Client]:
    return [httpx.Client(base_url=url, timeout=30,
                         transport=httpx.HTTPTransport(local_address=a)) for a in ADDRESSES]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(st.tuples(st.sampled_from(["open", "open", "cancel"]),
                                st.integers(0, len(ADDRESSES) - 1)), max_size=14))
def test_anonymous_sessions_are_counted_per_client_address(
        open_server: tuple[str, ServerContext], steps: list[tuple[str, int]]) -> None:
    url, _ = open_server
    clients = _clients(url)
    held: list[list[str]] = [[] for _ in ADDRESSES]
    try:
        for action, who in steps:
            c = clients[who]
            if action == "cancel":
                if held[who]:
                    assert c.delete(held[who].pop()).status_code == 204
                continue
            r = c.post("/v2/ns/x/blobs/uploads/")
            mine, total = len(held[who]), sum(map(len, held))
            if mine < EACH and total < TOTAL:
                assert r.status_code == 202, r.text
                held[who].append(r.headers["Location"])
                continue
            assert r.status_code == 429, r.text
            message = r.json()["errors"][0]["message"]
            if mine >= EACH:
                assert f"from your address {ADDRESSES[who]} ({mine} open" in message, message
            else:  # the server is full, and not by this client's doing
                m = re.search(r"(\d+) of them yours", message)
                assert m is not None and int(m.group(1)) == mine, message
                assert f"({total} open" in message, message
    finally:
        for who, locs in enumerate(held):
            for loc in locs:
                clients[who].delete(loc)
        for c in clients:
            c.close()
