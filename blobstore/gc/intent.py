"""GC's intent record (``.blobctl/gc-intent.json``): crash safety (spec/gc.md, 3.).

Written before any deletion; finished by the next GC if this one is killed: a listed
manifest is removed only if its bytes are unchanged, a listed blob only if still
unreferenced, unleased and not open or mapped by any process.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import msgspec

from blobstore.digest import Digest
from blobstore.errors import InvalidDigest
from blobstore.gc.plan import Plan
from blobstore.gc.report import GCReport
from blobstore.inuse import files_in_use
from blobstore.layout import Layout, fsync_dir, read_small, write_atomic
from blobstore.lease import live_leases
from blobstore.store import Store

__all__ = ["finish_intent", "write_intent"]


class _Intent(msgspec.Struct):
    created: float
    manifests: list[tuple[str, str]]  # (path, sha256 of its bytes)
    blobs: list[str]


def write_intent(layout: Layout, p: Plan) -> None:
    """Record what the plan will delete (nothing is written for an empty plan)."""
    if not (p.evict or p.delete_blobs):
        return
    intent = _Intent(
        created=time.time(),
        manifests=[(m.path, str(m.raw_digest)) for m in p.evict],
        blobs=sorted(str(d) for d in p.delete_blobs),
    )
    write_atomic(layout.gc_intent, msgspec.json.encode(intent), layout.ingest)


def finish_intent(store: Store, report: GCReport, *, lease_ttl: float) -> None:
    """Complete a GC that was killed mid-apply (its intent record is still there).

    Call under the store lock."""
    path = store.layout.gc_intent
    try:
        intent = msgspec.json.decode(path.read_bytes(), type=_Intent)
    except FileNotFoundError:
        return
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        path.unlink(missing_ok=True)
        return
    for mpath, digest in intent.manifests:
        with contextlib.suppress(OSError):
            if str(Digest.of_bytes(read_small(mpath)[0])) == digest:
                os.unlink(mpath)
                report.removed_models.append(
                    str(Path(mpath).relative_to(store.layout.manifests)))
    refs = store.referenced_digests()
    leased: set[Digest] = set()
    for lease in live_leases(store.layout, ttl=lease_ttl):
        leased |= lease.digests
    real = os.path.realpath(store.layout.blobs)
    in_use = files_in_use(real) if intent.blobs else None
    for text in intent.blobs:
        try:
            d = Digest.parse(text)
        except InvalidDigest:
            continue
        if d in refs or d in leased:
            continue
        if in_use is not None and (f"{real}/{d.filename}" in in_use
                                   or f"{real}/{d.legacy_filename}" in in_use):
            continue  # open or mapped by a running process (spec/gc.md, "Never deleted")
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
