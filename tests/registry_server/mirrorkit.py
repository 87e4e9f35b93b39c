"""Shared pieces of the mirror tests: a real ``docker-registry`` upstream behind the fault
proxy, a mirror over a fresh store, and an asyncio driver with a hard time bound.

The mirror is called directly (as the OCI routes call it); every consumer records each
yielded block with the time it arrived, so tests can check prefixes and timing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blobstore.digest import Digest
from blobstore.name import ModelName
from blobstore.store import Store
from registry_client.pull import PullOptions
from registry_client.retry import RetryPolicy
from registry_server.context import MirroredManifest
from registry_server.mirror import UpstreamMirror
from tests.faultproxy import FaultProxy
from tests.registry_client.pullcheck import KiB, MiB, PushedModel, push_model
from tests.servers import DockerRegistry, running_registry

__all__ = ["Consumed", "KiB", "MiB", "PushedModel", "assert_one_upstream_fetch", "consume",
           "fetch_manifest", "mirror_name", "new_mirror", "proxy", "push_model", "registry",
           "run_async"]

T = TypeVar("T")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    yield from running_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def proxy(registry: DockerRegistry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.port) as px:
        yield px


def options(**kw: Any) -> PullOptions:
    base: dict[str, Any] = {"connections": 4, "chunk_size": 64 * KiB, "stall_timeout": 2.0,
                            "retry": RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)}
    base.update(kw)
    return PullOptions(**base)


def new_mirror(store: Store, upstream: str, *, host: str = "registry.ollama.ai",
               counts: dict[str, float] | None = None, **kw: Any) -> UpstreamMirror:
    def count(name: str, value: float) -> None:
        if counts is not None:
            counts[name] = counts.get(name, 0) + value

    return UpstreamMirror(store, {host: upstream}, insecure=True, count=count,
                          options=options(**kw))


def mirror_name(model: PushedModel, host: str = "registry.ollama.ai") -> ModelName:
    ns, repo = model.repo.split("/")
    return ModelName(host, ns, repo, model.tag)


async def fetch_manifest(mirror: UpstreamMirror, name: ModelName,
                         reference: str) -> MirroredManifest | None:
    """A manifest miss as the route answers an authorized caller: fetch, then prefetch."""
    got = await mirror.manifest(name, reference)
    if got is not None:
        await mirror.prefetch(got)
    return got


def blob_digest(model: PushedModel, data: bytes) -> Digest:
    return Digest.of_bytes(data)


@dataclass
class Consumed:
    """What one consumer of a mirror blob stream got."""

    size: int = -1
    blocks: list[bytes] = field(default_factory=list)
    times: list[float] = field(default_factory=list)   # time.monotonic() of each block
    error: BaseException | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.blocks)


async def consume(mirror: UpstreamMirror, name: ModelName, digest: Digest,
                  truth: bytes | None = None) -> Consumed:
    """Read the mirror's stream of ``digest`` to its end (or its error); with ``truth``,
    every prefix received is checked against the true bytes as it grows."""
    out = Consumed()
    got = await mirror.blob(name, digest)
    assert got is not None, f"mirror has no blob {digest.short}"
    out.size, stream = got
    pos = 0
    try:
        async for block in stream:
            if truth is not None:
                assert block == truth[pos:pos + len(block)], (
                    f"wrong bytes at {pos}..{pos + len(block)} of {digest.short}")
            pos += len(block)
            out.blocks.append(block)
            out.times.append(time.monotonic())
    except AssertionError:
        raise
    except Exception as exc:
        out.error = exc
    return out


def run_async(fn: Callable[[], Awaitable[T]], bound: float) -> T:
    """Run ``fn()`` on a fresh event loop, failing after ``bound`` seconds."""
    async def bounded() -> T:
        return await asyncio.wait_for(fn(), bound)

    return asyncio.run(bounded())


async def aiter_all(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([b async for b in stream])


def store_at(path: Path) -> Store:
    return Store(path)


def assert_one_upstream_fetch(proxy: FaultProxy, match: str, since: int, size: int) -> None:
    """The upstream sent one copy of a blob: exactly one GET covered its byte 0, and the
    bytes sent stay under 1.5 copies (a range engine's stolen ranges may resend a few KiB
    that were already in flight)."""
    proxy.wait_idle(match)
    gets = [x for x in proxy.exchanges()[since:] if x.method == "GET" and match in x.path]
    firsts = [x for x in gets if x.range is None or x.range.startswith("bytes=0-")]
    assert len(firsts) == 1, f"{len(firsts)} upstream GETs started at byte 0: {firsts}"
    sent = proxy.blob_bytes_sent(match, since=since)
    assert size <= sent <= size + size // 2, f"upstream sent {sent} bytes for a {size}-byte blob"
