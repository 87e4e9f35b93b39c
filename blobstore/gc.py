"""Garbage collection and LRU eviction under a size cap (spec/gc.md).

``gc()`` runs in two steps:

1. **Plan** (no lock): snapshot the store (manifests, blob files, ingest entries, leases,
   state, files open or mapped by running processes) and compute, as a pure function of
   that snapshot, which models to evict, which blobs and stale ingests to delete, and what
   to skip and why.
2. **Apply** (under the store lock): write an intent record, then re-check every candidate
   against the store *as it is now* (new manifests, new leases, new users) and delete:
   manifests first, then blobs no remaining manifest references, then stale ingests and
   empty folders; finally drop the intent record. A GC killed at any instant leaves every
   manifest's blobs in place; the next run finishes the recorded work.
"""

from __future__ import annotations

import array
import contextlib
import logging
import mmap
import os
import shutil
import stat
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

import msgspec

from blobstore import _forked
from blobstore._gcpause import collector_paused
from blobstore.digest import Digest
from blobstore.errors import (
    CapNotMet,
    InvalidDigest,
    InvalidManifest,
    InvalidName,
    StoreUnwritable,
)
from blobstore.index import FileKey, ManifestIndex, Summary
from blobstore.inuse import InUse, files_in_use
from blobstore.layout import Layout, fsync_dir, read_small, write_atomic
from blobstore.lease import LeaseInfo, live_leases
from blobstore.manifest import Manifest, referenced_by, scan_digests
from blobstore.name import ModelName
from blobstore.state import ModelState
from blobstore.store import Store
from blobstore.units import human_bytes

__all__ = ["GCOptions", "GCReport", "Skipped", "auto_gc", "gc", "plan"]

log = logging.getLogger("blobctl.gc")

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_GRACE = 3600.0
_NEVER = ModelState(None, 0, False)
DEFAULT_INGEST_GRACE = 86400.0


@dataclass(frozen=True)
class GCOptions:
    max_size: int | None = None
    older_than: float | None = None  # seconds since last use
    grace: float = DEFAULT_GRACE
    ingest_grace: float = DEFAULT_INGEST_GRACE
    dry_run: bool = False
    lock_timeout: float = 30.0


@dataclass
class Skipped:
    kind: str  # "model", "blob", "ingest"
    what: str
    reason: str


@dataclass(eq=False)
class _Model:
    name: ModelName
    path: str
    raw_digest: Digest
    digests: frozenset[Digest]
    mtime: float
    state: ModelState
    last_used: float  # effective: state, else newest of manifest mtime and model blob atime
    model_digest: Digest | None


@dataclass
class _Snapshot:
    now: float
    models: list[_Model]
    rescued: set[Digest]  # named by manifests that do not decode: always kept
    blobs: dict[Digest, tuple[str, int, float, float]]   # file name, size, mtime, atime
    manifest_files: dict[str, tuple[int, int, frozenset[Digest]]]  # mtime_ns, size, refs
    ingests: list[tuple[Path, int, float]]                 # path, bytes, mtime
    leases: list[LeaseInfo]
    in_use: InUse
    real_blobs: str


@dataclass
class GCReport:
    dry_run: bool
    removed_models: list[str] = field(default_factory=list)
    removed_blobs: list[str] = field(default_factory=list)
    removed_ingests: list[str] = field(default_factory=list)
    removed_dirs: int = 0
    freed_bytes: int = 0
    freed_blob_bytes: int = 0  # part of freed_bytes: blobs (not stale downloads)
    total_bytes_before: int = 0
    total_bytes_after: int = 0
    max_size: int | None = None
    skipped: list[Skipped] = field(default_factory=list)
    cap_met: bool = True
    cap_reason: str = ""
    finished_intent: bool = False
    plan_seconds: float = 0.0
    apply_seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "removed_models": self.removed_models,
            "removed_blobs": self.removed_blobs,
            "removed_ingests": self.removed_ingests,
            "removed_dirs": self.removed_dirs,
            "freed_bytes": self.freed_bytes,
            "total_bytes_before": self.total_bytes_before,
            "total_bytes_after": self.total_bytes_after,
            "max_size": self.max_size,
            "cap_met": self.cap_met,
            "cap_reason": self.cap_reason or None,
            "skipped": [{"kind": s.kind, "what": s.what, "reason": s.reason}
                        for s in self.skipped],
            "finished_intent": self.finished_intent,
            "plan_seconds": round(self.plan_seconds, 3),
            "apply_seconds": round(self.apply_seconds, 3),
        }


@dataclass
class Plan:
    evict: list[_Model]
    delete_blobs: dict[Digest, int]
    delete_ingests: list[tuple[Path, int]]
    skipped: list[Skipped]
    total_before: int
    total_after: int
    cap_met: bool
    cap_reason: str
    # the part of delete_blobs no manifest referenced when planned: these need not wait
    # for the evicted manifests to go
    orphans: frozenset[Digest] = frozenset()


class _Intent(msgspec.Struct):
    created: float
    manifests: list[tuple[str, str]]  # (path, sha256 of its bytes)
    blobs: list[str]


# --------------------------------------------------------------------------- snapshot
def _stat_blob_folder(folder: str) -> bytes:
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


def _blob_table(
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


def _snapshot(store: Store, now: float) -> _Snapshot:
    layout = store.layout
    states = store.state.all() if store.state is not None else {}
    real_blobs = os.path.realpath(layout.blobs)
    # The two big scans run on two cores: a forked child stats the blob folder while
    # this process reads the manifests (threads would serialize on the GIL).
    t0 = time.monotonic()
    blob_folder = str(layout.blobs)

    def stat_blobs(out: BinaryIO) -> None:
        out.write(_stat_blob_folder(blob_folder))

    child = _forked.start(stat_blobs)
    try:
        index = store.state.manifest_index() if store.state is not None else None
        models, files, rescued = _scan_manifests(layout, states, index)
    except BaseException:
        if child is not None:
            child.cancel()
        raise
    packed = child.result() if child is not None else None
    t1 = time.monotonic()
    blobs, partials = _blob_table(
        packed if packed is not None else _stat_blob_folder(blob_folder))
    t2 = time.monotonic()
    in_use = files_in_use(real_blobs)
    log.debug("gc snapshot: manifests %.3fs (blob folder %s), blob table %.3fs, "
              "files in use %.3fs", t1 - t0, "forked" if packed is not None else "in-process",
              t2 - t1, time.monotonic() - t2)
    for m in models:
        if m.state.last_used is None and m.model_digest is not None and m.model_digest in blobs:
            m.last_used = max(m.mtime, blobs[m.model_digest][3])
    ingests: list[tuple[Path, int, float]] = []
    with contextlib.suppress(FileNotFoundError):
        for e in os.scandir(layout.ingest):
            ingests.append(_ingest_entry(Path(e.path)))
    # Ollama's own unfinished downloads: blobs/sha256-<hex>-partial[-N]
    ingests.extend(_ingest_entry(layout.blobs / name) for name in partials)
    return _Snapshot(now, models, rescued, blobs, files, ingests, live_leases(layout),
                     in_use, real_blobs)


def _scan_manifests(
    layout: Layout, states: dict[str, ModelState], index: ManifestIndex | None
) -> tuple[list[_Model], dict[str, tuple[int, int, frozenset[Digest]]], set[Digest]]:
    """Every manifest: summaries from the index when the file is provably unchanged
    (``blobstore/index.py``), else read and decoded (and remembered)."""
    known = index.load() if index is not None else {}
    models: list[_Model] = []
    files: dict[str, tuple[int, int, frozenset[Digest]]] = {}
    rescued: set[Digest] = set()
    for parts, path in layout.iter_manifest_files():
        try:
            st = os.stat(path)
            name: ModelName | None = ModelName.from_parts(parts)
        except OSError:
            continue
        except InvalidName:
            name = None
        summary = ManifestIndex.trusted(known.get(path), FileKey.of(st)) if name else None
        if summary is None:
            try:
                raw, st = read_small(path)
            except OSError:
                continue
            try:
                if name is None:
                    raise InvalidManifest("not a valid model name")
                summary = Summary.of(Manifest.decode(raw))
            except InvalidManifest:
                # a manifest we cannot read or name: never evicted, and whatever digests
                # it mentions stay referenced (spec/gc.md, "Never delete")
                found = frozenset(scan_digests(raw))
                rescued |= found
                files[path] = (st.st_mtime_ns, st.st_size, found)
                continue
            if index is not None:
                index.remember(path, FileKey.of(st), summary)
        assert name is not None
        files[path] = (st.st_mtime_ns, st.st_size, summary.refs)
        state = states.get(name.key, _NEVER)
        # never used through blobctl: newest of manifest mtime and model blob atime
        # (the atime is filled in by _snapshot once blobs are scanned)
        last = state.last_used if state.last_used is not None else st.st_mtime
        models.append(_Model(name, path, summary.digest, summary.refs, st.st_mtime, state,
                             last, summary.model))
    if index is not None:
        index.flush()
    return models, files, rescued


def _current_refs(store: Store, snap: _Snapshot, skip: set[str]) -> set[Digest]:
    """Digests referenced by the manifests on disk *now* (call under the store lock).

    Manifests unchanged since the snapshot (same mtime and size) are not re-read; those
    in ``skip`` are left out while unchanged (the orphan sweep skips the evicted ones,
    which name no orphan, so it need not wait for them to go).
    """
    refs: set[Digest] = set()
    for _, path in store.layout.iter_manifest_files():
        try:
            st = os.stat(path)
        except OSError:
            continue
        known = snap.manifest_files.get(path)
        if known is not None and known[0] == st.st_mtime_ns and known[1] == st.st_size:
            if path not in skip:
                refs |= known[2]
            continue
        try:
            refs |= referenced_by(read_small(path)[0])
        except OSError:
            continue
    return refs


def _ingest_entry(path: Path) -> tuple[Path, int, float]:
    """(path, bytes on disk, newest mtime) of an ingest file or folder."""
    try:
        st = path.lstat()
    except OSError:
        return path, 0, 0.0
    if not path.is_dir():
        return path, st.st_blocks * 512, st.st_mtime
    size, newest = 0, st.st_mtime
    for dirpath, _, files in os.walk(path):
        for fn in files:
            with contextlib.suppress(OSError):
                s = os.lstat(os.path.join(dirpath, fn))
                size += s.st_blocks * 512
                newest = max(newest, s.st_mtime)
    return path, size, newest


# --------------------------------------------------------------------------- plan
def _plan(snap: _Snapshot, opts: GCOptions) -> Plan:
    now = snap.now
    skipped: list[Skipped] = []
    leased: set[Digest] = set()
    leased_ingests: set[str] = set()
    for lease in snap.leases:
        leased |= lease.digests
        leased_ingests |= lease.ingests

    # who holds each blob open or mapped (usually nobody: keep the per-blob test cheap)
    held: dict[Digest, list[str]] = {}
    for held_path, who in snap.in_use.holders.items():
        folder, _, fname = held_path.rpartition("/")
        try:
            d = Digest.from_filename(fname)
        except InvalidDigest:
            continue
        entry = snap.blobs.get(d)
        if folder == snap.real_blobs and entry is not None and entry[0] == fname:
            held[d] = who

    refcount: dict[Digest, int] = dict.fromkeys(snap.rescued, 1)
    for m in snap.models:
        for d in m.digests:
            refcount[d] = refcount.get(d, 0) + 1
    total = sum(entry[1] for entry in snap.blobs.values())
    delete: dict[Digest, int] = {}
    young_before = now - opts.grace  # a blob modified after this is in its grace period

    def deletable(d: Digest) -> str | None:
        """None if blob d may go now, else the reason it stays."""
        if d in leased:
            return "held by a running pull"
        if d in held:
            return f"in use by {', '.join(held[d])}"
        if snap.blobs[d][2] > young_before:
            return "younger than the grace period"
        return None

    # 1. unreferenced blobs
    for d, (_, size, _, _) in snap.blobs.items():
        if refcount.get(d):
            continue
        why = deletable(d)
        if why is None:
            delete[d] = size
        else:
            skipped.append(Skipped("blob", str(d), why))
    orphans = frozenset(delete)
    remaining = total - sum(delete.values())

    # 2. model eviction candidates
    def blocked(m: _Model) -> str | None:
        if m.state.pinned:
            return "pinned"
        if leased and not leased.isdisjoint(m.digests):
            return "a blob is held by a running pull"
        if held:
            for d in m.digests:
                if d in held:
                    return f"in use by {', '.join(held[d])}"
        if now - m.mtime < opts.grace:
            return "younger than the grace period"
        return None

    evict: list[_Model] = []
    candidates: list[_Model] = []  # LRU order, oldest first
    unevictable: list[_Model] = []
    blocked_why: list[tuple[_Model, str]] = []
    for m in sorted(snap.models, key=lambda m: (m.last_used, m.name.key)):
        why = blocked(m)
        wanted = (opts.max_size is not None) or (
            opts.older_than is not None and now - m.last_used > opts.older_than)
        if why is None:
            candidates.append(m)
            continue
        unevictable.append(m)
        if wanted:
            skipped.append(Skipped("model", str(m.name), why))
            blocked_why.append((m, why.split(" by ")[0]))

    def do_evict(m: _Model) -> int:
        freed = 0
        for d in m.digests:
            refcount[d] -= 1
            if (refcount[d] == 0 and d in snap.blobs and d not in delete
                    and deletable(d) is None):
                delete[d] = snap.blobs[d][1]
                freed += snap.blobs[d][1]
        evict.append(m)
        return freed

    alive = [True] * len(candidates)
    if opts.older_than is not None:
        for i, m in enumerate(candidates):
            if now - m.last_used > opts.older_than:
                remaining -= do_evict(m)
                alive[i] = False

    cap_met, cap_reason = True, ""
    if opts.max_size is not None:
        cap = opts.max_size

        def would_free(m: _Model) -> int:
            return sum(snap.blobs[d][1] for d in m.digests
                       if refcount.get(d) == 1 and d in snap.blobs and d not in delete
                       and deletable(d) is None)

        # Blobs that stay whatever we do: named by a model that cannot be evicted.
        kept_anyway = set(snap.rescued)
        for m in unevictable:
            kept_anyway |= m.digests
        first = 0

        def pick(pred: Callable[[_Model], bool]) -> int | None:
            nonlocal first
            while first < len(candidates) and not alive[first]:
                first += 1
            for i in range(first, len(candidates)):
                if alive[i] and pred(candidates[i]):
                    return i
            return None

        def could_free(m: _Model) -> bool:
            return any(d not in kept_anyway and d not in delete and d in snap.blobs
                       and deletable(d) is None for d in m.digests)

        # The oldest model whose eviction frees bytes *now*. A model whose blobs are all
        # shared is passed over (evicting it alone frees nothing) while any model frees
        # bytes; when none does, the oldest model that shares blobs only with other
        # evictable models goes, so that a group of models sharing a blob can be evicted.
        # Models sharing only with unevictable ones are never evicted for nothing.
        while remaining > cap:
            victim = pick(lambda m: would_free(m) > 0)
            if victim is None:
                victim = pick(could_free)
            if victim is None:
                break
            alive[victim] = False
            remaining -= do_evict(candidates[victim])
        if remaining > cap:
            cap_met = False
            # what stays because of each reason, counted after the evictions (a blob
            # shared with an evicted model is now the kept model's alone), once per blob
            blocked_reasons: dict[str, int] = {}
            counted: set[Digest] = set()
            for m, why in blocked_why:
                kept = [d for d in m.digests
                        if d in snap.blobs and d not in delete and d not in counted]
                counted.update(kept)
                blocked_reasons[why] = (blocked_reasons.get(why, 0)
                                        + sum(snap.blobs[d][1] for d in kept))
            parts = [f"{human_bytes(n)} {k}" for k, n in sorted(blocked_reasons.items()) if n]
            shared = sum(snap.blobs[d][1] for d, c in refcount.items()
                         if c > 0 and d in snap.blobs)
            cap_reason = ("; ".join(parts) if parts else
                          f"{human_bytes(shared)} needed by models that cannot be evicted")
    ingest_delete: list[tuple[Path, int]] = []
    for path, size, mtime in snap.ingests:
        if path.name in leased_ingests or str(path) in leased_ingests:
            skipped.append(Skipped("ingest", str(path), "held by a running pull"))
        elif now - mtime < opts.ingest_grace:
            skipped.append(Skipped("ingest", str(path), "younger than the ingest grace period"))
        elif f"{snap.real_blobs}/{path.name}" in snap.in_use:
            skipped.append(Skipped("ingest", str(path), "open by a running process"))
        else:
            ingest_delete.append((path, size))
    return Plan(evict, delete, ingest_delete, skipped, total, remaining, cap_met, cap_reason,
                orphans)


def plan(store: Store, opts: GCOptions, *, now: float | None = None) -> Plan:
    """Compute what ``gc`` would do, without changing anything."""
    return _plan(_snapshot(store, time.time() if now is None else now), opts)


# --------------------------------------------------------------------------- apply
def _finish_intent(store: Store, report: GCReport) -> None:
    """Complete a GC that was killed mid-apply (its intent record is still there)."""
    path = store.layout.gc_intent
    try:
        intent = msgspec.json.decode(path.read_bytes(), type=_Intent)
    except FileNotFoundError:
        return
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        path.unlink(missing_ok=True)
        return
    for mpath, digest in intent.manifests:
        p = Path(mpath)
        with contextlib.suppress(OSError, InvalidManifest):
            if str(Manifest.decode(p.read_bytes()).digest) == digest:
                p.unlink()
                report.removed_models.append(str(p.relative_to(store.layout.manifests)))
    refs = store.referenced_digests()
    leased: set[Digest] = set()
    for lease in live_leases(store.layout):
        leased |= lease.digests
    for text in intent.blobs:
        with contextlib.suppress(ValueError):
            d = Digest.parse(text)
            if d not in refs and d not in leased:
                for p in (store.layout.blob(d), store.layout.legacy_blob(d)):
                    with contextlib.suppress(FileNotFoundError):
                        size = p.stat().st_size
                        p.unlink()
                        report.removed_blobs.append(str(d))
                        report.freed_bytes += size
                        report.freed_blob_bytes += size
    fsync_dir(store.layout.blobs)
    path.unlink(missing_ok=True)
    report.finished_intent = True


def _apply(store: Store, p: Plan, snap: _Snapshot, report: GCReport,
           hook: Callable[[str], None] | None) -> None:
    """Carry out a plan under the store lock (the caller holds it).

    Two lines of work run side by side (the second in a forked child when possible, since
    Python threads would serialize on the GIL):

    - the evicted manifests are re-checked and removed, their emptied folders removed
      and the changed folders fsynced, so that the removals are durable before any of
      *their* blobs go; then the manifests on disk are re-scanned and the blobs the
      evictions freed go if still unreferenced, unleased and unused;
    - the orphans (blobs no manifest named when planned) go after the same re-checks,
      against a re-scan that leaves out the evicted manifests while they are unchanged:
      no manifest, remaining or evicted, needs an orphan.

    Once done with its own line, this process takes orphans from the other end of the
    list until the two meet (outcomes are shared through an anonymous shared mapping).
    """
    layout = store.layout
    tw = time.monotonic()
    intent = _Intent(
        created=time.time(),
        manifests=[(m.path, str(m.raw_digest)) for m in p.evict],
        blobs=sorted(str(d) for d in p.delete_blobs),
    )
    if p.evict or p.delete_blobs:
        write_atomic(layout.gc_intent, msgspec.json.encode(intent), layout.ingest)
    if hook:
        hook("intent-written")
    t0 = time.monotonic()
    states = store.state.all() if store.state is not None else {}
    orphans = [d for d in p.delete_blobs if d in p.orphans]
    freed = [d for d in p.delete_blobs if d not in p.orphans]
    evict_paths = {m.path for m in p.evict}
    # one outcome code per orphan, written by whichever process handles it
    orphan_codes = mmap.mmap(-1, max(1, len(orphans)))

    def sweep_orphans(out: BinaryIO) -> None:
        _sweep(_Recheck.now(store, snap, evict_paths), orphans, orphan_codes,
               range(len(orphans)), meet=True)

    child = _forked.start(sweep_orphans) if orphans else None
    try:
        evicted, parents = _remove_manifests(p.evict, snap, states, report, hook)
        t1 = time.monotonic()
        # Make the removals durable before any of their blobs goes: drop the folders they
        # emptied and fsync the folders that changed (far fewer than one per manifest).
        report.removed_dirs, touched = _remove_empty_dirs(layout.manifests, parents)
        for folder in touched:
            fsync_dir(Path(folder))
        t2 = time.monotonic()
        freed_codes = bytearray(len(freed))
        mine = 0
        t3 = t2
        if freed or orphans:  # (no blob to delete: no re-scan)
            # a manifest planned for eviction but kept is still on disk: the re-scan
            # counts it
            recheck = _Recheck.now(store, snap, set())
            _sweep(recheck, freed, freed_codes, range(len(freed)), _BLOB_WORKERS, hook)
            t3 = time.monotonic()
            mine = _sweep(recheck, orphans, orphan_codes, range(len(orphans) - 1, -1, -1),
                          1, hook, meet=child is not None)
        t4 = time.monotonic()
    except BaseException:
        if child is not None:
            child.result()  # its unlinks are safe: let it finish rather than guess
        raise
    forked = child is not None and child.result() is not None
    if hook:  # the child's removals
        for _ in range(orphan_codes[:len(orphans)].count(_REMOVED) - mine):
            hook("blob-removed")
    gone: list[Digest] = []
    for digests, codes in ((orphans, orphan_codes), (freed, freed_codes)):
        for d, code in zip(digests, codes[:len(digests)], strict=True):
            if code == _REMOVED:
                gone.append(d)
            elif code in _REASONS:
                report.skipped.append(Skipped("blob", str(d), _REASONS[code]))
    orphan_codes.close()
    report.removed_blobs.extend(sorted(gone))
    applied = sum(p.delete_blobs[d] for d in gone)
    report.freed_blob_bytes += applied
    report.freed_bytes += applied
    if gone:
        fsync_dir(layout.blobs)
    log.debug("gc apply: intent %.3fs; manifests %.3fs, folders %.3fs (%d fsyncs), %d freed "
              "blobs %.3fs, while %d orphans went (%s; %d by this process, %.3fs), then "
              "waited %.3fs", t0 - tw, t1 - t0, t2 - t1, len(touched), len(freed), t3 - t2,
              len(orphans), "forked" if forked else "in-process", mine, t4 - t3,
              time.monotonic() - t4)
    layout.gc_intent.unlink(missing_ok=True)
    # stale ingests (re-check leases: a pull may have resumed one meanwhile); the lease
    # files of dead processes go too
    leased_ingests: set[str] = set()
    for lease in live_leases(layout, remove_stale=True):
        leased_ingests |= lease.ingests
    for path, size in p.delete_ingests:
        if path.name in leased_ingests or str(path) in leased_ingests:
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        report.removed_ingests.append(str(path))
        report.freed_bytes += size
    if store.state is not None and evicted:
        try:
            store.state.forget_many(evicted)
        except StoreUnwritable as exc:  # state is advisory: the eviction stands
            log.warning("could not update state after gc: %s", exc.message)


# Outcome codes of a blob sweep (one byte per candidate). 0: not removed by us (gone
# already, or not reached); _REMOVED: unlinked; the rest: why it stays.
_REMOVED = 1
_REASONS = {2: "referenced again", 3: "held by a running pull", 4: "in use"}


@dataclass
class _Recheck:
    """What a blob must be checked against right before it is unlinked."""

    refs: set[Digest]
    leased: set[Digest]
    in_use: InUse
    real_blobs: str
    folder: str
    snap: _Snapshot

    @classmethod
    def now(cls, store: Store, snap: _Snapshot, skip: set[str]) -> _Recheck:
        """Re-scan the manifests on disk (``skip``: see ``_current_refs``), then read
        leases and users. Manifest commits wait for the store lock the caller holds, so
        a pull that lets go of its lease after this has not written its manifest yet: it
        finds the blob gone and fetches it again."""
        refs = _current_refs(store, snap, skip)
        leased: set[Digest] = set()
        for lease in live_leases(store.layout):
            leased |= lease.digests
        real_blobs = os.path.realpath(store.layout.blobs)
        return cls(refs, leased, files_in_use(real_blobs), real_blobs,
                   str(store.layout.blobs), snap)

    def paths(self, d: Digest) -> list[str]:
        entry = self.snap.blobs.get(d)
        fname = entry[0] if entry is not None else d.filename
        paths = [f"{self.folder}/{fname}"]
        if ":" in fname:  # legacy "sha256:" name: a canonical copy may exist too
            paths.append(f"{self.folder}/{d.filename}")
        return paths

    def reason(self, d: Digest, paths: list[str]) -> int:
        """0 if ``d`` may go, else a code in ``_REASONS``."""
        if d in self.refs:
            return 2
        if d in self.leased:
            return 3
        if self.in_use.holders and any(
                f"{self.real_blobs}/{os.path.basename(x)}" in self.in_use for x in paths):
            return 4
        return 0


def _sweep(check: _Recheck, candidates: list[Digest], codes: bytearray | mmap.mmap,
           order: range, workers: int = 1, hook: Callable[[str], None] | None = None,
           *, meet: bool = False) -> int:
    """Re-check and unlink ``candidates`` in ``order``, writing each one's outcome code.

    With ``meet``, another process sweeps the same list from the other end: stop at the
    first candidate it has already handled. Returns how many blobs this call removed.
    """
    todo: list[tuple[int, list[str]]] = []
    if meet:  # one at a time, watching for the other sweeper
        removed = 0
        for i in order:
            if codes[i]:
                break
            paths = check.paths(candidates[i])
            why = check.reason(candidates[i], paths)
            if why:
                codes[i] = why
                continue
            if _unlink_any(paths):
                codes[i] = _REMOVED
                removed += 1
                if hook:
                    hook("blob-removed")
        return removed
    for i in order:
        paths = check.paths(candidates[i])
        why = check.reason(candidates[i], paths)
        if why:
            codes[i] = why
        else:
            todo.append((i, paths))

    def unlink_all(part: list[tuple[int, list[str]]]) -> list[int]:
        done: list[int] = []
        for i, paths in part:
            if _unlink_any(paths):
                done.append(i)
                if hook:
                    hook("blob-removed")
        return done

    done = _in_parallel(unlink_all, todo, workers)
    for i in done:
        codes[i] = _REMOVED
    return len(done)


def _unlink_any(paths: list[str]) -> bool:
    removed = False
    for path in paths:
        try:
            os.unlink(path)
            removed = True
        except FileNotFoundError:
            continue
    return removed


def _remove_manifests(
    evict: list[_Model], snap: _Snapshot, states: dict[str, ModelState], report: GCReport,
    hook: Callable[[str], None] | None,
) -> tuple[list[ModelName], set[str]]:
    """Remove the planned manifests that are unchanged and unused since the plan.

    Returns the names removed and the folders that held them.
    """

    def remove(batch: list[tuple[int, _Model]]) -> list[tuple[int, bool]]:
        out: list[tuple[int, bool]] = []  # (index in plan, removed?); gone already: absent
        for i, m in batch:
            try:
                fst = os.stat(m.path)
            except OSError:
                continue
            known = snap.manifest_files.get(m.path)
            unchanged = known is not None and (fst.st_mtime_ns, fst.st_size) == known[:2]
            if not unchanged:  # touched since the snapshot: compare the bytes themselves
                try:
                    unchanged = Digest.of_bytes(read_small(m.path)[0]) == m.raw_digest
                except OSError:
                    out.append((i, False))
                    continue
            st = states.get(m.name.key)
            if not unchanged or (
                    st is not None and st.last_used is not None and st.last_used > m.last_used):
                out.append((i, False))
                continue
            try:
                os.unlink(m.path)
            except FileNotFoundError:
                continue
            out.append((i, True))
            if hook:
                hook("manifest-removed")
        return out

    # Unlinks that free data blocks mostly wait (on the journal, not the CPU), so many
    # threads overlap them; see _IO_WORKERS.
    outcome = sorted(_in_parallel(remove, list(enumerate(evict)), _IO_WORKERS))
    evicted: list[ModelName] = []
    parents: set[str] = set()
    for i, removed in outcome:
        m = evict[i]
        if not removed:
            report.skipped.append(Skipped("model", str(m.name), "changed or used during gc"))
            continue
        parents.add(os.path.dirname(m.path))
        evicted.append(m.name)
        report.removed_models.append(str(m.name))
    return evicted, parents


# Threads for unlink/rmdir work. On ext4 an unlink or rmdir that frees data blocks spends
# most of its time waiting (journal, block allocator) rather than on the CPU, so even on
# 2 cores 16 threads overlap those waits (10 000 one-block files: 0.71 s with 1 thread,
# 0.21 s with 16). Unlinks in one folder serialize on its lock, which the callers allow
# for (blobs: a few threads; folders: grouped by parent).
_IO_WORKERS = 16
_BLOB_WORKERS = 4


def _in_parallel(fn: Callable[[list[T]], list[R]], items: list[T], workers: int = 2,
                 min_items: int = 64) -> list[R]:
    """Run ``fn`` over ``workers`` interleaved slices of ``items`` (syscall-bound work)."""
    workers = min(workers, len(items))
    if len(items) < min_items or workers < 2:
        return fn(items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = pool.map(fn, [items[i::workers] for i in range(workers)])
        return [x for part in parts for x in part]


def _remove_empty_dirs(root: Path, start: set[str] | None = None) -> tuple[int, set[str]]:
    """Remove empty folders under ``root``, walking up from ``start`` (default: all).

    Returns how many were removed and the folders whose entries changed (to fsync).
    """
    top = str(root)
    if start is None:
        start = {d for d, _, _ in os.walk(root)}
    level = {d for d in start if d.startswith(top + os.sep)}
    removed = 0
    touched: set[str] = set()
    def rmdir_all(groups: list[list[str]]) -> list[tuple[str, bool]]:
        out = []
        for group in groups:
            for d in group:
                try:
                    os.rmdir(d)
                    out.append((d, True))
                except OSError:
                    out.append((d, False))
        return out

    while level:
        parents: set[str] = set()
        # rmdirs in one parent serialize on its lock: give each thread whole parents
        by_parent: dict[str, list[str]] = {}
        for d in sorted(level):
            by_parent.setdefault(os.path.dirname(d), []).append(d)
        groups = list(by_parent.values())
        for d, ok in _in_parallel(rmdir_all, groups, _IO_WORKERS, min_items=2):
            if not ok:
                touched.add(d)  # still has entries: its own removals need an fsync
                continue
            removed += 1
            parent = os.path.dirname(d)
            if parent != top and parent.startswith(top + os.sep):
                parents.add(parent)
            else:
                touched.add(top)
        # go one level up, but only where every child of this level was handled
        level = {p for p in parents if p not in touched}
        touched |= {p for p in parents if p in touched}
    return removed, touched


def gc(store: Store, opts: GCOptions, *, now: float | None = None,
       hook: Callable[[str], None] | None = None) -> GCReport:
    """Collect garbage and, with ``max_size``/``older_than``, evict LRU models.

    Raises CapNotMet (after doing everything allowed) when the cap cannot be reached,
    StoreBusy when the store lock is not obtained within ``opts.lock_timeout``.
    ``hook`` is called at each durable step (tests use it to kill GC mid-way).
    """
    with collector_paused():
        return _gc(store, opts, now=now, hook=hook)


def _gc(store: Store, opts: GCOptions, *, now: float | None,
        hook: Callable[[str], None] | None) -> GCReport:
    report = GCReport(dry_run=opts.dry_run, max_size=opts.max_size)
    t0 = time.monotonic()
    snap = _snapshot(store, time.time() if now is None else now)
    ts = time.monotonic()
    p = _plan(snap, opts)
    log.debug("gc snapshot %.3fs, plan %.3fs", ts - t0, time.monotonic() - ts)
    report.plan_seconds = time.monotonic() - t0
    report.total_bytes_before = p.total_before
    report.skipped = list(p.skipped)
    report.cap_met, report.cap_reason = p.cap_met, p.cap_reason
    if opts.dry_run:
        report.removed_models = [str(m.name) for m in p.evict]
        report.removed_blobs = sorted(str(d) for d in p.delete_blobs)
        report.removed_ingests = [str(path) for path, _ in p.delete_ingests]
        report.freed_bytes = sum(p.delete_blobs.values()) + sum(s for _, s in p.delete_ingests)
        report.total_bytes_after = p.total_after
    else:
        t1 = time.monotonic()
        with store.lock(opts.lock_timeout):
            _finish_intent(store, report)
            _apply(store, p, snap, report, hook)
        report.apply_seconds = time.monotonic() - t1
        report.total_bytes_after = max(0, p.total_before - report.freed_blob_bytes)
        if opts.max_size is not None:
            report.cap_met = report.total_bytes_after <= opts.max_size
    if not report.cap_met and opts.max_size is not None:
        raise _cap_error(report, opts.max_size)
    return report


class GCCapNotMet(CapNotMet):
    """CapNotMet that carries the GC report (for ``--json``)."""

    def __init__(self, cap: int, total: int, reason: str, report: GCReport) -> None:
        super().__init__(cap, total, reason)
        self.report = report


def _cap_error(report: GCReport, cap: int) -> GCCapNotMet:
    reason = report.cap_reason or "models that cannot be evicted"
    return GCCapNotMet(cap, report.total_bytes_after, reason, report)


def auto_gc(store: Store) -> GCReport | None:
    """Apply the store's ``max-size`` setting, if any (called after each pull)."""
    from blobstore.units import parse_size

    value = store.get_config("max-size")
    if not value:
        return None
    return gc(store, GCOptions(max_size=parse_size(value)))
