"""The pull-through mirror against a real ``docker-registry`` upstream (issue 11, item 3).

The mirror is driven as the OCI routes drive it (``covers`` / ``manifest`` / ``blob`` from
an event loop); the upstream sits behind ``tests/faultproxy.FaultProxy``, which throttles
and counts the blob bytes it relays.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.errors import InvalidInput
from blobstore.manifest import DOCKER_MANIFEST, OCI_INDEX
from blobstore.name import ModelName
from blobstore.store import Store
from registry_client.pull import PullOptions
from registry_server.mirror import parse_upstream
from tests.faultproxy import FaultProxy
from tests.registry_server.mirrorkit import (
    Consumed,
    KiB,
    MiB,
    assert_one_upstream_fetch,
    consume,
    fetch_manifest,
    mirror_name,
    new_mirror,
    proxy,
    push_model,
    registry,
    run_async,
)
from tests.servers import DockerRegistry

__all__ = ["proxy", "registry"]  # fixtures


def _digests(model_blobs: dict[str, bytes]) -> dict[Digest, bytes]:
    return {Digest.parse(f"sha256:{h}"): b for h, b in model_blobs.items()}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", ["registry.ollama.ai", "models.example:8080"])
def test_cold_model_is_stored_as_pull_would(tmp_path: Path, registry: DockerRegistry,
                                            proxy: FaultProxy, host: str) -> None:
    model = push_model(registry, [700 * KiB, 3 * KiB])
    store = Store(tmp_path / "store")
    mirror = new_mirror(store, proxy.url, host=host)
    name = mirror_name(model, host)
    assert mirror.covers(name)
    assert not mirror.covers(ModelName("elsewhere.example", "a", "b", "c"))

    async def go() -> list[bytes]:
        got = await fetch_manifest(mirror, name, model.tag)
        assert got is not None
        assert got.body == model.raw
        assert got.digest == Digest.of_bytes(model.raw)
        outs = await asyncio.gather(*(consume(mirror, name, d, truth)
                                      for d, truth in _digests(model.blobs).items()))
        for o in outs:
            assert o.error is None, o.error
        return [o.data for o in outs]

    datas = run_async(go, 40)
    assert datas == list(model.blobs.values())
    assert mirror.wait_idle(20)
    listed = {str(m.name) for m in store.list_models()}
    assert str(name) in listed
    ns, repo = model.repo.split("/")
    assert (tmp_path / "store" / "manifests" / host / ns / repo / model.tag).read_bytes() \
        == model.raw
    for d, truth in _digests(model.blobs).items():
        assert store.blob_path(d).read_bytes() == truth
    _, acts = mirror.activity.snapshot()
    model_acts = [a for a in acts if a.kind == "mirror" and a.name == str(name)]
    assert len(model_acts) == 1, acts
    assert model_acts[0].state == "done" and model_acts[0].total == model.total
    assert model_acts[0].done == model.total
    mirror.close()


@pytest.mark.timeout(60)
def test_unknown_manifest_and_blob_are_none(tmp_path: Path, registry: DockerRegistry,
                                            proxy: FaultProxy) -> None:
    model = push_model(registry, [10 * KiB])
    mirror = new_mirror(Store(tmp_path / "store"), proxy.url)
    name = mirror_name(model)

    async def go() -> None:
        assert await mirror.manifest(name, "no-such-tag") is None
        assert await mirror.blob(name, Digest.of_bytes(b"nothing like this")) is None

    run_async(go, 30)
    mirror.close()


async def _with_ticker(work: Awaitable[Consumed]) -> tuple[Consumed, float]:
    """Run ``work`` while a ticker measures the event loop's longest stall (seconds)."""
    worst = 0.0
    done = False

    async def tick() -> None:
        nonlocal worst
        last = time.monotonic()
        while not done:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            worst = max(worst, now - last - 0.01)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        return await work, worst
    finally:
        done = True
        await ticker


@pytest.mark.timeout(90)
def test_client_gets_bytes_before_the_upstream_ends(tmp_path: Path, registry: DockerRegistry,
                                                    proxy: FaultProxy) -> None:
    size = 6 * MiB
    model = push_model(registry, [size])
    (digest, truth), = [(d, b) for d, b in _digests(model.blobs).items() if len(b) == size]
    store = Store(tmp_path / "store")
    mirror = new_mirror(store, proxy.url)
    ended: list[float] = []
    proxy.set_faults(rate=512 * KiB)  # per connection: 4 connections, about 3 s in all
    try:
        proxy.on_blob_bytes(size, lambda: ended.append(time.monotonic()),
                            match=model.path_match)
        out, lag = run_async(lambda: _with_ticker(
            consume(mirror, mirror_name(model), digest, truth)), 60)
    finally:
        proxy.set_faults()
    assert out.error is None, out.error
    assert lag < 0.5, f"the event loop was blocked for {lag:.2f} s"
    assert out.data == truth
    assert ended, "the proxy never relayed the whole blob"
    first, upstream_end = out.times[0], ended[0]
    before = sum(len(b) for b, t in zip(out.blocks, out.times, strict=True) if t < upstream_end)
    print(f"first byte {upstream_end - first:.2f} s before the upstream's last; "
          f"{before / size:.0%} delivered by then")
    assert first < upstream_end - 1.0
    assert before >= size // 4
    assert mirror.wait_idle(20)
    mirror.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("late", [0.0, 0.4, 1.2])
def test_concurrent_clients_share_one_upstream_fetch(tmp_path: Path, registry: DockerRegistry,
                                                     proxy: FaultProxy, late: float) -> None:
    size = 2 * MiB + 123
    model = push_model(registry, [size])
    (digest, truth), = [(d, b) for d, b in _digests(model.blobs).items() if len(b) == size]
    store = Store(tmp_path / "store")
    counts: dict[str, float] = {}
    mirror = new_mirror(store, proxy.url, counts=counts)
    name = mirror_name(model)
    mark = proxy.mark()
    proxy.set_faults(rate=512 * KiB)  # about 1 s: the late joiner comes mid-flight or after

    async def go() -> list:  # type: ignore[type-arg]
        async def later() -> object:
            await asyncio.sleep(late)
            return await consume(mirror, name, digest, truth)
        return list(await asyncio.gather(consume(mirror, name, digest, truth), later(),
                                         consume(mirror, name, digest, truth)))

    try:
        outs = run_async(go, 60)
    finally:
        proxy.set_faults()
    for o in outs:
        assert o.error is None, o.error
        assert o.data == truth
    assert mirror.wait_idle(20)
    assert_one_upstream_fetch(proxy, model.path_match, mark, size)
    assert counts.get("mirror_fetches") == 1
    mirror.close()


@pytest.mark.timeout(90)
def test_blob_requests_follow_the_model_fetch(tmp_path: Path, registry: DockerRegistry,
                                              proxy: FaultProxy) -> None:
    """A manifest starts the model's pull; blob requests that follow ride on it."""
    model = push_model(registry, [1 * MiB + 5, 40 * KiB])
    store = Store(tmp_path / "store")
    counts: dict[str, float] = {}
    mirror = new_mirror(store, proxy.url, counts=counts)
    name = mirror_name(model)
    mark = proxy.mark()
    proxy.set_faults(rate=256 * KiB)

    async def go() -> list:  # type: ignore[type-arg]
        assert await fetch_manifest(mirror, name, model.tag) is not None
        return list(await asyncio.gather(*(consume(mirror, name, d, t) for d, t in
                                           _digests(model.blobs).items())))

    try:
        outs = run_async(go, 60)
    finally:
        proxy.set_faults()
    for o in outs:
        assert o.error is None, o.error
    assert mirror.wait_idle(20)
    for hexd, data in model.blobs.items():
        assert_one_upstream_fetch(proxy, f"{model.path_match}sha256:{hexd}", mark, len(data))
    assert counts.get("mirror_fetches") == 1  # the manifest; the blobs came with its pull
    assert store.has_model(name)
    mirror.close()


@pytest.mark.timeout(90)
def test_size_cap_applies_after_a_mirrored_model(tmp_path: Path, registry: DockerRegistry,
                                                 proxy: FaultProxy) -> None:
    old = push_model(registry, [600 * KiB])
    new = push_model(registry, [600 * KiB])
    store = Store(tmp_path / "store")
    mirror = new_mirror(store, proxy.url)

    async def fetch(model: object) -> None:
        from tests.registry_client.pullcheck import PushedModel
        assert isinstance(model, PushedModel)
        assert await fetch_manifest(mirror, mirror_name(model), model.tag) is not None

    run_async(lambda: fetch(old), 30)
    assert mirror.wait_idle(20)
    assert store.has_model(mirror_name(old))
    for e in store.list_models():  # past GC's grace period (as test_gc does)
        os.utime(e.path, (1000, 1000))
    for _d, p, _ in list(store.iter_blob_files()):
        os.utime(p, (1000, 1000))
    store.set_config("max-size", str(900 * KiB))
    run_async(lambda: fetch(new), 30)
    assert mirror.wait_idle(20)
    assert store.has_model(mirror_name(new))
    assert not store.has_model(mirror_name(old)), "the cap did not evict the older model"
    mirror.close()


@pytest.mark.parametrize(("text", "insecure", "want"), [
    ("https://mirror.example", False, ("registry.ollama.ai", "https://mirror.example")),
    ("http://127.0.0.1:5000/", True, ("registry.ollama.ai", "http://127.0.0.1:5000")),
    ("hf.co=https://hf.example:8443", False, ("hf.co", "https://hf.example:8443")),
    ("HF.CO=https://hf.example", False, ("hf.co", "https://hf.example")),
])
def test_parse_upstream(text: str, insecure: bool, want: tuple[str, str]) -> None:
    assert parse_upstream(text, insecure=insecure) == want


@pytest.mark.parametrize("text", ["http://127.0.0.1:5000", "ftp://x.example",
                                  "https://x.example/v2/", "https://u:p@x.example",
                                  "bad host=https://x.example", "not a url"])
def test_parse_upstream_refuses(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_upstream(text)


def test_digest_helper_matches_hashlib() -> None:  # the tests' own oracle
    assert Digest.of_bytes(b"x") == f"sha256:{hashlib.sha256(b'x').hexdigest()}"
    assert threading.current_thread() is threading.main_thread()


@pytest.mark.timeout(300)
@settings(max_examples=12, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 900 * KiB), data=st.data())
def test_ranges_follow_one_flight(registry: DockerRegistry, proxy: FaultProxy, size: int,
                                  data: st.DataObject) -> None:
    """``blob_range`` (a route's answer to ``Range`` on a mirrored miss): concurrent ranged
    readers, chosen by hypothesis, each get exactly their slice, all from one fetch."""
    cuts = data.draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, size)),
                              min_size=1, max_size=6))
    ranges = [(a, max(a + 1, b)) for a, b in cuts]
    model = push_model(registry, [size])
    truth = next(b for b in model.blobs.values() if len(b) == size)
    digest = Digest.of_bytes(truth)
    name = mirror_name(model)
    root = Path(tempfile.mkdtemp(prefix="blobctl-mirror-"))
    mirror = new_mirror(Store(root / "store"), proxy.url)
    mark = proxy.mark()
    proxy.set_faults(rate=1 << 20)

    async def read(a: int, b: int) -> bytes:
        got = await mirror.blob_range(name, digest, a, b)
        assert got is not None and got[0] == size
        return b"".join([block async for block in got[1]])

    async def go() -> list[bytes]:
        return list(await asyncio.gather(*(read(a, b) for a, b in ranges)))

    try:
        outs = run_async(go, 60)
        for (a, b), out in zip(ranges, outs, strict=True):
            assert out == truth[a:b], f"range {a}-{b} of {size}"
        assert mirror.wait_idle(20)
        assert_one_upstream_fetch(proxy, model.path_match, mark, size)
    finally:
        proxy.set_faults()
        mirror.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(60)
def test_manifest_by_digest_fetches_blobs_without_a_tag(tmp_path: Path,
                                                        registry: DockerRegistry,
                                                        proxy: FaultProxy) -> None:
    model = push_model(registry, [300 * KiB])
    store = Store(tmp_path / "store")
    mirror = new_mirror(store, proxy.url)
    name = mirror_name(model)
    ref = str(Digest.of_bytes(model.raw))

    async def go() -> None:
        got = await fetch_manifest(mirror, name, ref)
        assert got is not None and got.body == model.raw and got.digest == ref

    run_async(go, 30)
    assert mirror.wait_idle(20)
    for d, truth in _digests(model.blobs).items():
        assert store.blob_path(d).read_bytes() == truth
    assert store.list_models() == []  # no tag to store it by
    mirror.close()


@pytest.mark.timeout(60)
def test_index_by_tag_stores_the_platform_manifest(tmp_path: Path, registry: DockerRegistry,
                                                   proxy: FaultProxy) -> None:
    model = push_model(registry, [200 * KiB])
    image = Digest.of_bytes(model.raw)
    arch = PullOptions().architecture
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": DOCKER_MANIFEST, "digest": str(image), "size": len(model.raw),
         "platform": {"os": "linux", "architecture": arch}}]}).encode()
    r = httpx.put(f"{registry.url}/v2/{model.repo}/manifests/multi", content=index,
                  headers={"Content-Type": OCI_INDEX}, timeout=30)
    assert r.status_code == 201, r.text
    store = Store(tmp_path / "store")
    mirror = new_mirror(store, proxy.url)
    ns, repo = model.repo.split("/")
    name = ModelName("registry.ollama.ai", ns, repo, "multi")

    async def go() -> None:
        got = await fetch_manifest(mirror, name, "multi")
        assert got is not None and got.body == index and got.media_type == OCI_INDEX

    run_async(go, 30)
    assert mirror.wait_idle(20)
    assert (tmp_path / "store" / "manifests" / "registry.ollama.ai" / ns / repo
            / "multi").read_bytes() == model.raw  # as `blobctl pull` resolves an index
    mirror.close()
