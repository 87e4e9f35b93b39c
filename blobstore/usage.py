"""``blobctl du``: unique bytes on disk, and per model its own vs shared bytes (spec/cli.md,
"du"). Read-only; ``Store.disk_usage`` is the public entry point."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blobstore.blobfiles import scan_blobs
from blobstore.digest import Digest
from blobstore.ingest.scan import OwnBytes, areas
from blobstore.name import ModelName

if TYPE_CHECKING:
    from blobstore.store import Store

__all__ = ["ModelUsage", "UsageReport", "disk_usage"]


@dataclass
class ModelUsage:
    name: ModelName
    size: int
    own_bytes: int
    shared_bytes: int


@dataclass
class UsageReport:
    total_bytes: int
    blob_count: int
    referenced_bytes: int
    unreferenced_bytes: int
    ingest_bytes: int
    models: list[ModelUsage]




def disk_usage(store: Store) -> UsageReport:
    """Unique bytes on disk, and per model its own vs shared bytes.

    Blobs counted as GC counts them (``blobstore/blobfiles.py``): blobs only (other files
    in ``blobs/`` are not blobs), a digest under both its name and Ollama's legacy
    ``sha256:`` name is one blob whose bytes are those of its distinct files (two
    copies on disk count twice, hardlinks once), a symlinked blob counts its target's
    size; referenced as GC sees it: digests a manifest that does not decode mentions
    count as referenced too, since GC keeps them."""
    table = scan_blobs(str(store.layout.blobs))
    sizes: dict[Digest, int] = {d: f.size for d, f in table.blobs.items()}
    # unfinished downloads count what removing them frees: not a file linked elsewhere
    # (an interrupted hardlink import's or HF-cache adoption's link), as GC counts them
    freeable = OwnBytes()
    partial = 0  # Ollama's own unfinished downloads (blobs/<digest name>-partial[-N])
    for name in table.partials:
        with contextlib.suppress(OSError):
            partial += freeable.add(os.lstat(os.path.join(store.layout.blobs, name)))
    count = len(sizes)
    total = sum(sizes.values())
    # a report: what cannot be read is warned about (by list_models below, once)
    kept = store.referenced_digests(on_problem=lambda path, reason: None)
    entries = [e for e in store.list_models() if e.summary is not None]
    refcount: dict[Digest, int] = {}
    for e in entries:
        assert e.summary is not None
        for d in e.summary.refs:
            refcount[d] = refcount.get(d, 0) + 1
    models: list[ModelUsage] = []
    for e in entries:
        assert e.summary is not None
        own = shared = 0
        for d in e.summary.refs:
            b = sizes.get(d, 0)
            if refcount[d] > 1:
                shared += b
            else:
                own += b
        models.append(ModelUsage(e.name, e.summary.size, own, shared))
    referenced = sum(b for d, b in sizes.items() if d in refcount or d in kept)
    ingest = partial
    for area in areas(store.layout):
        for dirpath, _, filenames in os.walk(area):
            for fn in filenames:
                with contextlib.suppress(OSError):
                    ingest += freeable.add(os.lstat(os.path.join(dirpath, fn)))
    models.sort(key=lambda m: -(m.own_bytes + m.shared_bytes))
    return UsageReport(total, count, referenced, total - referenced, ingest, models)
