"""GC phase 2: apply a plan under the store lock (spec/gc.md, "Concurrency and crash
safety").

Manifests go first (re-checked: unchanged and unused since the plan), their emptied
folders are removed and the changed folders fsynced; then each blob the evictions freed
is re-checked against a fresh re-scan of the manifests, the live leases and the files
running processes hold, and unlinked. Orphans go side by side (in a forked child when
the caller allows forking), then stale ingests (leases and users re-checked).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from blobstore import _forked, ingest
from blobstore.digest import Digest
from blobstore.errors import StoreUnwritable
from blobstore.gc.intent import write_intent
from blobstore.gc.plan import OLLAMA_PULL, Plan, ingest_kept, ollama_download
from blobstore.gc.report import GCOptions, GCReport, Skipped
from blobstore.gc.snapshot import Model, Snapshot, current_refs, target_folders
from blobstore.inuse import InUse, files_in_use
from blobstore.layout import fsync_dir, read_small
from blobstore.lease import LeaseInfo, live_leases
from blobstore.name import ModelName
from blobstore.state import ModelState
from blobstore.store import Store

__all__ = ["apply_plan", "dirs_emptied"]

log = logging.getLogger("blobctl.gc")

T = TypeVar("T")
R = TypeVar("R")


def apply_plan(store: Store, p: Plan, snap: Snapshot, report: GCReport, opts: GCOptions,
               hook: Callable[[str], None] | None) -> None:
    """Carry out a plan under the store lock (the caller holds it).

    Two lines of work run side by side (the second in a forked child when
    ``opts.fork`` allows and forking is safe, since Python threads would serialize on
    the GIL):

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
    write_intent(layout, p)
    if hook:
        hook("intent-written")
    t0 = time.monotonic()
    states = store.model_states()
    orphans = [d for d in p.delete_blobs if d in p.orphans]
    freed = [d for d in p.delete_blobs if d not in p.orphans]
    evict_paths = {m.path for m in p.evict}
    # one outcome code per orphan, written by whichever process handles it
    orphan_codes = mmap.mmap(-1, max(1, len(orphans)))

    def sweep_orphans(out: BinaryIO) -> None:
        _sweep(_Recheck.now(store, snap, evict_paths, opts, p.orphans), orphans,
               orphan_codes, range(len(orphans)), meet=True)

    child = _forked.start(sweep_orphans) if orphans and opts.fork else None
    try:
        evicted, parents = _remove_manifests(p.evict, snap, states, report, hook)
        t1 = time.monotonic()
        # Make the removals durable before any of their blobs goes: drop the folders they
        # emptied and fsync the folders that changed (far fewer than one per manifest).
        report.removed_dirs, touched = _remove_empty_dirs(layout.manifests, parents)
        more, touched_v2 = _remove_empty_dirs(layout.manifests_v2, parents)
        report.removed_dirs += more
        touched |= touched_v2
        for folder in touched:
            fsync_dir(Path(folder))
        t2 = time.monotonic()
        freed_codes = bytearray(len(freed))
        mine = 0
        t3 = t2
        ollama_now: str | None = None
        if freed or orphans:  # (no blob to delete: no re-scan)
            # a manifest planned for eviction but kept is still on disk: the re-scan
            # counts it
            recheck = _Recheck.now(store, snap, set(), opts, p.orphans)
            ollama_now = recheck.ollama
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
            elif code == _OLLAMA:  # a download Ollama started since the plan
                seen = ollama_now or "started while gc ran"
                report.skipped.append(Skipped("blob", str(d), f"{OLLAMA_PULL} ({seen})"))
                report.ollama_download = report.ollama_download or seen
                report.ollama_kept_blobs += 1
                report.ollama_kept_bytes += snap.blobs[d].size if d in snap.blobs else 0
            elif code in _REASONS:
                report.skipped.append(Skipped("blob", str(d), _REASONS[code]))
    orphan_codes.close()
    report.removed_blobs.extend(sorted(gone))
    # what went back to the file system (a symlink's target and an inode with a name
    # outside blobs/ stay: spec/gc.md, "Bytes")
    applied = sum(snap.blobs[d].freed for d in gone if d in snap.blobs)
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
    _remove_ingests(store, p, snap, report, opts)
    if store.state is not None and evicted:
        try:
            store.forget_removed(evicted)
        except StoreUnwritable as exc:  # state is advisory: the eviction stands
            log.warning("could not update state after gc: %s", exc.message)


def _remove_ingests(store: Store, p: Plan, snap: Snapshot, report: GCReport,
                    opts: GCOptions) -> None:
    """Stale ingests go, after asking the ingest module again (a pull may have resumed
    one meanwhile: its lease or its owner says so) and re-checking users (spec/gc.md:
    open by no process); the lease files of dead processes go too."""
    layout = store.layout
    leases = live_leases(layout, remove_stale=True, ttl=opts.lease_ttl)
    if not p.delete_ingests:
        return
    now = Snapshot(snap.now, [], set(), {}, {}, [], [],
                   files_in_use(snap.real_blobs, snap.real_ingest),
                   snap.real_blobs, snap.real_ingest)
    siblings: dict[str, list[str]] | None = None  # Ollama's downloads, read when needed
    for path, _ in p.delete_ingests:
        entry = (ingest.probe(path, leases, ttl=opts.lease_ttl)
                 if path.parent in ingest.areas(layout)
                 else ingest.legacy_entry(path, leases))
        why = ingest_kept(entry, snap.now, opts.ingest_grace, now.ingest_open)
        data = ollama_download(path)
        if why is None and data is not None:  # an Ollama download goes as a whole
            if siblings is None:
                siblings = _ollama_partials(layout.blobs)
            for other in siblings.get(data.name, ()):
                if other == path.name:
                    continue
                kept = ingest_kept(ingest.legacy_entry(layout.blobs / other, leases),
                                   snap.now, opts.ingest_grace, now.ingest_open)
                if kept is not None:
                    why = f"part of a running download ({data.name}: {kept})"
                    break
        if why is not None:  # its writer came back meanwhile, or someone opened it
            report.skipped.append(Skipped("ingest", str(path), why))
            continue
        if path.is_dir() and not path.is_symlink():
            kept = ingest.remove(layout, path, ttl=opts.lease_ttl)  # tombstone first
            if kept is not None:
                report.skipped.append(Skipped("ingest", str(path), kept))
                continue
        else:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                report.skipped.append(Skipped("ingest", str(path),
                                              f"cannot remove it: {exc.strerror or exc}"))
                continue
        report.removed_ingests.append(str(path))
        report.freed_bytes += entry.bytes  # as measured now: a file linked elsewhere frees 0


def live_ollama_now(store: Store, snap: Snapshot, opts: GCOptions,
                    leases: list[LeaseInfo] | None = None, in_use: InUse | None = None,
                    real_blobs: str | None = None) -> str | None:
    """The Ollama download live in ``blobs/`` now, as ``<file>: <why>``, else None: the
    rule of the plan (gc/plan.py, ``live_ollama_download``) on a fresh look, for what
    runs under the store lock after planning."""
    names_by_data = _ollama_partials(store.layout.blobs)
    if not names_by_data:
        return None
    if real_blobs is None:
        real_blobs = os.path.realpath(store.layout.blobs)
    if leases is None:
        leases = live_leases(store.layout, ttl=opts.lease_ttl)
    if in_use is None:
        in_use = files_in_use(real_blobs)
    seen = in_use
    for names in names_by_data.values():
        for name in names:
            why = ingest_kept(ingest.legacy_entry(store.layout.blobs / name, leases),
                              snap.now, opts.ingest_grace,
                              lambda p: f"{real_blobs}/{p.name}" in seen)
            if why is not None:
                return f"{name}: {why}"
    return None


def _ollama_partials(blobs: Path) -> dict[str, list[str]]:
    """Ollama's download files in ``blobs`` now, by the name of their data file."""
    out: dict[str, list[str]] = {}
    with contextlib.suppress(OSError), os.scandir(blobs) as entries:
        for e in entries:
            data = ollama_download(blobs / e.name)
            if data is not None:
                out.setdefault(data.name, []).append(e.name)
    return out


# Outcome codes of a blob sweep (one byte per candidate). 0: not removed by us (gone
# already, or not reached); _REMOVED: unlinked; the rest: why it stays.
_REMOVED = 1
_REASONS = {2: "referenced again", 3: "held by the lease of a running command",
            4: "in use"}
_OLLAMA = 5  # an orphan, kept: an Ollama download is live in blobs/ now


@dataclass
class _Recheck:
    """What a blob must be checked against right before it is unlinked."""

    refs: set[Digest]
    leased: set[Digest]
    in_use: InUse
    real_blobs: str
    folder: str
    snap: Snapshot
    orphans: frozenset[Digest] = frozenset()
    ollama: str | None = None  # a live Ollama download in blobs/: no orphan goes

    @classmethod
    def now(cls, store: Store, snap: Snapshot, skip: set[str], opts: GCOptions,
            orphans: frozenset[Digest]) -> _Recheck:
        """Re-scan the manifests on disk (``skip``: see ``_current_refs``), then read
        leases, users and Ollama's downloads. Manifest commits wait for the store lock
        the caller holds, so a pull that lets go of its lease after this has not written
        its manifest yet: it finds the blob gone and fetches it again. An Ollama pull
        takes no lock: one that starts after this may find an orphan gone, as it would
        had GC run a moment earlier (spec/gc.md)."""
        refs = current_refs(store, snap, skip)
        leased: set[Digest] = set()
        leases = live_leases(store.layout, ttl=opts.lease_ttl)
        for lease in leases:
            leased |= lease.digests
        real_blobs = os.path.realpath(store.layout.blobs)
        in_use = files_in_use(real_blobs, *target_folders(snap.linked))
        ollama = (live_ollama_now(store, snap, opts, leases, in_use, real_blobs)
                  if orphans else None)
        return cls(refs, leased, in_use, real_blobs, str(store.layout.blobs), snap,
                   orphans, ollama)

    def paths(self, d: Digest) -> list[str]:
        """Both of its names, whichever the plan saw (found from outside: only the
        name scanned last was checked for users and unlinked)."""
        return [f"{self.folder}/{d.filename}", f"{self.folder}/{d.legacy_filename}"]

    def reason(self, d: Digest, paths: list[str]) -> int:
        """0 if ``d`` may go, else a code in ``_REASONS``."""
        if d in self.refs:
            return 2
        if d in self.leased:
            return 3
        if self.ollama is not None and d in self.orphans:
            return _OLLAMA
        if self.in_use.holders and (
                any(f"{self.real_blobs}/{os.path.basename(x)}" in self.in_use for x in paths)
                or any(t in self.in_use for t in self.snap.linked.get(d, ()))):
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
    evict: list[Model], snap: Snapshot, states: dict[str, ModelState], report: GCReport,
    hook: Callable[[str], None] | None,
) -> tuple[list[ModelName], set[str]]:
    """Remove the planned manifests that are unchanged and unused since the plan.

    Returns the names removed and the folders that held them.
    """

    def remove(batch: list[tuple[int, Model]]) -> list[tuple[int, bool]]:
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
            if not unchanged or (st is not None and (
                    st.pinned
                    or (st.last_used is not None and st.last_used > m.last_used))):
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
    seen: set[ModelName] = set()
    parents: set[str] = set()
    for i, removed in outcome:
        m = evict[i]
        if not removed:
            report.skipped.append(Skipped("model", str(m.name), "changed or used during gc"))
            continue
        parents.add(os.path.dirname(m.path))
        if m.name in seen:  # (a hidden manifests/ file of a manifests-v2/ model)
            continue
        seen.add(m.name)
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



def dirs_emptied(root: Path, removed: set[str]) -> int:
    """How many folders under ``root`` removing the files ``removed`` would leave empty
    (and so ``_remove_empty_dirs`` would remove): the dry run's ``removed_dirs``. Reads
    the folders only; changes nothing."""
    top = str(root)
    gone = set(removed)
    pending = {os.path.dirname(p) for p in removed}
    count = 0
    while pending:
        d = max(pending, key=lambda x: (x.count(os.sep), x))  # children before parents
        pending.discard(d)
        if not d.startswith(top + os.sep):
            continue
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        if all(os.path.join(d, e) in gone for e in entries):
            gone.add(d)
            count += 1
            pending.add(os.path.dirname(d))
    return count
