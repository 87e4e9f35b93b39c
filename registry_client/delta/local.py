"""The pull side of a delta: which local blobs may serve as bases, their indexes (cached,
made once), and the plan for each new blob (spec/delta.md, "Discovery" and "Decision
rule").

Everything here runs before any byte of a blob is fetched; every failure here is
logged and means "no delta" for that blob, never a failed pull.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from blobstore.digest import Digest
from blobstore.errors import BlobctlError
from blobstore.manifest import Manifest
from blobstore.name import ModelName
from blobstore.store import Store
from registry_client.delta.artifact import find_indexes
from registry_client.delta.chunking import CHUNKER, chunk_file
from registry_client.delta.index import ChunkIndex, IndexCache
from registry_client.delta.plan import MIN_BLOB, MIN_FRACTION, DeltaPlan, compare, worth_it

__all__ = ["PROBE_BYTES", "Base", "base_candidates", "local_index", "plan_blobs"]

log = logging.getLogger("blobctl.delta")

PROBE_BYTES = 64 << 20   # chunk this much of a base before giving up on a base that shares
PROBE_SHARE = 0.02       # less than this share of its bytes with the new blob
MAX_BASES = 4            # candidate bases tried per new blob (closest in size first)


@dataclass(frozen=True)
class Base:
    digest: Digest
    size: int
    media_type: str
    path: Path


def local_index(st: Store, digest: Digest, size: int, *,
                probe: set[bytes] | None = None) -> ChunkIndex | None:
    """The index of local blob ``digest`` (from the cache, or chunked now and cached).

    With ``probe`` (the new blob's chunk hashes), chunking stops early and None is
    returned when the first PROBE_BYTES (or an eighth of the blob, if more) share less
    than PROBE_SHARE of their bytes with it: an unrelated blob costs ~PROBE_BYTES of
    chunking, not all of it."""
    cache = IndexCache(st.layout)
    hit = cache.get(digest, size, CHUNKER)
    if hit is not None:
        return hit
    path = st.blob_path(digest)
    limit = max(PROBE_BYTES, size // 8)
    shared = [0, 0]  # bytes matched, end of the last chunk

    def keep_going(end: int, h: bytes) -> bool:
        if probe is None:
            return True
        if h in probe:
            shared[0] += end - shared[1]
        shared[1] = end
        return not (end >= limit and shared[0] < PROBE_SHARE * end)

    idx = chunk_file(path, digest, keep_going=keep_going)
    if idx is not None:
        cache.put(idx)
    return idx


def _sharing(st: Store, name: ModelName) -> Iterable[Manifest]:
    """Manifests of the other local versions of ``name``: every tag of its repository."""
    for e in st.list_models():
        n = e.name
        if (n.host.lower(), n.namespace.lower(), n.model.lower()) == (
                name.host.lower(), name.namespace.lower(), name.model.lower()):
            m = e.manifest
            if m is not None:
                yield m


def base_candidates(st: Store, name: ModelName, bases: Iterable[ModelName],
                    exclude: set[Digest]) -> list[Base]:
    """Large local blobs of other versions of the model and of the named ``bases``."""
    out: dict[Digest, Base] = {}
    manifests = list(_sharing(st, name))
    for b in bases:
        manifests.append(st.get_manifest(b))  # a named base must exist: ModelNotFound
    for m in manifests:
        for layer in m.layers:
            if layer.size >= MIN_BLOB and layer.digest not in exclude \
                    and layer.digest not in out and st.has_blob(layer.digest):
                out[layer.digest] = Base(layer.digest, layer.size, layer.mediaType,
                                         st.blob_path(layer.digest))
    return list(out.values())


def plan_blobs(st: Store, client: object, name: ModelName, manifest: Manifest,
               missing: dict[Digest, int], bases: Iterable[ModelName] = (), *,
               local: ModelName | None = None) -> dict[Digest, DeltaPlan]:
    """Delta plans for the blobs of ``missing`` that pay off (the decision rule); the rest
    is pulled plainly. ``client`` is the pull's RegistryClient, ``name`` where the model
    comes from, ``local`` its name in the store (default ``name``): the other tags of its
    repository there are bases."""
    from registry_client.client import RegistryClient

    assert isinstance(client, RegistryClient)
    large = {d: s for d, s in missing.items() if s >= MIN_BLOB}
    if not large:
        return {}
    candidates = base_candidates(st, local or name, bases, set(missing))
    if not candidates:
        return {}
    indexes = find_indexes(client, name, manifest, large)
    types = {layer.digest: layer.mediaType for layer in manifest.layers}
    plans: dict[Digest, DeltaPlan] = {}
    for d, new in indexes.items():
        probe = {new.hash(i) for i in range(len(new))}
        ranked = sorted(candidates, key=lambda b: (b.media_type != types.get(d),
                                                   abs(b.size - new.size)))[:MAX_BASES]
        best: DeltaPlan | None = None
        for b in ranked:
            try:
                old = local_index(st, b.digest, b.size, probe=probe)
            except (OSError, BlobctlError) as exc:
                log.warning("delta: cannot index local blob %s: %s", b.digest.short, exc)
                continue
            if old is None:
                log.info("delta: %s shares too little with %s", b.digest.short, d.short)
                continue
            plan = compare(new, old, b.path)
            if best is None or plan.reused > best.reused:
                best = plan
        if best is not None and worth_it(best):
            log.info("delta for %s: reuse %d of %d bytes from %s", d.short, best.reused,
                     best.size, best.base.short)
            plans[d] = best
        elif best is not None:
            log.info("delta for %s: only %d of %d bytes reusable (< %.0f%%): plain pull",
                     d.short, best.reused, best.size, 100 * MIN_FRACTION)
    return plans
