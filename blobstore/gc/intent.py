"""GC's intent record (``.blobctl/gc-intent.json``): crash safety (spec/gc.md, 3.).

Written before any deletion; finished by the next GC if this one is killed. A listed
manifest is removed only after the checks the killed GC's own apply would have made:
its file unchanged (bytes, and mtime and size where recorded), the model not pinned and
not used since it was planned, none of its blobs open or mapped by any process. A listed
blob goes only if still unreferenced, unleased, not open or mapped, not written (or
linked) again since the record was made, and no Ollama download is live (spec/gc.md,
"Never deleted").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from pathlib import Path

import msgspec

from blobstore import pathjson
from blobstore.blobfiles import unlink_names
from blobstore.digest import Digest
from blobstore.errors import InvalidDigest, StoreUnwritable
from blobstore.gc.plan import OLLAMA_PULL, Plan
from blobstore.gc.report import GCReport, Skipped
from blobstore.inuse import InUse, files_in_use
from blobstore.layout import Layout, fsync_dir, read_small, write_atomic
from blobstore.lease import live_leases
from blobstore.manifest import referenced_by
from blobstore.name import ModelName
from blobstore.removal import prune_empty_dirs
from blobstore.store import Store

__all__ = ["finish_intent", "write_intent"]

log = logging.getLogger("blobctl.gc")


class _Intent(msgspec.Struct):
    created: float
    manifests: list[tuple[str, str]]  # (path, sha256 of its bytes)
    blobs: list[str]
    # per manifest, in the same order: (last use as planned, mtime_ns, size); records of
    # earlier versions have none (then: used since ``created``, bytes unchanged)
    planned: list[tuple[float, int, int]] = msgspec.field(default_factory=list)


_INTENT_DEC = msgspec.json.Decoder(_Intent)


def write_intent(layout: Layout, p: Plan) -> None:
    """Record what the plan will delete (nothing is written for an empty plan).

    On a full disk the record cannot be written, and GC is how space gets freed: it goes
    on without one. The store stays consistent without it (manifests go before their
    blobs, so a kill leaves only orphans, which the next GC sweeps); what is lost is only
    that the next GC would finish this one's evictions."""
    if not (p.evict or p.delete_blobs):
        return
    planned = []
    for m in p.evict:
        try:
            st = os.stat(m.path)
            planned.append((m.last_used, st.st_mtime_ns, st.st_size))
        except OSError:
            planned.append((m.last_used, -1, -1))  # (gone: nothing for a later GC to do)
    intent = _Intent(
        created=time.time(),
        manifests=[(m.path, str(m.raw_digest)) for m in p.evict],
        blobs=sorted(str(d) for d in p.delete_blobs),
        planned=planned,
    )
    try:
        write_atomic(layout.gc_intent, pathjson.encode(intent), layout.ingest)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.warning("gc: no space for its intent record (%s); going on without it: a gc "
                    "killed now leaves orphans for the next gc, no manifest without its "
                    "blobs", exc.strerror)


def _kept_since(store: Store, d: Digest, created: float, ollama: str | None) -> str | None:
    """Why the listed blob ``d`` must stay although the killed GC meant to remove it, or
    None: an Ollama download is live (no unreferenced blob goes then), or the blob was
    written or linked again after the record was made (an upload that lands it again,
    a pull, an import: protected by ``--grace`` like any new blob; found from outside:
    a plain gc after a killed ``gc --grace 0`` removed a blob that had just come back)."""
    if ollama is not None:
        return f"{OLLAMA_PULL} ({ollama})"
    for path in (store.layout.blob(d), store.layout.legacy_blob(d)):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        # ctime too: a new hard link (an import) or a rename onto the name changes it
        if max(st.st_mtime, st.st_ctime) > created:
            return "written again since the killed gc planned its removal"
    return None


def finish_intent(store: Store, report: GCReport, *, lease_ttl: float,
                  ollama: str | None = None) -> None:
    """Complete a GC that was killed mid-apply (its intent record is still there).

    ``ollama``: the live (or likely) Ollama download this GC's plan found, if any; then
    no listed blob goes that no manifest names, as in the plan (Ollama may be about to
    write a manifest naming it). Call under the store lock. Raises StateUnreadable where
    pins cannot be read (never taken for "not pinned")."""
    path = store.layout.gc_intent
    try:
        intent = pathjson.decode(path.read_bytes(), _INTENT_DEC)
    except FileNotFoundError:
        return
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        path.unlink(missing_ok=True)
        return
    real = os.path.realpath(store.layout.blobs)
    in_use: InUse | None = None
    states = store.model_states() if intent.manifests else {}
    removed: list[ModelName] = []
    parents: set[str] = set()
    for i, (mpath, digest) in enumerate(intent.manifests):
        try:
            raw, st = read_small(mpath)
        except OSError:
            continue  # gone already
        name = store.name_at(mpath)
        shown = str(name) if name is not None else mpath
        used, mtime_ns, size = (intent.planned[i] if i < len(intent.planned)
                                else (intent.created, -1, -1))
        state = states.get(name.key) if name is not None else None
        reason = None
        if str(Digest.of_bytes(raw)) != digest or (
                mtime_ns >= 0 and (st.st_mtime_ns, st.st_size) != (mtime_ns, size)):
            reason = "changed since the killed gc planned it"
        elif name is None:
            reason = "not a model name"
        elif state is not None and state.pinned:
            reason = "pinned"
        elif state is not None and state.last_used is not None and state.last_used > used:
            reason = "used since the killed gc planned it"
        else:
            if in_use is None:
                in_use = files_in_use(real)
            holders = [who for d in referenced_by(raw) for who in in_use.of_blob(real, d)]
            if holders:
                reason = f"in use by {', '.join(sorted(set(holders)))}"
        if reason is not None:
            report.skipped.append(Skipped("model", shown, reason))
            continue
        try:
            os.unlink(mpath)
        except FileNotFoundError:
            continue
        assert name is not None
        removed.append(name)
        parents.add(os.path.dirname(mpath))
        report.removed_models.append(shown)
    for folder in parents:  # the removals are durable before any of their blobs goes
        with contextlib.suppress(OSError):
            fsync_dir(Path(folder))
    for folder in parents:  # and the folders they emptied go, as in apply
        prune_empty_dirs(store, Path(folder))
    refs = store.referenced_digests()
    leased: set[Digest] = set()
    for lease in live_leases(store.layout, ttl=lease_ttl):
        leased |= lease.digests
    if intent.blobs and in_use is None:
        in_use = files_in_use(real)
    planned_skips = {s.what for s in report.skipped if s.kind == "blob"}
    for text in intent.blobs:
        try:
            d = Digest.parse(text)
        except InvalidDigest:
            continue
        if d in refs or d in leased:
            continue
        if in_use is not None and in_use.of_blob(real, d):
            continue  # open or mapped by a running process (spec/gc.md, "Never deleted")
        why = _kept_since(store, d, intent.created, ollama)
        if why is not None:
            if str(d) not in planned_skips:  # (the plan may have said why already)
                report.skipped.append(Skipped("blob", str(d), why))
                if ollama is not None:
                    report.ollama_kept_blobs += 1
                    with contextlib.suppress(OSError):
                        report.ollama_kept_bytes += os.lstat(store.layout.blob(d)).st_size
            continue
        went, freed = unlink_names([str(store.layout.blob(d)),
                                    str(store.layout.legacy_blob(d))])
        if went:  # once, under whichever of its names it had
            report.removed_blobs.append(str(d))
            report.freed_bytes += freed
            report.freed_blob_bytes += freed
    fsync_dir(store.layout.blobs)
    path.unlink(missing_ok=True)
    report.finished_intent = True
    if removed and store.state is not None:
        try:
            store.forget_removed(removed)
        except StoreUnwritable as exc:  # state is advisory: the eviction stands
            log.warning("could not update state after gc: %s", exc.message)
