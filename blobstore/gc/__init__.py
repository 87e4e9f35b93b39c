"""Garbage collection and LRU eviction under a size cap (spec/gc.md).

``gc()`` runs in two steps, one module per phase:

1. **Plan** (no lock): ``snapshot`` reads the store (manifests, blob files, ingest
   entries, leases, state, files open or mapped by running processes, this one
   included); ``plan`` computes, as a pure function of that snapshot, which models to
   evict, which blobs and stale ingests to delete, and what to skip and why.
2. **Apply** (under the store lock): ``intent`` records the work (and finishes a killed
   GC's), ``apply`` re-checks every candidate against the store *as it is now* (new
   manifests, new leases, new users) and deletes: manifests first, then blobs no
   remaining manifest references, then stale ingests and empty folders; finally the
   intent record is dropped. ``report`` holds the options and the outcome.

The library never forks unless asked (``GCOptions(fork=True)``, which the CLI sets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from blobstore._forked import can_fork as fork_is_safe
from blobstore._gcpause import collector_paused
from blobstore.gc.apply import apply_plan, dirs_emptied, live_ollama_now
from blobstore.gc.intent import finish_intent
from blobstore.gc.plan import Ledger, Plan, make_plan
from blobstore.gc.report import (
    DEFAULT_GRACE,
    DEFAULT_INGEST_GRACE,
    GCCapNotMet,
    GCOptions,
    GCReport,
    Skipped,
    cap_error,
)
from blobstore.gc.snapshot import blob_table, stat_blob_folder, take_snapshot
from blobstore.store import Store

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_INGEST_GRACE",
    "GCCapNotMet",
    "GCOptions",
    "GCReport",
    "Ledger",
    "Plan",
    "Skipped",
    "auto_gc",
    "fork_is_safe",
    "gc",
    "plan",
]

log = logging.getLogger("blobctl.gc")

# older private names, kept for callers (tests, benches) that used them
_blob_table = blob_table
_stat_blob_folder = stat_blob_folder


def gc(store: Store, opts: GCOptions, *, now: float | None = None,
       hook: Callable[[str], None] | None = None) -> GCReport:
    """Collect garbage and, with ``max_size``/``older_than``, evict LRU models.

    Raises CapNotMet (after doing everything allowed) when the cap cannot be reached,
    StoreBusy when the store lock is not obtained within ``opts.lock_timeout``,
    StateUnreadable when pins cannot be read (nothing is deleted then).
    ``hook`` is called at each durable step (tests use it to kill GC mid-way).
    Thread-safe; callable inside ``with store.lock():`` (the lock is reentrant).
    """
    with collector_paused():
        return _gc(store, opts, now=now, hook=hook)


def _gc(store: Store, opts: GCOptions, *, now: float | None,
        hook: Callable[[str], None] | None) -> GCReport:
    report = GCReport(dry_run=opts.dry_run, max_size=opts.max_size)
    t0 = time.monotonic()
    snap = take_snapshot(store, time.time() if now is None else now, fork=opts.fork,
                         lease_ttl=opts.lease_ttl)
    ts = time.monotonic()
    p = make_plan(snap, opts)
    log.debug("gc snapshot %.3fs, plan %.3fs", ts - t0, time.monotonic() - ts)
    report.plan_seconds = time.monotonic() - t0
    report.total_bytes_before = p.total_before
    report.skipped = list(p.skipped)
    report.cap_met, report.cap_reason = p.cap_met, p.cap_reason
    report.ollama_download = p.ollama_pull
    report.ollama_kept_blobs = len(p.ollama_kept)
    report.ollama_kept_bytes = sum(p.ollama_kept.values())
    if opts.dry_run:
        report.removed_models = list(dict.fromkeys(str(m.name) for m in p.evict))
        report.removed_blobs = sorted(str(d) for d in p.delete_blobs)
        report.removed_ingests = [str(path) for path, _ in p.delete_ingests]
        # what the real run would leave empty (found from outside: always 0)
        report.removed_dirs = sum(dirs_emptied(root, {m.path for m in p.evict})
                                  for root in (store.layout.manifests,
                                               store.layout.manifests_v2))
        report.freed_bytes = (sum(snap.blobs[d].freed for d in p.delete_blobs)
                              + sum(s for _, s in p.delete_ingests))
        report.total_bytes_after = p.total_after
    else:
        t1 = time.monotonic()
        with store.lock(opts.lock_timeout):
            if store.layout.gc_intent.exists():
                # Ollama's downloads looked at again under the lock (found by review: an
                # Ollama pull that began while this GC planned or waited was not seen)
                ollama = p.ollama_pull or live_ollama_now(store, snap, opts)
                finish_intent(store, report, lease_ttl=opts.lease_ttl, ollama=ollama)
            apply_plan(store, p, snap, report, opts, hook)
            # what is there now, not the plan's arithmetic: a GC that ran at the same
            # time may have freed (or a pull added) bytes this one counted
            blobs = blob_table(stat_blob_folder(str(store.layout.blobs))).blobs
            report.total_bytes_after = sum(entry.size for entry in blobs.values())
        report.apply_seconds = time.monotonic() - t1
        if opts.max_size is not None:
            report.cap_met = report.total_bytes_after <= opts.max_size
            if not report.cap_met and not report.cap_reason:
                report.cap_reason = ("the store changed while GC ran (blobs added by a "
                                     "pull or import, or a planned removal found in use "
                                     "or leased at its last check); run gc again")
    if not report.cap_met and opts.max_size is not None:
        raise cap_error(report, opts.max_size)
    return report


def plan(store: Store, opts: GCOptions, *, now: float | None = None) -> Plan:
    """Compute what ``gc`` would do, without changing anything."""
    return make_plan(take_snapshot(store, time.time() if now is None else now,
                                   fork=opts.fork, lease_ttl=opts.lease_ttl), opts)


def auto_gc(store: Store, *, fork: bool = False) -> GCReport | None:
    """Apply the store's ``max-size`` setting, if any (called after each pull)."""
    from blobstore.units import parse_size

    value = store.get_config("max-size")
    if not value:
        return None
    return gc(store, GCOptions(max_size=parse_size(value), fork=fork))
