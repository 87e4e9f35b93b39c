"""GC phase 1a: a snapshot of the store, taken without the lock (spec/gc.md).

Manifests (through the one manifest walker, ``blobstore.index.walk_manifests``), blob
files, ingest entries, leases, state and the files running processes hold open or
mapped. When the caller allows forking, the blob folder is statted by a forked child
while this process reads the manifests (threads would serialize on the GIL).
"""

from __future__ import annotations

import array
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from blobstore import _forked, ingest
from blobstore.digest import Digest
from blobstore.errors import InvalidDigest
from blobstore.index import walk_manifests
from blobstore.ingest import IngestEntry
from blobstore.inuse import InUse, files_in_use
from blobstore.lease import LeaseInfo, live_leases
from blobstore.name import ModelName
from blobstore.state import ModelState
from blobstore.store import Store

__all__ = ["Model", "Snapshot", "blob_table", "current_refs", "stat_blob_folder",
           "take_snapshot"]

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


@dataclass
class Snapshot:
    now: float
    models: list[Model]
    rescued: set[Digest]  # named by manifests that do not decode: always kept
    blobs: dict[Digest, tuple[str, int, float, float]]   # file name, size, mtime, atime
    manifest_files: dict[str, tuple[int, int, frozenset[Digest]]]  # mtime_ns, size, refs
    ingests: list[IngestEntry]     # from blobstore.ingest.scan, plus Ollama's -partial files
    leases: list[LeaseInfo]
    in_use: InUse
    real_blobs: str
    real_ingest: str = ""

    def ingest_open(self, path: Path) -> bool:
        """Whether a process has the ingest entry (or a file inside it) open or mapped."""
        if path.parent.name == "blobs":  # Ollama's blobs/*-partial files
            return f"{self.real_blobs}/{path.name}" in self.in_use
        top = f"{self.real_ingest}/{path.name}"
        return any(h == top or h.startswith(top + "/") for h in self.in_use.holders)


def stat_blob_folder(folder: str) -> bytes:
    """Regular files in ``folder`` with their size, mtime and atime, packed (the format
    is private to this module: a forked child sends it to the parent)."""
    names: list[str] = []
    nums = array.array("q")
    try:
        entries = os.scandir(folder)
    except FileNotFoundError:
        entries = None
    if entries is not None:
        with entries:
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    names.append(e.name)
                    nums.extend((st.st_size, st.st_mtime_ns, st.st_atime_ns))
    text = "\0".join(names).encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(names)) + nums.tobytes() + text


def blob_table(
    packed: bytes,
) -> tuple[dict[Digest, tuple[str, int, float, float]], list[str]]:
    """Blob files by digest (file name, size, mtime, atime), and the names of Ollama's
    unfinished downloads (``<digest name>-partial[-N]``)."""
    (n,) = struct.unpack_from("<Q", packed)
    nums = array.array("q")
    nums.frombytes(packed[8:8 + 24 * n])
    names = packed[8 + 24 * n:].decode("utf-8", "surrogateescape").split("\0") if n else []
    blobs: dict[Digest, tuple[str, int, float, float]] = {}
    partials: list[str] = []
    from_filename = Digest.from_filename
    for i, name in enumerate(names):
        try:
            d = from_filename(name)
        except InvalidDigest:
            if "-partial" in name:
                partials.append(name)
            continue
        size = nums[3 * i]
        prev = blobs.get(d)
        if prev is not None:
            size += prev[1]  # canonical + legacy copies
        blobs[d] = (name, size, nums[3 * i + 1] / 1e9, nums[3 * i + 2] / 1e9)
    return blobs, partials


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
    blobs, partials = blob_table(
        packed if packed is not None else stat_blob_folder(blob_folder))
    t2 = time.monotonic()
    in_use = files_in_use(real_blobs, real_ingest)
    log.debug("gc snapshot: manifests %.3fs (blob folder %s), blob table %.3fs, "
              "files in use %.3fs", t1 - t0, "forked" if packed is not None else "in-process",
              t2 - t1, time.monotonic() - t2)
    for m in models:
        if m.state.last_used is None and m.model_digest is not None and m.model_digest in blobs:
            m.last_used = max(m.mtime, blobs[m.model_digest][3])
    leases = (live_leases(layout) if lease_ttl is None
              else live_leases(layout, ttl=lease_ttl))
    # the ingest area as its writer module sees it (held or not, heartbeat age)
    ingests = (ingest.scan(layout, leases) if lease_ttl is None
               else ingest.scan(layout, leases, ttl=lease_ttl))
    # Ollama's own unfinished downloads: blobs/sha256-<hex>-partial[-N]
    ingests.extend(ingest.legacy_entry(layout.blobs / name, leases) for name in partials)
    return Snapshot(now, models, rescued, blobs, files, ingests, leases, in_use, real_blobs,
                    real_ingest)


def _scan_manifests(
    store: Store, states: dict[str, ModelState]
) -> tuple[list[Model], dict[str, tuple[int, int, frozenset[Digest]]], set[Digest]]:
    """Every manifest: summaries from the index when the file is provably unchanged
    (``blobstore/index.py``), else read and decoded (and remembered)."""
    index = store.state.manifest_index() if store.state is not None else None
    models: list[Model] = []
    files: dict[str, tuple[int, int, frozenset[Digest]]] = {}
    rescued: set[Digest] = set()
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
        # never used through blobctl: newest of manifest mtime and model blob atime
        # (the atime is filled in by take_snapshot once blobs are scanned)
        last = state.last_used if state.last_used is not None else st.st_mtime
        models.append(Model(f.name, f.path, summary.digest, summary.refs, st.st_mtime, state,
                            last, summary.model))
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
