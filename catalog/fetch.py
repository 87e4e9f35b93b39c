"""Download one plain HTTP(S) file into the store and make a model of it.

Used by ``blobctl fetch URL --sha256 HEX --name REF`` and ``blobctl pull hf.co/ORG/REPO
--file F`` (``catalog.hf``). The bytes go through the pull engine
(``registry_client.download``: parallel ranges, resume from the ingest area, hashing while
writing), so the guarantees of spec/pull.md hold:

* nothing but the complete file with the expected sha256 ever gets a blob name; on a
  mismatch the ingest is dropped and ``DigestMismatch`` is raised (exit 5), no manifest;
* an interrupted download resumes on the next call (same digest, same ingest folder);
* credentials (HF_TOKEN for the HF endpoint, ~/.docker/config.json) go only to the URL's
  own origin, never to the host it redirects to (a CDN);
* a lease names the blob from before it gets its name until the manifest is written.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import filelock
import httpx

from blobstore.digest import Digest
from blobstore.errors import IntegrityError, NotFound
from blobstore.gguf import GGUFInfo
from blobstore.importer import ImportResult, model_from_blob
from blobstore.ingest import check_free_space, preallocated
from blobstore.layout import file_mode
from blobstore.lease import Lease
from blobstore.name import ModelName
from blobstore.owner import hand_over, make_dirs
from blobstore.store import Store
from registry_client.client import RegistryClient, check_url, safe_url
from registry_client.download import BlobJob, Downloader, check_identity
from registry_client.errors import ProtocolError, RegistryError, RemoteNotFound
from registry_client.pull import PullOptions, gc_after_pull

__all__ = ["FetchResult", "RemoteFileNotFound", "fetch_file", "remote_size"]

ProgressEvent = dict[str, Any]
log = logging.getLogger("blobctl.fetch")


@dataclass
class FetchResult:
    name: ModelName
    model: ImportResult
    url: str
    size: int
    bytes_fetched: int = 0
    bytes_resumed: int = 0
    already_present: bool = False
    seconds: float = 0.0


def remote_size(client: RegistryClient, url: str) -> int:
    """The file's size (see ``_remote_size``)."""
    return _remote_size(client, url).size


@dataclass(frozen=True)
class _Size:
    size: int
    hinted: bool = False          # only HEAD's word
    ranges_ignored: bool = False  # the range GET got the whole file (200)


def _remote_size(client: RegistryClient, url: str) -> _Size:
    """The file's size as its ``GET`` tells it: the complete length in the
    ``Content-Range`` of a 1-byte range ``GET``, or the ``Content-Length`` of a whole,
    unencoded ``200`` (a server that ignores ``Range``). ``HEAD`` is only a hint, asked
    when the ``GET`` tells no size (a whole body without a length; a ``416``: an empty
    file has no byte 0): found from outside, servers whose ``HEAD`` said 0 or another
    length than the ``GET`` sends, a compressed length, or 404 while the ``GET`` works,
    and a presigned S3/CDN URL signs the method, so its ``HEAD`` is 403.

    Returns the size, whether it is only ``HEAD``'s, and whether the server ignores
    ``Range`` (then the download is one stream from the start). Raises ProtocolError for a body
    sent encoded although identity was asked for (its bytes are not the file's) and when
    no size is told; the ``GET``'s errors as ``RegistryClient.request`` raises them.
    Messages name the URL without its userinfo and query (spec/pull.md)."""
    what = f"file {safe_url(url)}"
    resp: httpx.Response | None
    try:
        resp = client.request("GET", url, scope="", what=what, headers={"Range": "bytes=0-0"})
    except RegistryError as exc:
        if exc.status != 416:
            raise
        resp = None
    if resp is not None:
        try:
            check_identity(resp.headers, what, safe_url(url))
            if resp.status_code == 206:  # (one byte: read, so the connection is kept)
                with contextlib.suppress(httpx.HTTPError):
                    resp.read()
        finally:
            resp.close()
        total = resp.headers.get("content-range", "").rpartition("/")[2]
        if resp.status_code == 206 and total.isascii() and total.isdigit():
            return _Size(int(total))
        length = resp.headers.get("content-length", "")
        if resp.status_code == 200 and length.isascii() and length.isdigit():
            # the whole file offered: a server that ignores Range
            return _Size(int(length), ranges_ignored=True)
    try:  # the GET tells no size: HEAD's, if it tells one of the file as it is
        head = client.request("HEAD", url, scope="", what=what)
        head.close()
        length = head.headers.get("content-length", "")
        if (head.headers.get("content-encoding", "identity").lower() in ("", "identity")
                and length.isascii() and length.isdigit()):
            return _Size(int(length), hinted=True)
    except RegistryError as exc:
        log.debug("%s: HEAD failed (%s); no size from it", what, exc)
    raise ProtocolError("the server tells neither Content-Length nor Content-Range; "
                        "cannot download the file in ranges", url=safe_url(url))


def _emit(progress: Callable[[ProgressEvent], None] | None, **event: Any) -> None:
    if progress is not None:
        progress(event)


def fetch_file(
    store: Store,
    url: str,
    sha256: Digest,
    name: ModelName,
    *,
    size: int | None = None,
    options: PullOptions | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    accept: Callable[[GGUFInfo], None] | None = None,
) -> FetchResult:
    """Download ``url`` (verified against ``sha256``) and write model ``name`` of it.

    ``size`` when known (HF LFS metadata), else asked of the server. Raises
    DigestMismatch/SizeMismatch (integrity), RegistryError subclasses (network, auth,
    not found), GGUFError (the file is not a GGUF model; the blob stays for GC),
    InsufficientSpace; InvalidInput for a URL that is not a valid http(s) URL (before
    anything is read or written: ``check_url``). ``accept`` sees the downloaded GGUF's
    metadata before the manifest is written; what it raises leaves no manifest (the
    verified blob stays, unreferenced, for GC).
    """
    check_url(url)
    try:
        return _fetch_file(store, url, sha256, name, size=size, options=options,
                           progress=progress, accept=accept)
    except RemoteNotFound as exc:  # a file's URL, not a registry's model name
        raise RemoteFileNotFound(f"{safe_url(url)} answered {exc.status or 404} (no such "
                                 "file)", url=exc.url, status=exc.status,
                                 hint="check the URL") from exc


class RemoteFileNotFound(NotFound, RegistryError):
    """A file's URL answered 404 (found from outside: `fetch` of such a URL said "not
    found in the registry" with a hint about model names). Exit 3, as RemoteNotFound."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = 404,
                 hint: str | None = None) -> None:
        RegistryError.__init__(self, message, url=url, status=status, hint=hint)


def _fetch_file(
    store: Store,
    url: str,
    sha256: Digest,
    name: ModelName,
    *,
    size: int | None,
    options: PullOptions | None,
    progress: Callable[[ProgressEvent], None] | None,
    accept: Callable[[GGUFInfo], None] | None,
) -> FetchResult:
    opts = options or PullOptions()
    t0 = time.monotonic()
    with RegistryClient(insecure=opts.insecure, max_connections=opts.max_connections,
                        stall_timeout=opts.stall_timeout, retry=opts.retry) as client:
        result_bytes = (0, 0)
        # lease first, then look: a blob seen present stays so (as registry_client.pull)
        with Lease(store.layout, f"fetch {name}", digests={sha256}) as lease:
            present = store.has_blob(sha256, size)  # (another size: damaged, fetched)
            if present:  # nothing to ask the server
                size = store.blob_path(sha256).stat().st_size if size is None else size
                _emit(progress, status=f"pulling {sha256.short}", digest=str(sha256),
                      total=size, completed=size)
            else:
                told = _Size(size) if size is not None else _remote_size(client, url)
                size = told.size
                if not preallocated(store.layout, sha256, size):
                    check_free_space(store.layout.blobs, size)  # a resumable one is allocated
                try:
                    result_bytes = _download(store, client, name, url, sha256, told, lease,
                                             opts, progress)
                except IntegrityError as exc:
                    if told.hinted and exc.hint is None:
                        exc.hint = (f"the server's GET tells no size; {size} bytes is what "
                                    "its HEAD says, and HEAD and GET may disagree")
                    raise
            _emit(progress, status="verifying sha256 digest")
            _emit(progress, status="writing manifest")
            model = model_from_blob(store, sha256, name, lease=lease, accept=accept)
    store.record_use(name)
    _emit(progress, status="success")
    # the max-size cap, as after a registry pull (found from outside: fetch and
    # pull --file left the store over its cap)
    gc_after_pull(store, opts)
    return FetchResult(model.name, model, safe_url(url), size, result_bytes[0],
                       result_bytes[1], present, time.monotonic() - t0)


def _download(store: Store, client: RegistryClient, name: ModelName, url: str, digest: Digest,
              told: _Size, lease: Lease, opts: PullOptions,
              progress: Callable[[ProgressEvent], None] | None) -> tuple[int, int]:
    """Fetch the blob unless another process does; (bytes fetched, bytes resumed)."""
    size = told.size
    make_dirs(store.layout.locks)
    lock: filelock.BaseFileLock | None = filelock.FileLock(
        str(store.layout.blob_lock(digest)), mode=file_mode())
    while lock is not None:
        try:
            lock.acquire(timeout=opts.lock_poll)
            hand_over(lock.lock_file)
            break
        except PermissionError:
            # another user's lock file this user may not open (as in pull): the lock
            # only saves work, two writers never share a folder (found by review)
            log.info("cannot take the download lock of %s (another user's): fetching "
                     "it without", digest.short)
            lock = None
        except filelock.Timeout:
            _emit(progress, status=f"waiting for another download of {digest.short}",
                  digest=str(digest), total=size, completed=0)
            if store.has_blob(digest):
                return 0, 0
    try:
        if store.has_blob(digest):
            return 0, 0
        dl = opts.download_options()
        job = BlobJob(name, digest, size, url=url, single=told.ranges_ignored)

        def tick() -> None:
            _emit(progress, status=f"pulling {digest.short}", digest=str(digest), total=size,
                  completed=job.completed)

        try:
            Downloader(client, store.layout, lease, dl).run([job], on_tick=tick)
        finally:
            tick()
        return job.fetched_bytes, job.resumed_bytes
    finally:
        if lock is not None:
            lock.release()
