"""GC phase 1a: a snapshot of the store, taken without the lock (spec/gc.md).

Manifests (through the one manifest walker, ``blobstore.index.walk_manifests``), blob
files, ingest entries, leases, state and the files running processes hold open or
mapped. When the caller allows forking, the blob folder is statted by a forked child
while this process reads the manifests (threads would serialize on the GIL).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from blobstore import _forked, ingest
from blobstore.blobfiles import BlobFiles, blob_table, stat_blob_folder
from blobstore.digest import Digest
from blobstore.index import walk_manifests
from blobstore.ingest import IngestEntry
from blobstore.inuse import InUse, files_in_use
from blobstore.lease import LeaseInfo, live_leases
from blobstore.name import ModelName
from blobstore.state import ModelState
from blobstore.store import Store

__all__ = ["Model", "Snapshot", "blob_table", "current_refs", "link_targets",
           "stat_blob_folder", "take_snapshot", "target_folders"]

log = logging.getLogger("blobctl.gc")

_NEVER = ModelState(None, 0, False)


@dataclass(eq=False)
class Model:
    name: ModelName
    path: str
    raw_digest: Digest
    digests: frozenset[Digest]
    mtime: float
    state: ModelState
    last_used: float  # effective: state, else newest of manifest mtime and model blob atime
    model_digest: Digest | None
    # the manifests/ files of the same name a manifests-v2/ entry hides (newer Ollama's):
    # one model with it, evicted with it (else the older one would come back)
    hides: list[Model] = field(default_factory=list)


@dataclass
class Snapshot:
    now: float
    models: list[Model]
    rescued: set[Digest]  # named by manifests that do not decode: always kept
    blobs: dict[Digest, BlobFiles]   # names, size, mtime, atime (blobstore/blobfiles.py)
    manifest_files: dict[str, tuple[int, int, frozenset[Digest]]]  # mtime_ns, size, refs
    ingests: list[IngestEntry]     # from blobstore.ingest.scan, plus Ollama's -partial files
    leases: list[LeaseInfo]
    in_use: InUse
    real_blobs: str
    real_ingest: str = ""
    # symlinks at blob names that lead to no file: name, the link's mtime
    dangling: dict[Digest, tuple[str, float]] = field(default_factory=dict)
    # symlinked blobs: the real paths of their targets (a process that uses the blob
    # through its link has the target open or mapped)
    linked: dict[Digest, tuple[str, ...]] = field(default_factory=dict)

    def ingest_open(self, path: Path) -> bool:
        """Whether a process has the ingest entry (or a file inside it) open or mapped."""
        if path.parent.name == "blobs":  # Ollama's blobs/*-partial files
            return f"{self.real_blobs}/{path.name}" in self.in_use
        # (by its own folder: the ingest of blobs on another disk is inside blobs/)
        top = f"{os.path.realpath(path.parent)}/{path.name}"
        return any(h == top or h.startswith(top + "/") for h in self.in_use.holders)


def take_snapshot(store: Store, now: float, *, fork: bool = False,
                  lease_ttl: float | None = None) -> Snapshot:
    """Everything the plan needs, read without the store lock."""
    layout = store.layout
    states = store.model_states()  # raises rather than forget the pins
    real_blobs = os.path.realpath(layout.blobs)
    real_ingest = os.path.realpath(layout.ingest)
    t0 = time.monotonic()
    blob_folder = str(layout.blobs)

    def stat_blobs(out: BinaryIO) -> None:
        out.write(stat_blob_folder(blob_folder))

    child = _forked.start(stat_blobs) if fork else None
    try:
        models, files, rescued = _scan_manifests(store, states)
    except BaseException:
        if child is not None:
            child.cancel()
        raise
    packed = child.result() if child is not None else None
    t1 = time.monotonic()
    blobs, partials, dangling = blob_table(
        packed if packed is not None else stat_blob_folder(blob_folder))
    t2 = time.monotonic()
    linked = link_targets(blob_folder, blobs)
    in_use = files_in_use(real_blobs, real_ingest, *target_folders(linked))
    log.debug("gc snapshot: manifests %.3fs (blob folder %s), blob table %.3fs, "
              "files in use %.3fs", t1 - t0, "forked" if packed is not None else "in-process",
              t2 - t1, time.monotonic() - t2)
    for m in models:
        if m.state.last_used is None and m.model_digest is not None and m.model_digest in blobs:
            m.last_used = max(m.mtime, blobs[m.model_digest].atime)
    leases = (live_leases(layout) if lease_ttl is None
              else live_leases(layout, ttl=lease_ttl))
    # the ingest area as its writer module sees it (held or not, heartbeat age)
    ingests = (ingest.scan(layout, leases) if lease_ttl is None
               else ingest.scan(layout, leases, ttl=lease_ttl))
    # Ollama's own unfinished downloads: blobs/sha256-<hex>-partial[-N]
    ingests.extend(ingest.legacy_entry(layout.blobs / name, leases) for name in partials)
    return Snapshot(now, models, rescued, blobs, files, ingests, leases, in_use, real_blobs,
                    real_ingest, dangling, linked)


def link_targets(folder: str, blobs: dict[Digest, BlobFiles]) -> dict[Digest, tuple[str, ...]]:
    """The real paths behind the blobs that are symlinks (``BlobFiles.links``)."""
    out: dict[Digest, tuple[str, ...]] = {}
    for d, f in blobs.items():
        if f.links:
            out[d] = tuple(os.path.realpath(os.path.join(folder, n)) for n in f.names)
    return out


def target_folders(linked: dict[Digest, tuple[str, ...]]) -> list[str]:
    """The folders to look into for users of symlinked blobs."""
    return sorted({os.path.dirname(t) for targets in linked.values() for t in targets})


def _scan_manifests(
    store: Store, states: dict[str, ModelState]
) -> tuple[list[Model], dict[str, tuple[int, int, frozenset[Digest]]], set[Digest]]:
    """Every manifest: summaries from the index when the file is provably unchanged
    (``blobstore/index.py``), else read and decoded (and remembered)."""
    index = store.state.manifest_index() if store.state is not None else None
    models: list[Model] = []
    files: dict[str, tuple[int, int, frozenset[Digest]]] = {}
    rescued: set[Digest] = set()
    in_v2: dict[tuple[str, ...], Model] = {}
    for f in walk_manifests(store.layout, index):
        st = f.st
        files[f.path] = (st.st_mtime_ns, st.st_size, f.refs)
        if f.summary is None or f.name is None:
            # a manifest we cannot read or name: never evicted, and whatever digests it
            # mentions stay referenced (spec/gc.md, "Never deleted")
            rescued |= f.refs
            continue
        summary = f.summary
        state = states.get(f.name.key, _NEVER)
        v2 = store.layout.is_v2(f.path)
        # a manifests-v2/ name is as old as its link, not as the manifest blob it names:
        # a symlink's own time; a hardlink's ctime (linking changes it)
        if v2:
            link = os.lstat(f.path)
            mtime = max(link.st_mtime, link.st_ctime)
        else:
            mtime = st.st_mtime
        # never used through blobctl: newest of manifest mtime and model blob atime
        # (the atime is filled in by take_snapshot once blobs are scanned)
        last = state.last_used if state.last_used is not None else mtime
        m = Model(f.name, f.path, summary.digest, f.refs, mtime, state, last, summary.model)
        if v2:
            in_v2[f.name.parts] = m
        elif f.name.parts in in_v2:  # hidden by the manifests-v2/ one: part of that model
            owner = in_v2[f.name.parts]
            owner.hides.append(m)
            owner.digests = owner.digests | m.digests
            continue
        models.append(m)
    if index is not None:
        index.flush()
    return models, files, rescued


def current_refs(store: Store, snap: Snapshot, skip: set[str]) -> set[Digest]:
    """Digests referenced by the manifests on disk *now* (call under the store lock).

    Manifests unchanged since the snapshot (same mtime and size) are not re-read; those
    in ``skip`` are left out while unchanged (the orphan sweep skips the evicted ones,
    which name no orphan, so it need not wait for them to go).
    """
    refs: set[Digest] = set()
    for f in walk_manifests(store.layout, known=snap.manifest_files):
        if f.reused and f.path in skip:
            continue
        refs |= f.refs
    return refs
