"""A mirror stream whose download starts over (issue 11, item 3).

The upstream (``tests/servers.FaultServer``) ignores ``Range`` and cuts the first
whole-blob response short, so the engine downloads the blob as one stream and retries it
from byte 0: the hash frontier moves back. A client that already received bytes of the
first attempt is cut (its bytes were right, but nothing ties the retried bytes to them
before the final digest check); a client that comes after the restart gets the whole blob;
the blob lands verified.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blobstore.digest import Digest
from blobstore.name import ModelName
from blobstore.store import Store
from registry_client.download import BlobJob
from registry_client.pull import PullOptions, fetch_blobs
from registry_client.retry import RetryPolicy
from tests.registry_server.mirrorkit import Consumed, KiB, consume, new_mirror, run_async
from tests.servers import Fault, FaultServer

SIZE = 400 * KiB


def _server(truth: bytes, heads: int = 0) -> FaultServer:
    """``heads``: HEAD requests the client sends first (they take a fault turn too)."""
    srv = FaultServer(default_rate=400 * KiB).start()
    srv.add_blob(truth)
    srv.faults = [Fault("ignore_range", times=1 + heads),
                  Fault("truncate", after=200 * KiB, times=1)]
    return srv


@pytest.mark.timeout(60)
def test_frontier_moves_back_when_one_stream_restarts(tmp_path: Path) -> None:
    truth = bytes(range(256)) * (SIZE // 256)
    digest = Digest.of_bytes(truth)
    srv = _server(truth)
    seen: list[int] = []

    def on_frontier(job: BlobJob, n: int) -> None:
        seen.append(n)

    try:
        store = Store(tmp_path / "store")
        fetch_blobs(f"{srv.netloc}/ns/m:t", {digest: SIZE}, store=store,
                    options=PullOptions(insecure=True, connections=1, chunk_size=64 * KiB,
                                        retry=RetryPolicy(attempts=3, base_delay=0.01),
                                        on_frontier=on_frontier))
    finally:
        srv.stop()
    assert store.blob_path(digest).read_bytes() == truth
    back = [i for i in range(1, len(seen)) if seen[i] < seen[i - 1]]
    assert len(back) == 1, seen
    # the end is reported twice: once verified (before the commit), once committed
    assert seen[back[0] - 1] < SIZE and seen[-2:] == [SIZE, SIZE] and seen.count(SIZE) == 2


@pytest.mark.timeout(60)
def test_streams_of_a_restarted_download(tmp_path: Path) -> None:
    truth = bytes(range(251)) * (SIZE // 251) + b"x" * (SIZE % 251)
    digest = Digest.of_bytes(truth)
    srv = _server(truth, heads=1)  # the mirror asks the blob's size with HEAD
    store = Store(tmp_path / "store")
    mirror = new_mirror(store, srv.url, connections=1, chunk_size=64 * KiB)
    name = ModelName("registry.ollama.ai", "ns", "m", "t")

    async def go() -> tuple[object, object]:
        async def late() -> object:
            await asyncio.sleep(0.9)  # after the cut at 200 KiB (0.5 s), during the retry
            return await consume(mirror, name, digest, truth)
        early, later = await asyncio.gather(consume(mirror, name, digest, truth), late())
        return early, later

    try:
        early, later = run_async(go, 40)
    finally:
        assert mirror.wait_idle(20)
        srv.stop()
    assert isinstance(early, Consumed) and isinstance(later, Consumed)
    assert early.error is not None, "a client that had bytes of the first attempt went on"
    assert 0 < len(early.data) < SIZE
    assert later.error is None, later.error
    assert later.data == truth
    assert store.blob_path(digest).read_bytes() == truth
    mirror.close()
