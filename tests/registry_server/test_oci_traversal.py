"""Hostile URL paths: hypothesis builds raw request targets (dot segments, encoded
slashes and dots, digests, names, NULs) and sends them byte for byte; secret files beside
and inside the store must never come back, and no request may fail the server (5xx)."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore import Store
from tests.registry_server.conftest import add_model, serving

pytestmark = pytest.mark.timeout(300)

SECRET = b"TOPSECRET-" + os.urandom(16).hex().encode()
SECRET_HEX = hashlib.sha256(SECRET).hexdigest()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    base = tmp_path_factory.mktemp("hostile")
    store = Store(base / "store")
    add_model(store, "library/ok:1", [b"public layer"])
    add_model(store, "hf.co/org/repo:q4", [b"public hf layer"])
    # secrets beside the store, in its root, in its state folder, and a file named like a
    # blob of the secret outside blobs/
    for p in (base / "secret.txt", store.root / "secret.txt", store.layout.state_dir / "secret",
              base / f"sha256-{SECRET_HEX}", store.root / f"sha256-{SECRET_HEX}",
              store.layout.manifests / "secret"):
        p.write_bytes(SECRET)
    (base / "manifests" / "registry.ollama.ai" / "library" / "leak").mkdir(parents=True)
    (base / "manifests" / "registry.ollama.ai" / "library" / "leak" / "1").write_bytes(SECRET)
    with serving(store, push=True) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


SEGMENTS = st.sampled_from([
    "..", ".", "%2e%2e", "%2E%2E", ".%2e", "..%2f", "..%2F", "%2f", "%5c", "..\\", "%00",
    "secret.txt", "secret", "store", "blobs", "manifests", "uploads", "tags", "list",
    "referrers", "_catalog", "library", "ok", "leak", "1", "hf.co", "org", "repo", "q4",
    ".blobctl", "state.db", "etc", "passwd", "~", "%7e", "v2", "",
    f"sha256:{SECRET_HEX}", f"sha256-{SECRET_HEX}", f"sha256%3A{SECRET_HEX}",
    "sha256:" + "0" * 64, "sha256:../../secret.txt", "127.0.0.1%3A5055",
])


def fetch(host: str, port: int, method: str, target: str) -> tuple[int, bytes]:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  f"Content-Length: 0\r\n\r\n".encode("latin-1"))
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    raw = b"".join(chunks)
    if not raw:
        return 0, raw
    status = int(raw.split(b" ", 2)[1])
    return status, raw


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(segments=st.lists(SEGMENTS, min_size=1, max_size=9),
       method=st.sampled_from(["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"]),
       query=st.sampled_from(["", "?digest=sha256:" + SECRET_HEX, "?n=1&last=..",
                              "?mount=sha256:" + SECRET_HEX + "&from=../..",
                              "?artifactType=../x"]))
def test_no_path_reads_outside_the_store(hostile: tuple[str, int], segments: list[str],
                                         method: str, query: str) -> None:
    host, port = hostile
    target = "/v2/" + "/".join(segments) + query
    status, raw = fetch(host, port, method, target)
    assert SECRET not in raw
    assert status < 500, (target, raw[:300])
    assert status != 0


def test_known_escapes_answer_400_or_404(hostile: tuple[str, int]) -> None:
    host, port = hostile
    for target in ("/v2/../secret.txt", "/v2/library/../../secret.txt/manifests/1",
                   "/v2/..%2f..%2fsecret.txt/x/manifests/1", "/v2/library/leak/manifests/1",
                   f"/v2/library/ok/blobs/sha256:{SECRET_HEX}",
                   "/v2/library/ok/blobs/sha256:..%2f..%2fsecret.txt",
                   "/v2/%2e%2e/%2e%2e/manifests/secret"):
        status, raw = fetch(host, port, "GET", target)
        assert status in (400, 404), (target, status)
        assert SECRET not in raw
