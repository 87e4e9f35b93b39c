"""Blob misses of a mirror whose upstream redirects blobs to object storage (spec/serve.md,
"Mirror"; spec/pull.md, "Order of a pull", step 5).

Found from outside: behind storage that refuses ``HEAD`` on a URL signed for ``GET`` (S3
and R2 answer 403), every blob miss was ``502 upstream: blob …: access denied (403)``,
and after one failed fetch the mirror never recovered (a client's 20 retries all 502).
What the storage answers to ``HEAD`` is only a hint; the size comes from a ``GET``.

The upstream is the real ``docker-registry`` behind a redirecting front
(tests/registryfront.py). Hypothesis chooses what the storage answers to ``HEAD``
(200, 403, 405, 404, 500), whether its ``GET``\\ s fail (once, or until the upstream is
healed after a first request failed), the blob size, and whether a client asks the
manifest first (the mirror's model pull) or the blob alone.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.store import Store
from registry_client.errors import RegistryError
from tests.registry_server.mirrorkit import (
    KiB,
    consume,
    fetch_manifest,
    mirror_name,
    new_mirror,
    push_model,
    registry,
    run_async,
)
from tests.registryfront import RegistryFront
from tests.servers import DockerRegistry

__all__ = ["registry"]  # fixtures


@pytest.fixture(scope="module")
def front(registry: DockerRegistry) -> Iterator[RegistryFront]:
    with RegistryFront(registry.port) as f:
        f.redirect = True
        yield f


@pytest.mark.timeout(240)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(store_head=st.sampled_from([200, 403, 405, 404, 500]),
       fail=st.sampled_from(["never", "once", "until healed"]),
       size=st.integers(0, 300 * KiB), via_manifest=st.booleans())
def test_a_blob_miss_behind_storage_that_refuses_head_is_served(
        registry: DockerRegistry, front: RegistryFront, store_head: int, fail: str,
        size: int, via_manifest: bool) -> None:
    model = push_model(registry, [size])
    truth = next(b for b in model.blobs.values() if not b.startswith(b'{"model_format"')) \
        if size else b""
    digest = Digest.of_bytes(truth)
    name = mirror_name(model)
    front.store_head = store_head
    front.store_fail = {"never": 0, "once": 1, "until healed": 1_000_000}[fail]
    root = Path(tempfile.mkdtemp(prefix="mirror-redirected-"))
    mirror = new_mirror(Store(root / "store"), front.url)
    try:
        if fail == "until healed":
            async def first() -> None:
                if via_manifest:
                    assert await fetch_manifest(mirror, name, model.tag) is not None
                try:
                    got = await consume(mirror, name, digest, truth)
                except RegistryError as exc:  # the route's 502 (never a 404: it exists)
                    assert exc.status in (500, None), exc
                    return
                assert got.error is not None or got.data == truth

            run_async(first, 60)
            assert mirror.wait_idle(60)
            front.store_fail = 0
        got = run_async(lambda: consume(mirror, name, digest, truth), 60)
        assert got.error is None, got.error
        assert got.size == len(truth)
        assert got.data == truth
        assert mirror.wait_idle(60)
        assert mirror.store.layout.blob(digest).read_bytes() == truth
        # a blob the upstream does not have is still "no such blob" (the route's 404)
        missing = Digest.of_bytes(b"not upstream" + truth)
        assert run_async(lambda: mirror.blob(name, missing), 60) is None
    finally:
        front.store_fail = 0
        mirror.close(10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(120)
def test_serve_upstream_recovers_behind_storage_that_refuses_head(
        tmp_path: Path, registry: DockerRegistry, front: RegistryFront) -> None:
    """As the outside tester ran it (t_mirror.sh, t_mirror_recover.sh): ``blobctl serve
    --upstream`` in front of storage answering HEAD 403; its GETs fail until healed."""
    import httpx

    from tests.registry_client.pullcheck import cli, finish
    from tests.registry_server.test_mirror_e2e import Serve

    model = push_model(registry, [300 * KiB, 2 * KiB])
    front.store_head, front.store_fail = 403, 1_000_000
    serve = Serve(tmp_path / "served", front.url)
    try:
        blobs = {Digest.of_bytes(b): b for b in model.blobs.values()}
        big = max(blobs, key=lambda d: len(blobs[d]))
        url = f"{serve.url}/v2/{model.repo}/blobs/{big}"
        r = httpx.get(url, timeout=60)
        assert r.status_code == 502, r.status_code  # failing upstream: never a 404
        assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
        front.store_fail = 0
        r = httpx.get(url, timeout=60)
        assert r.status_code == 200, r.text
        assert r.content == blobs[big]
        ref = f"{serve.netloc}/{model.repo}:{model.tag}"
        code, _, err = finish(cli("pull", ref, "--insecure", "--quiet", "--store",
                                  str(tmp_path / "client")), 60, "pull through serve")
        assert code == 0, err[-3000:]
        client = Store(tmp_path / "client")
        for d, data in blobs.items():
            assert client.blob_path(d).read_bytes() == data
    finally:
        front.store_head, front.store_fail = 200, 0
        serve.stop()
