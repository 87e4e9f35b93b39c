"""Parallel, resumable, verified blob downloads (spec/pull.md, "Blob download").

A blob is cut into chunks. Workers (threads sharing one connection budget) fetch chunks
with HTTP ``Range`` requests and write each received block at its offset into a
preallocated file in the ingest area (``os.pwrite``), while keeping the bytes in memory
until the **in-order hasher** has consumed them: the digest is known when the last byte
lands, and a fresh pull reads nothing back from disk. New chunks are handed out only
within a window ahead of the hash frontier, which bounds memory.

* **Work stealing**: an idle worker splits the largest remaining range of an unfinished
  chunk (the one holding the frontier first) and fetches its tail, so one slow stream
  cannot hold the whole pull.
* **Stalls and errors**: a read that sees no bytes for ``stall_timeout`` or a failed
  connection puts the unfinished range back (resuming from the last byte received);
  transient statuses are retried with backoff (``RetryPolicy``).
* **Ranges ignored**: a ``200`` to a ranged request switches the blob to one stream.
  A ``206`` whose ``Content-Range`` does not start where asked fails the range.
* **Resume**: ``state.json`` in the blob's ingest folder records the finished chunks
  (written by the main thread every 2 s, after an ``fdatasync`` of the data). A new run adopts
  the folder, re-hashes what is already there when the frontier reaches it, and fetches
  only the rest.
* **Commit**: size and digest checked, ``fsync``, read-only, lease, ``os.replace`` into
  ``blobs/``, ``fsync`` of ``blobs/``. A mismatch drops the ingest and names the source.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec

from blobstore.digest import Digest, Hasher
from blobstore.errors import BlobctlError, DigestMismatch, InsufficientSpace, StoreUnwritable
from blobstore.layout import Layout, fsync_dir, write_atomic
from blobstore.lease import Lease
from blobstore.name import ModelName
from registry_client.client import RegistryClient, _safe
from registry_client.errors import ProtocolError, RegistryError, TransferError

__all__ = ["BlobJob", "DownloadOptions", "Downloader"]

log = logging.getLogger("blobctl.download")

MiB = 1 << 20


@dataclass(frozen=True)
class DownloadOptions:
    connections: int = 16
    window_bytes: int = 64 * MiB      # memory for chunks received ahead of the hasher
    min_chunk: int = 1 * MiB
    max_chunk: int = 8 * MiB
    min_steal: int = 64 * 1024        # never leave a range smaller than this
    steal_age: float = 0.15           # only steal from a range running this long …
    steal_eta: float = 0.4            # … whose projected finish is further away than this
    stall_timeout: float = 30.0
    state_interval: float = 2.0       # resume state: main thread only, off the hot path


class _State(msgspec.Struct):
    digest: str
    size: int
    chunk_size: int
    done: list[tuple[int, int]]


class _Piece:
    """A range [pos, limit) of one chunk that one worker is fetching."""

    __slots__ = ("cancel", "chunk", "fails", "first", "limit", "pos", "started")

    def __init__(self, chunk: _Chunk, pos: int, limit: int, fails: int = 0) -> None:
        self.chunk = chunk
        self.pos = pos
        self.first = pos
        self.limit = limit
        self.fails = fails
        self.cancel = False
        self.started = 0.0  # when a worker took it (monotonic)

    def rate(self, now: float) -> float:
        """Bytes per second seen so far (0 before the first byte)."""
        age = now - self.started
        got = self.pos - self.first
        return got / age if got > 0 and age > 0 else 0.0

    def eta(self, now: float) -> float:
        """Projected seconds to finish at the rate seen so far (inf if nothing yet)."""
        age = now - self.started
        got = self.pos - self.first
        if got <= 0 or age <= 0:
            return float("inf")
        return (self.limit - self.pos) / (got / age)


class _Chunk:
    __slots__ = ("buf", "end", "filled", "index", "on_disk", "pending", "pieces", "start")

    def __init__(self, index: int, start: int, end: int) -> None:
        self.index = index
        self.start = start
        self.end = end
        self.buf: memoryview | None = None  # a view of a pooled buffer (Downloader._pool)
        self.filled = 0
        self.on_disk = False          # finished in an earlier run: hash from disk
        self.pieces: list[_Piece] = []  # active
        self.pending: list[_Piece] = []  # ranges waiting for a worker

    @property
    def done(self) -> bool:
        return self.on_disk or self.filled == self.end - self.start


@dataclass(eq=False)
class BlobJob:
    """One blob to fetch into the store."""

    name: ModelName
    digest: Digest
    size: int
    # progress (read by the progress reporter)
    completed: int = 0
    status: str = "pending"   # pending, waiting, downloading, verifying, done, failed
    resumed_bytes: int = 0
    fetched_bytes: int = 0    # bytes received over the network in this run
    disk_read_bytes: int = 0  # bytes re-read from disk for hashing (resume only)
    error: BaseException | None = None
    # internals
    chunks: list[_Chunk] = field(default_factory=list)
    frontier: int = 0
    single: bool = False      # server ignores Range: one stream for the whole blob
    single_taken: bool = False
    fd: int = -1
    dir: Path | None = None
    hasher: Hasher | None = None
    hash_lock: threading.Lock = field(default_factory=threading.Lock)
    window: int = 1
    last_state: float = 0.0
    url: str = ""
    # SEAM (issue 12, plain-file downloads: HF ``resolve/`` URLs, ``blobctl fetch``):
    # when set, the blob is fetched from this URL instead of ``client.blob_url(name,
    # digest)``. Credentials still go only to the URL's own origin (client._send_once).
    source_url: str | None = None


class _Abort(Exception):
    pass


class Downloader:
    """Downloads a set of blobs with one pool of ``connections`` workers."""

    def __init__(self, client: RegistryClient, layout: Layout, lease: Lease,
                 opts: DownloadOptions | None = None) -> None:
        self.client = client
        self.layout = layout
        self.lease = lease
        self.opts = opts or DownloadOptions()
        self._cond = threading.Condition()
        self._jobs: list[BlobJob] = []
        self._failed: BaseException | None = None
        # Chunk buffers are reused, never freed: memory stays at about the window, with
        # no page faults after warm-up and none of the RSS creep that freeing multi-MiB
        # buffers into malloc's per-thread arenas causes.
        self._pool: list[bytearray] = []
        self._pool_lock = threading.Lock()

    # ------------------------------------------------------------------ setup
    def _chunk_size(self, size: int) -> int:
        o = self.opts
        want = o.window_bytes // max(1, int(o.connections * 1.5))
        return max(o.min_chunk, min(o.max_chunk, want, max(o.min_chunk, size)))

    def _prepare(self, job: BlobJob) -> None:
        """Open (or adopt) the blob's ingest folder and plan its chunks."""
        d = self.layout.ingest / job.digest.filename
        self.lease.add(ingests={d.name}, digests={job.digest})
        d.mkdir(parents=True, exist_ok=True)
        job.dir = d
        job.url = _safe(job.source_url or self.client.blob_url(job.name, job.digest))
        state: _State | None = None
        with contextlib.suppress(OSError, msgspec.DecodeError, msgspec.ValidationError):
            state = msgspec.json.decode((d / "state.json").read_bytes(), type=_State)
        data = d / "data"
        if state is not None and (state.digest != str(job.digest) or state.size != job.size
                                  or not data.exists()
                                  or data.stat().st_size != job.size):
            state = None
        chunk = state.chunk_size if state is not None else self._chunk_size(job.size)
        try:
            job.fd = os.open(data, os.O_RDWR | os.O_CREAT, 0o644)
            if state is None:
                os.ftruncate(job.fd, 0)
                try:
                    os.posix_fallocate(job.fd, 0, job.size) if job.size else None
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        raise
                    os.ftruncate(job.fd, job.size)  # no fallocate here: sparse file
        except OSError as exc:
            if job.fd >= 0:
                os.close(job.fd)
                job.fd = -1
            if exc.errno == errno.ENOSPC:
                free = shutil.disk_usage(d).free
                raise InsufficientSpace(str(d), job.size - free, free) from exc
            raise StoreUnwritable(str(d), exc.strerror or str(exc)) from exc
        done = {(s, e) for s, e in state.done} if state is not None else set()
        job.chunks = []
        for i, start in enumerate(range(0, max(job.size, 1), chunk)):
            end = min(job.size, start + chunk)
            c = _Chunk(i, start, end)
            if (start, end) in done:
                c.on_disk = True
                job.resumed_bytes += end - start
            else:
                c.pending.append(_Piece(c, start, end))
            job.chunks.append(c)
        if job.size == 0:
            job.chunks = []
        job.completed = job.resumed_bytes
        job.window = max(2, self.opts.window_bytes // chunk)
        job.hasher = job.digest.new_hasher()
        job.status = "downloading"
        if job.resumed_bytes:
            log.info("resuming %s: %d of %d bytes already here", job.digest.short,
                     job.resumed_bytes, job.size)
        self._save_state(job, force=True)

    def _save_state(self, job: BlobJob, *, force: bool = False) -> None:
        now = time.monotonic()
        if job.dir is None or job.fd < 0 or (not force and
                                             now - job.last_state < self.opts.state_interval):
            return
        job.last_state = now
        with self._cond:
            done = [(c.start, c.end) for c in job.chunks if c.done]
        with contextlib.suppress(OSError):
            os.fdatasync(job.fd)  # what the state calls done is on disk first
            write_atomic(job.dir / "state.json",
                         msgspec.json.encode(_State(str(job.digest), job.size,
                                                    self._chunk_len(job), done)),
                         self.layout.ingest)

    @staticmethod
    def _chunk_len(job: BlobJob) -> int:
        return job.chunks[0].end - job.chunks[0].start if job.chunks else 0

    def _take_buffer(self, size: int) -> memoryview:
        with self._pool_lock:
            for i, b in enumerate(self._pool):
                if len(b) >= size:
                    return memoryview(self._pool.pop(i))[:size]
        return memoryview(bytearray(max(size, self._chunk_size_max)))[:size]

    def _give_buffer(self, view: memoryview) -> None:
        base = view.obj
        view.release()
        if isinstance(base, bytearray):
            with self._pool_lock:
                self._pool.append(base)

    @property
    def _chunk_size_max(self) -> int:
        return max((self._chunk_len(j) for j in self._jobs), default=self.opts.min_chunk)

    # ------------------------------------------------------------------ scheduling
    def _next_task(self) -> tuple[BlobJob, _Piece | None] | None:
        """Under the condition lock: a piece to fetch, or None (nothing to do now)."""
        for job in self._jobs:
            if job.status != "downloading":
                continue
            if job.single:
                if not job.single_taken:
                    job.single_taken = True
                    return job, None
                continue
            limit = min(len(job.chunks), job.frontier + job.window)
            for c in job.chunks[job.frontier:limit]:
                if c.pending:
                    p = c.pending.pop(0)
                    p.started = time.monotonic()
                    c.pieces.append(p)
                    return job, p
        # Nothing new: steal the tail of a straggler: a range that has run for a while and
        # whose projected finish is far off (the chunk the hasher waits for first). Fresh
        # or fast ranges are left alone: splitting them only wastes what is in flight.
        now = time.monotonic()
        best: tuple[float, BlobJob, _Piece] | None = None
        for job in self._jobs:
            if job.status != "downloading" or job.single:
                continue
            for c in job.chunks[job.frontier:job.frontier + job.window]:
                for p in c.pieces:
                    if (p.limit - p.pos < 2 * self.opts.min_steal
                            or now - p.started < self.opts.steal_age):
                        continue
                    eta = p.eta(now)
                    if eta < self.opts.steal_eta:
                        continue
                    score = min(eta, 1e9) * (4 if c.index == job.frontier else 1)
                    if best is None or score > best[0]:
                        best = (score, job, p)
        if best is None:
            return None
        _, job, victim = best
        # Split so that both halves finish together: the straggler keeps the share its
        # rate can handle next to a typical stream (half, when rates are unknown).
        remaining = victim.limit - victim.pos
        rates = sorted(r for c in job.chunks[job.frontier:job.frontier + job.window]
                       for p in c.pieces if p is not victim
                       for r in (p.rate(now),) if r > 0)
        own = victim.rate(now)
        typical = rates[len(rates) // 2] if rates else own
        share = own / (own + typical) if own > 0 and typical > 0 else 0.5
        keep = max(self.opts.min_steal, min(remaining - self.opts.min_steal,
                                            int(remaining * share)))
        mid = victim.pos + keep
        tail = _Piece(victim.chunk, mid, victim.limit)
        tail.started = now
        victim.limit = mid
        log.debug("stealing %d bytes of chunk %d of %s", tail.limit - tail.pos,
                  victim.chunk.index, job.digest.short)
        return job, tail

    def _all_done(self) -> bool:
        return all(j.status in ("done", "failed") for j in self._jobs)

    # ------------------------------------------------------------------ workers
    def _worker(self) -> None:
        while True:
            with self._cond:
                task = None
                while task is None:
                    if self._failed is not None or self._all_done():
                        return
                    task = self._next_task()
                    if task is None:
                        self._cond.wait(0.25)
            job, piece = task
            try:
                if piece is None:
                    self._fetch_single(job)
                else:
                    self._fetch_piece(job, piece)
            except _Abort:
                return
            except BaseException as exc:  # noqa: BLE001  (thread boundary: re-raised by run())
                self._fail(job, exc)
                return

    def _fail(self, job: BlobJob, exc: BaseException) -> None:
        with self._cond:
            job.status = "failed"
            job.error = exc
            if self._failed is None:
                self._failed = exc
            self._cond.notify_all()

    def _requeue(self, job: BlobJob, piece: _Piece, reason: str, *,
                 retry_after: float | None = None) -> None:
        with self._cond:
            c = piece.chunk
            if piece in c.pieces:
                c.pieces.remove(piece)
            if piece.pos >= piece.limit or piece.cancel:
                self._cond.notify_all()
                return
            piece.fails += 1
            if piece.fails >= self.client.retry.attempts:
                raise TransferError(
                    f"blob {job.digest.short}: bytes {piece.pos}-{piece.limit} failed "
                    f"{piece.fails} times ({reason})", url=job.url)
            c.pending.insert(0, _Piece(c, piece.pos, piece.limit, piece.fails))
            attempt = piece.fails
        self.client.retry.wait(attempt, reason, what=f"blob {job.digest.short} range",
                               retry_after=retry_after)
        with self._cond:
            self._cond.notify_all()

    def _fetch_piece(self, job: BlobJob, piece: _Piece) -> None:
        chunk = piece.chunk
        whole = job.size <= chunk.end - chunk.start and piece.pos == 0
        try:
            with self.client.open_blob(job.name, job.digest,
                                       None if whole else piece.pos,
                                       None if whole else piece.limit,
                                       url=job.source_url) as resp:
                if resp.status_code == 200 and not whole:
                    self._switch_to_single(job, piece)
                    return
                if resp.status_code == 206:
                    self._check_content_range(job, piece, resp)
                elif resp.status_code != 200:
                    raise ProtocolError(f"blob {job.digest.short}: unexpected status "
                                        f"{resp.status_code}", url=job.url)
                self._stream_into(job, piece, resp)
        except (httpx.TransportError, TransferError) as exc:
            self._requeue(job, piece, f"{type(exc).__name__}: {exc}")
            return
        except RegistryError as exc:
            if exc.status is not None and exc.status >= 500:
                self._requeue(job, piece, str(exc))
                return
            raise
        if piece.pos < piece.limit and not piece.cancel:
            self._requeue(job, piece, f"connection closed after {piece.pos - chunk.start} "
                          "bytes of the range")
            return
        with self._cond:
            if piece in chunk.pieces:
                chunk.pieces.remove(piece)
            self._cond.notify_all()
        self._advance_hash(job)

    def _check_content_range(self, job: BlobJob, piece: _Piece, resp: httpx.Response) -> None:
        value = resp.headers.get("content-range", "")
        try:
            unit, _, rest = value.partition(" ")
            span, _, total = rest.partition("/")
            first, _, last = span.partition("-")
            ok = (unit == "bytes" and int(first) == piece.pos
                  and int(last) < piece.limit + (1 << 40)
                  and (total == "*" or int(total) == job.size))
        except ValueError:
            ok = False
        if not ok:
            raise ProtocolError(
                f"blob {job.digest.short}: asked for bytes {piece.pos}-{piece.limit - 1}, "
                f"server sent Content-Range {value!r}", url=job.url)

    def _stream_into(self, job: BlobJob, piece: _Piece, resp: httpx.Response) -> None:
        """Write a response body into the chunk at ``piece.pos`` until ``piece.limit``.

        One lock round per block: it accounts for the block just written and reserves
        the next one (a thief may shrink ``piece.limit`` at any time, only under the lock).
        """
        chunk = piece.chunk
        done = 0  # bytes of the previous block, written but not yet accounted
        for block in resp.iter_raw():
            with self._cond:
                if done:
                    chunk.filled += done
                    job.completed += done
                    job.fetched_bytes += done
                    piece.fails = 0
                    done = 0
                if self._failed is not None:
                    raise _Abort
                take = min(len(block), piece.limit - piece.pos)
                if piece.cancel or take <= 0:
                    return  # switched to one stream, or a thief took the rest
                off = piece.pos
                piece.pos += take
                if chunk.buf is None:
                    chunk.buf = self._take_buffer(chunk.end - chunk.start)
                buf = chunk.buf
            data = memoryview(block)[:take]
            self._pwrite(job, data, off)
            buf[off - chunk.start:off - chunk.start + take] = data
            done = take
            if piece.pos >= piece.limit:
                break
        if done:
            with self._cond:
                chunk.filled += done
                job.completed += done
                job.fetched_bytes += done
                piece.fails = 0

    def _pwrite(self, job: BlobJob, data: memoryview, off: int) -> None:
        try:
            while data:
                n = os.pwrite(job.fd, data, off)
                data, off = data[n:], off + n
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                free = shutil.disk_usage(self.layout.ingest).free
                raise InsufficientSpace(str(self.layout.ingest), job.size - job.completed,
                                        free) from exc
            raise StoreUnwritable(str(self.layout.ingest), exc.strerror or str(exc)) from exc

    def _switch_to_single(self, job: BlobJob, piece: _Piece) -> None:
        """The server ignored Range: fetch the whole blob as one stream instead."""
        with self._cond:
            if not job.single:
                log.warning("%s ignores Range requests: downloading %s as one stream",
                            job.url, job.digest.short)
                job.single = True
                job.single_taken = False
                for c in job.chunks:
                    c.pending.clear()
                    for p in c.pieces:
                        p.cancel = True
                    c.buf = None  # not returned to the pool: a writer may still hold it
            if piece in piece.chunk.pieces:
                piece.chunk.pieces.remove(piece)
            self._cond.notify_all()

    def _fetch_single(self, job: BlobJob) -> None:
        """One stream from byte 0, hashed as it arrives (retried from scratch)."""
        with job.hash_lock:
            for attempt in range(1, self.client.retry.attempts + 1):
                hasher = job.digest.new_hasher()
                got = 0
                try:
                    with self.client.open_blob(job.name, job.digest,
                                               url=job.source_url) as resp:
                        for block in resp.iter_raw():
                            if self._failed is not None:
                                raise _Abort
                            if got + len(block) > job.size:
                                raise ProtocolError(f"blob {job.digest.short}: server sent "
                                                    f"more than {job.size} bytes", url=job.url)
                            self._pwrite(job, memoryview(block), got)
                            hasher.update(block)
                            got += len(block)
                            with self._cond:
                                job.completed = got
                                job.fetched_bytes += len(block)
                    if got == job.size:
                        break
                    reason = f"stream ended after {got} of {job.size} bytes"
                except (httpx.TransportError, TransferError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                if attempt == self.client.retry.attempts:
                    raise TransferError(f"blob {job.digest.short}: {reason}", url=job.url)
                self.client.retry.wait(attempt, reason, what=f"blob {job.digest.short}")
            job.hasher = hasher
            for c in job.chunks:
                c.on_disk = True  # for the state file; hashing is already done
            job.frontier = len(job.chunks)
        self._finish(job)

    # ------------------------------------------------------------------ hashing
    def _advance_hash(self, job: BlobJob) -> None:
        """Feed finished chunks at the frontier to the hasher, in order."""
        if not job.hash_lock.acquire(blocking=False):
            return  # another worker is hashing; it will pick these up
        try:
            while True:
                with self._cond:
                    if job.frontier >= len(job.chunks) or job.single:
                        break
                    c = job.chunks[job.frontier]
                    if not c.done:
                        break
                    buf, c.buf = c.buf, None
                assert job.hasher is not None
                if buf is not None and not c.on_disk:
                    job.hasher.update(buf)
                    self._give_buffer(buf)
                else:
                    self._hash_from_disk(job, c)
                with self._cond:
                    job.frontier += 1
                    self._cond.notify_all()
        finally:
            job.hash_lock.release()
        with self._cond:
            complete = (job.frontier >= len(job.chunks) and not job.single
                        and job.status == "downloading")
            if complete:
                job.status = "verifying"
        if complete:
            self._finish(job)
        elif job.frontier < len(job.chunks):
            # a chunk may have finished while we held the lock
            with self._cond:
                again = job.chunks[job.frontier].done
            if again:
                self._advance_hash(job)

    def _hash_from_disk(self, job: BlobJob, c: _Chunk) -> None:
        assert job.hasher is not None
        off, left = c.start, c.end - c.start
        while left:
            data = os.pread(job.fd, min(left, 4 * MiB), off)
            if not data:
                raise StoreUnwritable(str(job.dir), "ingest file shorter than recorded")
            job.hasher.update(data)
            off += len(data)
            left -= len(data)
            job.disk_read_bytes += len(data)

    # ------------------------------------------------------------------ commit
    def _finish(self, job: BlobJob) -> None:
        assert job.hasher is not None and job.dir is not None
        job.status = "verifying"
        actual = Digest(job.digest.algorithm, job.hasher.hexdigest())
        if actual != job.digest:
            self._drop(job)
            raise DigestMismatch(str(job.digest), str(actual), source=job.url)
        os.fsync(job.fd)
        os.close(job.fd)
        job.fd = -1
        data = job.dir / "data"
        os.chmod(data, 0o444)
        self.layout.blobs.mkdir(parents=True, exist_ok=True)
        os.replace(data, self.layout.blob(job.digest))
        fsync_dir(self.layout.blobs)
        shutil.rmtree(job.dir, ignore_errors=True)
        with self._cond:
            job.status = "done"
            job.completed = job.size
            self._cond.notify_all()

    def _drop(self, job: BlobJob) -> None:
        if job.fd >= 0:
            os.close(job.fd)
            job.fd = -1
        if job.dir is not None:
            shutil.rmtree(job.dir, ignore_errors=True)

    # ------------------------------------------------------------------ run
    def run(self, jobs: list[BlobJob], *, on_tick: object = None) -> None:
        """Download ``jobs`` (already locked by the caller) into the store.

        Raises the first failure after stopping every worker and saving resume state.
        """
        if not jobs:
            return
        self._jobs = list(jobs)
        threads: list[threading.Thread] = []
        try:
            for job in jobs:
                self._prepare(job)
                if job.size == 0:
                    job.hasher = job.digest.new_hasher()
                    self._finish(job)
            self._jobs = [j for j in jobs if j.status != "done"]
            for job in self._jobs:
                if all(c.on_disk for c in job.chunks):
                    self._advance_hash(job)
            threads = [threading.Thread(target=self._worker, name=f"blobctl-dl-{i}",
                                        daemon=True)
                       for i in range(max(1, self.opts.connections))]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                alive = next(t for t in threads if t.is_alive())
                alive.join(0.1)  # wakes at least every 0.1 s to report progress
                if callable(on_tick):
                    on_tick()
                for job in self._jobs:
                    if job.status == "downloading":
                        self._save_state(job)
        except BaseException:
            with self._cond:  # stop the workers, then keep what they wrote
                if self._failed is None:
                    self._failed = _Abort()
                self._cond.notify_all()
            for t in threads:
                t.join(2.0)  # a worker blocked in a read notices at its next block
            raise
        finally:
            # A worker still blocked in a read (after an interrupt) could write through
            # job.fd later: close it only when no worker is left, or the number could be
            # reused by another file and written into. (Leaking is the safe choice.)
            workers_gone = not any(t.is_alive() for t in threads)
            for job in self._jobs:
                if job.status != "done":
                    self._save_state(job, force=True)
                    if job.fd >= 0 and workers_gone:
                        os.close(job.fd)
                        job.fd = -1
        if self._failed is not None:
            raise self._failed
        unfinished = [j for j in self._jobs if j.status != "done"]
        if unfinished:  # pragma: no cover - defensive
            raise BlobctlError(f"download of {unfinished[0].digest.short} did not finish")
