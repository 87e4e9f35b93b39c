"""The one ingest writer: every blob the store gets is written, verified and committed
here (spec/store-layout.md, "Ingest").

An :class:`Ingest` owns one folder ``<area>/<key>/``, the area being
``Layout.blob_ingest`` (``.blobctl/ingest``, or ``blobs/.blobctl-ingest`` when ``blobs/``
is on another file system: the commit is a rename):

* ``<key>`` is the blob's digest file name (``sha256-<hex>``) when the digest is known
  before the first byte (a download: a later run adopts the folder after a crash), with
  ``.<pid>-<token>`` appended when another live writer owns that folder; ``up-<token>``
  when it is not known (an import, a push into ``serve``): only a caller that kept the
  token re-opens it (:meth:`Ingest.reopen`).
* ``data`` holds the bytes: written at offsets (:meth:`Ingest.write_at`, the download
  engine), appended with an in-order hasher (:meth:`Ingest.append`), or hardlinked from
  a local file (:func:`link_in`).
* ``owner`` names the one writer (host, boot, pid namespace, pid + start time) and its
  **heartbeat**, refreshed every ``HEARTBEAT_SECONDS`` while it is open (by its lease's
  heartbeat thread, and by its writes).
* ``state.json`` is the durable checkpoint (finished ranges whose bytes were
  ``fdatasync``-ed, the time it was saved); ``journal`` the light one (offset writes).

Every path ends in the one :meth:`Ingest.commit`: fsync ``data``, check its size and
digest (a mismatch deletes the folder: a wrong blob never gets a digest name), make it
read-only (not a hardlinked user file), ``os.replace`` it to ``blobs/<alg>-<hex>``, fsync
``blobs/``, remove the folder. The key is named in the writer's lease before the folder
exists. Nothing outside this package knows the folder's format: GC sees ingests through
:func:`scan` (held or not, heartbeat age), the pull through :func:`activity` and
:func:`preallocated`.
"""

from __future__ import annotations

from blobstore.ingest.folder import HEARTBEAT_SECONDS, OWNER_TTL, boot_id, coalesce
from blobstore.ingest.scan import (
    IngestEntry,
    OwnBytes,
    activity,
    areas,
    legacy_entry,
    preallocated,
    probe,
    remove,
    scan,
)
from blobstore.ingest.writer import (
    CHUNK,
    WRITEBACK_BYTES,
    BlobWriter,
    Ingest,
    ResumableIngest,
    check_free_space,
    hash_file,
    is_upload_key,
    link_in,
)

__all__ = ["CHUNK", "HEARTBEAT_SECONDS", "OWNER_TTL", "WRITEBACK_BYTES", "BlobWriter", "Ingest",
           "IngestEntry", "OwnBytes", "ResumableIngest", "activity", "areas", "boot_id",
           "check_free_space", "coalesce", "hash_file", "is_upload_key", "legacy_entry", "link_in",
           "preallocated", "probe", "remove", "scan"]
