"""How the OCI routes use a ``Mirror`` on a miss (the seam; the real mirror has its own
tests): a small in-test Mirror whose blob stream can fail at a chosen byte. The client
gets the right bytes or a cut connection, never wrong bytes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore import Digest, ModelName, Store
from registry_server.context import MirroredManifest, ServerContext
from tests.registry_server.conftest import serving
from tests.servers import OCI_MANIFEST, make_manifest, sha

pytestmark = pytest.mark.timeout(120)

DATA = os.urandom(700_000)
RAW = make_manifest(b"{}", [("application/vnd.ollama.image.model", DATA)],
                    media_type=OCI_MANIFEST)


class FailingMirror:
    def __init__(self) -> None:
        self.fail_at: int | None = None
        self.piece = 65536

    def covers(self, name: ModelName) -> bool:
        return name.host == "up.example"

    async def manifest(self, name: ModelName, reference: str) -> MirroredManifest | None:
        if reference in ("1", sha(RAW)):
            return MirroredManifest(name.with_tag("1"), Digest.parse(sha(RAW)), OCI_MANIFEST, RAW)
        return None

    async def prefetch(self, got: MirroredManifest) -> None:
        pass  # blobs come on request

    async def blob(self, name: ModelName,
                   digest: Digest) -> tuple[int, AsyncIterator[bytes]] | None:
        if digest != sha(DATA):
            return None

        async def stream() -> AsyncIterator[bytes]:
            for a in range(0, len(DATA), self.piece):
                if self.fail_at is not None and a + self.piece > self.fail_at:
                    yield DATA[a:self.fail_at]
                    raise OSError("upstream went away")
                yield DATA[a:a + self.piece]

        return len(DATA), stream()


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[tuple[str, FailingMirror, ServerContext]]:
    store = Store(tmp_path_factory.mktemp("mirror-store"))
    mirror = FailingMirror()
    with serving(store) as (url, ctx):
        ctx.mirror = mirror
        yield url, mirror, ctx


def test_manifest_and_blob_misses_go_to_the_mirror(
        mirrored: tuple[str, FailingMirror, ServerContext]) -> None:
    url, mirror, _ = mirrored
    mirror.fail_at = None
    with httpx.Client(base_url=url) as c:
        r = c.get("/v2/up.example/ns/m/manifests/1")
        assert r.status_code == 200 and r.content == RAW
        assert r.headers["Docker-Content-Digest"] == sha(RAW)
        assert c.get("/v2/up.example/ns/m/manifests/2").status_code == 404
        assert c.get("/v2/other.example/ns/m/manifests/1").status_code == 404
        r = c.get(f"/v2/up.example/ns/m/blobs/{sha(DATA)}")
        assert r.status_code == 200 and r.content == DATA
        text = c.get("/metrics").text
    assert "blobctl_mirror_hits_total 2" in text
    assert "blobctl_mirror_misses_total 1" in text


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(fail_at=st.integers(0, len(DATA) - 1), piece=st.sampled_from([1000, 65536, 300_000]))
def test_upstream_failure_cuts_the_connection(mirrored: tuple[str, FailingMirror, ServerContext],
                                              fail_at: int, piece: int) -> None:
    url, mirror, _ = mirrored
    mirror.fail_at, mirror.piece = fail_at, piece
    got = bytearray()
    with pytest.raises(httpx.HTTPError), httpx.Client(timeout=30) as c, \
            c.stream("GET", f"{url}/v2/up.example/ns/m/blobs/{sha(DATA)}") as r:
        assert r.status_code == 200
        assert int(r.headers["Content-Length"]) == len(DATA)
        for b in r.iter_raw():
            got += b
    assert len(got) <= fail_at
    assert bytes(got) == DATA[:len(got)]  # a prefix of the right bytes, never others
