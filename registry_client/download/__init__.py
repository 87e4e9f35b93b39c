"""Parallel, resumable, verified blob downloads (spec/pull.md, "Blob download").

``schedule`` is the pure core (ranges, stealing, requeue, frontier bookkeeping and its
invariant), ``transfer`` the HTTP/1.1 range reader of the data path, ``engine`` the
threads that tie them to the store's resumable ingest writer.
"""

from __future__ import annotations

from registry_client.download.engine import (
    BlobJob,
    Downloader,
    DownloadOptions,
    InternalError,
    check_identity,
)

__all__ = ["BlobJob", "DownloadOptions", "Downloader", "InternalError", "check_identity"]
