"""Chunk indexes made on demand for the referrers API (spec/serve.md, "Chunk indexes";
spec/delta.md, "Storage and discovery").

When a client asks ``GET /v2/<name>/referrers/<digest>`` for a model manifest the
repository holds, and no stored manifest of the repository is a chunk-index artifact for
it, the server makes one: the index of each distinct layer of ``MIN_BLOB`` or more, by
``registry_client.delta.local_index`` (what ``blobctl push`` and ``blobctl index`` run;
cached in ``.blobctl/delta/``), and the artifact manifest by ``artifact_manifest``.

The artifact is *derived state*, never a model: nothing is written under ``manifests/``
or ``blobs/``. Its index blobs are the index cache's encodings, its manifest is computed
from them (the same bytes every time), and it is answered only while its subject
manifest is in the repository asked for. So GC (whose roots are the manifests) needs no
rule for it: it cannot be evicted while the model exists, and it is gone with the model.

Builds run in worker threads; requests for the same subject share one build (single
flight); a failed build is logged and counted, the referrers answer goes on without it,
and the next request tries again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio.to_thread

from blobstore import Digest, Store
from blobstore.errors import BlobctlError
from blobstore.manifest import Manifest
from registry_client.delta.artifact import EMPTY, artifact_manifest
from registry_client.delta.chunking import CHUNKER
from registry_client.delta.index import ChunkIndex, IndexCache
from registry_client.delta.local import local_index
from registry_client.delta.plan import MIN_BLOB

__all__ = ["BuiltIndex", "IndexArtifacts"]

log = logging.getLogger("blobctl.serve")


@dataclass(frozen=True)
class BuiltIndex:
    """The chunk-index artifact of one model manifest (``subject``)."""

    subject: Digest
    raw: bytes                       # the artifact manifest's bytes
    digest: Digest                   # their digest
    blobs: dict[Digest, bytes] = field(default_factory=dict)  # index blobs + empty config
    indexed_bytes: int = 0           # sum of the indexed layers' sizes

    def holds(self, digest: Digest) -> bool:
        return digest == self.digest or digest in self.blobs


def _large_layers(raw: bytes) -> tuple[Manifest, list[tuple[Digest, int]]] | None:
    """The manifest and its distinct layers of MIN_BLOB or more (push's rule); None for
    bytes that are not an image manifest (an index, an artifact, garbage)."""
    try:
        m = Manifest.decode(raw)
    except BlobctlError:
        return None
    seen: dict[Digest, int] = {}
    for layer in m.layers:
        if layer.size >= MIN_BLOB:
            seen.setdefault(layer.digest, layer.size)
    return m, list(seen.items())


def _artifact(m: Manifest, indexes: list[ChunkIndex]) -> BuiltIndex:
    encoded = [(i.blob, i.encode()) for i in indexes]
    blobs = {Digest.of_bytes(EMPTY): EMPTY}
    for _blob, data in encoded:
        blobs[Digest.of_bytes(data)] = data
    raw = artifact_manifest(m, [(b, Digest.of_bytes(d), len(d)) for b, d in encoded])
    return BuiltIndex(m.digest, raw, Digest.of_bytes(raw), blobs,
                      sum(i.size for i in indexes))


class IndexArtifacts:
    """Built chunk-index artifacts of one server process (memory) over the store's index
    cache (disk)."""

    MAX_KEPT = 10_000        # artifacts kept in memory, and their bytes (~0.05 % of each
    MAX_KEPT_BYTES = 256 << 20  # model: 0.5 MB per GiB); past either, all are dropped and
    #                           later requests read them back from the index cache

    def __init__(self, store: Store,
                 count: Callable[[str, float], None] = lambda _n, _v: None) -> None:
        self.store = store
        self.count = count
        self.cache = IndexCache(store.layout)
        self._built: dict[Digest, BuiltIndex | None] = {}   # subject -> artifact / none
        self._holders: dict[Digest, list[BuiltIndex]] = {}  # manifest or blob -> artifacts
        self._flights: dict[Digest, asyncio.Future[BuiltIndex | None]] = {}
        self._kept_bytes = 0
        self._lock = threading.Lock()  # _built is read from worker threads
        self.builds = 0      # builds that chunked or read the cache (not shared, not hits)
        self.shared = 0      # requests that joined a running build
        self.failures = 0

    # ------------------------------------------------------------------ building
    def build(self, raw: bytes) -> BuiltIndex | None:
        """Index the large layers of manifest bytes ``raw`` (chunking what the cache does
        not hold). None when there is no layer of MIN_BLOB or more. Raises OSError or
        BlobctlError (a layer missing or unreadable)."""
        return self._assemble(raw, lambda digest, size: local_index(self.store, digest, size))

    def from_cache(self, raw: bytes) -> BuiltIndex | None:
        """The artifact of ``raw`` when the index cache holds every large layer's index
        (no chunking); else None."""
        return self._assemble(raw, lambda digest, size: self.cache.get(digest, size, CHUNKER))

    @staticmethod
    def _assemble(raw: bytes, index_of: Callable[[Digest, int], ChunkIndex | None]
                  ) -> BuiltIndex | None:
        """The artifact over the large layers of ``raw``, each layer's index from
        ``index_of``; None when there is no large layer or ``index_of`` has none."""
        got = _large_layers(raw)
        if got is None or not got[1]:
            return None
        m, layers = got
        indexes = []
        for digest, size in layers:
            idx = index_of(digest, size)
            if idx is None:
                return None
            indexes.append(idx)
        return _artifact(m, indexes)

    def known(self, subject: Digest) -> BuiltIndex | None:
        with self._lock:
            return self._built.get(subject)

    def keep(self, subject: Digest, built: BuiltIndex | None) -> None:
        size = 0 if built is None else len(built.raw) + sum(map(len, built.blobs.values()))
        with self._lock:
            if subject in self._built:
                return
            if len(self._built) >= self.MAX_KEPT or \
                    self._kept_bytes + size > self.MAX_KEPT_BYTES:
                self._built.clear()
                self._holders.clear()
                self._kept_bytes = 0
            self._kept_bytes += size
            self._built[subject] = built
            if built is not None:
                for d in (built.digest, *built.blobs):
                    self._holders.setdefault(d, []).append(built)

    async def for_subject(self, subject: Digest, raw: bytes) -> BuiltIndex | None:
        """The artifact of manifest ``raw`` (digest ``subject``): kept, joined (a build of
        it is running) or built now in a worker thread. None when the model has no large
        layer or the build failed (logged; the next call tries again). A caller that is
        cancelled (client gone) leaves the build running for the others."""
        with self._lock:
            if subject in self._built:
                return self._built[subject]
        fut = self._flights.get(subject)
        if fut is None:
            fut = asyncio.ensure_future(self._run(subject, raw))
            self._flights[subject] = fut
        else:
            self.shared += 1
            self.count("index_builds_shared", 1)
        return await asyncio.shield(fut)

    async def _run(self, subject: Digest, raw: bytes) -> BuiltIndex | None:
        t0 = time.monotonic()
        try:
            self.builds += 1
            self.count("index_builds", 1)
            try:
                built = await anyio.to_thread.run_sync(self.build, raw)
            except (OSError, BlobctlError) as exc:  # a layer missing or unreadable
                self.failures += 1
                self.count("index_build_errors", 1)
                log.warning("chunk index of %s not built: %s", subject.short, exc)
                return None
            except Exception:  # the index is optional: a failure of any kind
                # answers the referrers list without it, never a 500 (spec/serve.md)
                self.failures += 1
                self.count("index_build_errors", 1)
                log.exception("chunk index of %s not built", subject.short)
                return None
            self.keep(subject, built)
            if built is not None:
                dt = time.monotonic() - t0
                self.count("index_build_seconds", dt)
                self.count("index_build_bytes", built.indexed_bytes)
                log.info("chunk index of %s: %d bytes indexed in %.3f s (%.0f MB/s)",
                         subject.short, built.indexed_bytes, dt,
                         built.indexed_bytes / max(dt, 1e-6) / 1e6)
            return built
        finally:
            self._flights.pop(subject, None)

    # ------------------------------------------------------------------ lookup
    def holding(self, digest: Digest) -> list[BuiltIndex]:
        """Kept artifacts whose manifest or one of whose blobs is ``digest``."""
        with self._lock:
            return list(self._holders.get(digest, ()))
