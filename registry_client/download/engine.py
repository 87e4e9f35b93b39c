"""The download engine: workers, the hash frontier, checkpoints (spec/pull.md, "Blob
download").

Threads and what they own:

* **workers** (one per connection): take a piece from the :class:`Schedule`, fetch its
  bytes with a ranged GET (:class:`RangeReader`, or httpx where that cannot be used),
  receive them a batch at a time into the worker's own buffer, ``pwrite`` them into the
  ingest file and account them. Failures put the unwritten rest of the piece back, due
  after the retry policy's backoff.
* **the hasher**: feeds finished chunks to the digest in order, read back from the page
  cache (where the workers' writes still are; from disk only for what an earlier run
  wrote or memory pressure evicted, counted), and commits the blob when the last chunk
  is hashed.
* **the caller's thread**: progress ticks, durable checkpoints every few seconds, the
  connection-count tuner, and the watchdog: after every tick the schedule's invariant is
  checked and a state where nothing can move is raised at once as an internal error.

Memory is one batch buffer per worker and one read buffer for the hasher, whatever the
window: the window (how far past the hash frontier ranges are fetched) is held by the
page cache, so it can be wide enough for few, large range requests, which is what costs
the server least (spec/pull.md, "Chunks").
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from blobstore.digest import Digest, Hasher
from blobstore.errors import BlobctlError, DigestMismatch, SizeMismatch
from blobstore.ingest import WRITEBACK_BYTES, ResumableIngest, coalesce
from blobstore.layout import Layout
from blobstore.lease import Lease
from blobstore.name import ModelName
from registry_client.client import RegistryClient, _safe
from registry_client.download.schedule import (
    Chunk,
    ConnectionTuner,
    Piece,
    Plan,
    Schedule,
    ScheduleError,
    SchedulerOptions,
    Task,
)
from registry_client.download.transfer import (
    RangeReader,
    RawResponse,
    UnreadableHead,
    proxied,
    shutdown,
)
from registry_client.errors import (
    ProtocolError,
    RangeNotSatisfiable,
    RegistryError,
    TransferError,
)
from registry_client.retry import TRANSIENT_STATUSES, parse_retry_after

__all__ = ["BlobJob", "DownloadOptions", "Downloader", "FrontierCallback", "InternalError",
           "chunk_size_for"]

log = logging.getLogger("blobctl.download")

MiB = 1 << 20


# A batch still unfilled after this long is accounted as far as it got (a slow
# connection's rate shows, and the rest of its range can be split off).
REPORT_SECONDS = 0.25
MIN_BATCH = 16 * 1024
PAGE = 4096
# the schedule walks the window's chunks under its lock: tiny fixed chunks (--chunk-size
# 4K) get a window of at most this many
MAX_WINDOW_CHUNKS = 4096
# a pull of this many blobs or more opens their ingests this many at a time
PREPARE_PARALLEL_FROM = 8
PREPARE_THREADS = 8
HASH_READ = 1 * MiB  # the hasher reads chunks back (from the page cache) this much at a time


class InternalError(BlobctlError):
    """The engine found its own state inconsistent (a bug). Never a network condition.
    The schedule's state is logged at DEBUG (``--debug``)."""


@dataclass(frozen=True)
class DownloadOptions:
    connections: int = 16             # fixed count, or the ceiling when ``adaptive``
    adaptive: bool = False            # grow from ``start_connections`` while it pays
    start_connections: int = 16
    window_bytes: int = 192 * MiB     # fetched ahead of the hash frontier (page cache)
    min_chunk: int = 1 * MiB
    max_chunk: int = 8 * MiB
    min_steal: int = 64 * 1024
    steal_age: float = 0.15
    steal_eta: float = 0.4
    stall_timeout: float = 30.0
    connect_timeout: float = 15.0
    checkpoint_interval: float = 5.0  # durable (fdatasync) checkpoints; light ones per chunk
    batch: int = 512 * 1024           # bytes received per write + account round
    # RangeReader for range bodies where it applies; BLOBCTL_RANGE_READER=httpx turns it
    # off (a diagnostic switch, and the bench's comparison)
    fast_path: bool = field(
        default_factory=lambda: os.environ.get("BLOBCTL_RANGE_READER", "") != "httpx")


FrontierCallback = Callable[["BlobJob", int], None]


@dataclass(eq=False)
class BlobJob:
    """One blob to fetch into the store (``url``: fetch from there, not the registry)."""

    name: ModelName
    digest: Digest
    size: int
    url: str | None = None
    # progress (read by the progress reporter)
    completed: int = 0
    status: str = "pending"   # pending, downloading, verifying, done, failed
    resumed_bytes: int = 0
    fetched_bytes: int = 0    # bytes received over the network in this run
    disk_read_bytes: int = 0  # bytes the hasher read back from storage, not the page cache
    ranges_moved: int = 0     # ranges moved off a connection far slower than the others
    error: BaseException | None = None
    # internals
    plan: Plan | None = None
    ingest: ResumableIngest | None = None
    hasher: Hasher | None = None
    source: str = ""          # the URL for messages (no query, no userinfo)
    fast: tuple[httpx.URL, str | None] | None = None  # where RangeReader may go, with auth
    fast_refused: bool = False  # RangeReader met a head it cannot read: httpx only
    restarted: bool = False   # resumed bytes did not verify: fetched again from scratch
    # a delta (registry_client.delta): writes reused byte ranges into the fresh or adopted
    # ingest before anything is fetched and returns them (sorted, disjoint)
    seed: Callable[[ResumableIngest], list[tuple[int, int]]] | None = None
    reused_bytes: int = 0     # written by ``seed`` (not fetched, not resumed)
    # the server is known to ignore Range (a probe got the whole file): one stream from
    # byte 0 at once, not ranges it would answer with the whole file again (unless every
    # byte is on disk already)
    single: bool = False

    # Called from the engine's threads with ``n`` whenever the hash frontier moves: the
    # first ``n`` bytes are written to :attr:`data_path` and hashed. ``n == size`` only
    # once the digest is verified: first while the bytes are still at :attr:`data_path`
    # (``status == "verifying"``), again after the commit (``status == "done"``: they are
    # then at the store's blob path).
    # The frontier moves back (or the data path changes) only when the download starts
    # over. Must be quick and must not raise (see spec/pull.md, "Hash frontier").
    on_frontier: FrontierCallback | None = None

    @property
    def data_path(self) -> Path | None:
        """The file the blob's bytes are written to while it downloads (None before)."""
        return None if self.ingest is None else self.ingest.data_path


def _join(threads: list[threading.Thread], seconds: float) -> None:
    """Join ``threads`` within one shared deadline."""
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


def _cpu_busy(prev: list[int]) -> float:
    """The machine's CPU busy share since the last call (``prev`` carries the counters;
    0 where /proc/stat is unreadable)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields)
    if not prev:
        prev[:] = [idle, total]
        return 0.0
    d_idle, d_total = idle - prev[0], total - prev[1]
    prev[:] = [idle, total]
    return 1.0 - d_idle / d_total if d_total > 0 else 0.0


class _Abort(Exception):
    """Stop: another worker failed or the run was interrupted."""


class _StorageReads:
    """The calling thread's bytes read from storage so far (Linux ``/proc/thread-self/io``
    ``read_bytes``: reads the page cache served do not count). Made in the thread it
    measures; reading it is one ``pread``. None where the kernel does not tell."""

    def __init__(self) -> None:
        try:
            self._fd = os.open("/proc/thread-self/io", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            self._fd = -1

    def __call__(self) -> int | None:
        if self._fd < 0:
            return None
        try:
            for line in os.pread(self._fd, 4096, 0).splitlines():
                if line.startswith(b"read_bytes:"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _drop_connection(resp: httpx.Response) -> bool:
    """Break off the connection ``resp`` is read from, from another thread: a reader
    blocked on it wakes at once. False if there is no socket to shut down."""
    stream = resp.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if not isinstance(sock, socket.socket):
        return False
    shutdown(sock)
    return True


def _check_total(job: BlobJob, content_range: str) -> None:
    """A ``Content-Range`` whose complete length is not the blob's size: the file at the
    URL is another size than the manifest or listing says, on every try, so SizeMismatch
    (exit 5) at once (found from outside: an HF listing giving more bytes than the file
    has was retried 8 times and ended as a network error, exit 6)."""
    _, _, total = content_range.rpartition("/")
    if total.isascii() and total.isdigit() and int(total) != job.size:
        raise SizeMismatch(str(job.digest), job.size, int(total), source=job.source)


# Values a server may put in Content-Encoding for bytes it did not encode (``none``,
# ``binary``, ``utf-8``: S3 objects uploaded with such metadata): plain, as for httpx
# (found by review: such a file fetched before the check came, and failed after it).
# Anything else (gzip, br, zstd, xz, …) changes the bytes.
_PLAIN = frozenset({"", "identity", "none", "binary", "utf-8", "utf8", "7bit", "8bit"})


def compressed(coding: str) -> bool:
    """Whether a ``Content-Encoding`` value says the body is not the file's own bytes."""
    return any(c.strip().lower() not in _PLAIN for c in coding.split(","))


def check_identity(headers: Mapping[str, str], what: str, url: str) -> None:
    """ProtocolError (exit 6, not retried: the server answers the same every time) for a
    response whose body is encoded (``Content-Encoding`` other than ``identity``)
    although ``Accept-Encoding: identity`` was asked: its bytes are not the file's, and a
    range of a compressed stream cannot be decoded on its own. Found from outside: such
    ranges were written to disk compressed, ~100 retries of "body ended after N bytes",
    then a digest mismatch (exit 5) that blamed the data."""
    coding = headers.get("content-encoding", "").strip()
    if compressed(coding):
        raise ProtocolError(
            f"{what}: the server sent the body encoded (Content-Encoding: {coding[:40]}) "
            "although blobctl asked for it unencoded (Accept-Encoding: identity)", url=url,
            hint="the server (or a proxy in between) compresses what it sends; blobctl "
                 "needs the file's own bytes to verify them")


def _check_length(job: BlobJob, headers: httpx.Headers) -> None:
    """A whole (200) response whose ``Content-Length`` is not the blob's size (and whose
    body is not encoded): the same as :func:`_check_total`."""
    length = headers.get("content-length", "")
    if (not compressed(headers.get("content-encoding", "")) and length.isascii()
            and length.isdigit()
            and int(length) != job.size):
        raise SizeMismatch(str(job.digest), job.size, int(length), source=job.source)


class _IterReader:
    """``readinto`` over an httpx body iterator (the fallback data path)."""

    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self._it = resp.iter_raw()
        self._left = memoryview(b"")

    def readinto(self, view: memoryview) -> int:
        while not self._left:
            try:
                self._left = memoryview(next(self._it))
            except StopIteration:
                return 0
        n = min(len(view), len(self._left))
        view[:n] = self._left[:n]
        self._left = self._left[n:]
        return n

    def finish(self) -> None:
        """If every byte of the body was read, let the iterator see the end of the
        message, so the connection goes back to the pool for the next blob (closing a
        response whose end was not seen drops it: two new connections a blob, with the
        size check's HEAD, on a model of many small layers). A body not read whole (its
        rest was moved to another connection) is left alone."""
        length = self._resp.headers.get("content-length", "")
        if (self._left or not length.isdigit()
                or self._resp.num_bytes_downloaded < int(length)):
            return
        with contextlib.suppress(StopIteration, httpx.HTTPError):
            next(self._it)



@dataclass(frozen=True)
class _Retry:
    """Why a piece stopped early, and how the retry should wait."""

    reason: str
    retry_after: float | None = None
    protocol: bool = False  # the server broke the protocol (not a network failure)


_Outcome = _Retry | None  # None: the piece's bytes are all written (or taken away)


def chunk_size_for(o: DownloadOptions, size: int) -> int:
    """The range chunk size for a blob of ``size`` bytes (spec/pull.md, "Chunks").

    The window spread over 1.5 chunks per connection, within ``[min_chunk, max_chunk]``,
    gives the most a chunk may hold and so the count; the chunks are then evened out
    (the last one is not a sliver; none is under half the floor), and their size is
    never a page multiple, unless it is fixed (``min_chunk == max_chunk``) or the blob
    is one chunk."""
    n = min(o.start_connections, o.connections) if o.adaptive else o.connections
    want = o.window_bytes // max(1, int(n * 1.5))
    most = max(o.min_chunk, min(o.max_chunk, want, max(o.min_chunk, size)))
    if most >= size or o.min_chunk == o.max_chunk:
        return most
    # Never a page multiple, on purpose: measured on the development machine (Linux
    # 6.18, ext4, preallocated file), 64 KiB-aligned chunks doubled a 1 GiB pull's system
    # time (2.0-2.3 s vs 1.0-1.1 s; 8 MiB chunks: 2.4-3.0 s vs 1.0-1.1 s), most likely
    # because large page-cache folios come from memory the VM had handed back to its host.
    count = -(-size // most)
    chunk = -(-size // count)
    if chunk % PAGE == 0 and chunk == most:  # all but the last at the most: one more
        count += 1
        chunk = -(-size // count)
    if chunk % PAGE == 0:  # the same count, one byte more each (still <= most)
        chunk += 1
    return chunk


class Downloader:
    """Downloads a set of blobs with one pool of workers into the store's ingest area."""

    def __init__(self, client: RegistryClient, layout: Layout, lease: Lease,
                 opts: DownloadOptions | None = None) -> None:
        self.client = client
        self.layout = layout
        self.lease = lease
        self.opts = opts or DownloadOptions()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._hash_cv = threading.Condition(self._lock)
        self._sched = Schedule()
        self._jobs: list[BlobJob] = []
        self._by_plan: dict[int, BlobJob] = {}
        self._local = threading.local()  # per worker thread: its receive buffer
        # how to drop the connection a live piece's body is read from (to move a laggard;
        # True if there was one to drop)
        self._drops: dict[Piece, Callable[[], bool]] = {}
        self._failed: BaseException | None = None
        self._stop = threading.Event()  # set with _failed: sleeping workers wake at once
        # set once every job is done or failed: the watcher (run's own thread) returns at
        # once, not at its next tick (that was 50 ms a pull on average, up to 0.1 s)
        self._ended = threading.Event()
        self._hasher_busy = False
        self._idle = 0  # workers waiting for something to fetch (a probe needs one)
        self._target = self.opts.connections
        self._reader = RangeReader(insecure=client.insecure, ssl_context=client.ssl_context,
                                   connect_timeout=self.opts.connect_timeout,
                                   stall_timeout=self.opts.stall_timeout)

    # ------------------------------------------------------------------ setup
    def _prepare(self, job: BlobJob) -> None:
        """Open (or adopt) the blob's ingest and plan its chunks."""
        url = job.url or self.client.blob_url(job.name, job.digest)
        job.source = _safe(url)
        ingest = self._open_ingest(job)
        job.ingest = ingest
        seeded = job.seed(ingest) if job.seed is not None else None
        parts = ingest.adopted_parts  # written by an earlier run in chunks it left unfinished
        if parts:
            seeded = coalesce([*(seeded or ()), *parts])
        plan = Plan.make(str(job.digest), job.size, ingest.chunk_size, ingest.adopted, seeded)
        job.plan = plan
        in_parts = sum(e - s for s, e in parts)
        job.resumed_bytes = in_parts + sum(c.length for c in plan.chunks
                                           if c.on_disk and (c.start, c.end) in ingest.adopted)
        job.reused_bytes = max(0, sum(c.length if c.on_disk else c.filled for c in plan.chunks
                                      if (c.start, c.end) not in ingest.adopted) - in_parts)
        job.completed = job.resumed_bytes + job.reused_bytes
        job.hasher = job.digest.new_hasher()
        job.status = "downloading"
        self._by_plan[id(plan)] = job
        if job.single and job.completed < job.size:  # (all on disk: only hashed)
            self._sched.go_single(plan)  # (a change of the plan alone)
            job.resumed_bytes = job.reused_bytes = job.completed = 0
        if job.resumed_bytes:
            log.info("resuming %s: %d of %d bytes already here", job.digest.short,
                     job.resumed_bytes, job.size)

    def _open_ingest(self, job: BlobJob) -> ResumableIngest:
        """The blob's ingest, adopting what an earlier run left. A blob of one receive
        batch is not journaled: a kill refetches no more of it than the writes in flight
        a kill loses anyway."""
        return ResumableIngest(self.layout, job.digest, job.size,
                               chunk_size_for(self.opts, job.size), self.lease,
                               journal=job.size > self.opts.batch)

    def _prepare_all(self, jobs: list[BlobJob]) -> None:
        """:meth:`_prepare` every job; several at a time when there are many. Opening an
        ingest is a dozen metadata operations (folder, owner, data, journal, state), each
        a fraction of a millisecond of kernel time here, and a model of 300 small layers
        spent 2 s on them one after another. Raises the first failure in job order, once
        every job was tried (what opened is closed by :meth:`run`)."""
        if len(jobs) < PREPARE_PARALLEL_FROM:
            for job in jobs:
                self._prepare(job)
            return
        with ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="blobctl-open") as ex:
            futures = [ex.submit(self._prepare, job) for job in jobs]
        for f in futures:
            f.result()

    # ------------------------------------------------------------------ run
    def run(self, jobs: list[BlobJob], *, on_tick: Callable[[], object] | None = None) -> None:
        """Download ``jobs`` (already locked by the caller) into the store.

        Raises the first failure after stopping every worker; what was written stays
        resumable. Never waits without progress: a state where nothing can move is an
        :class:`InternalError` at once.
        """
        if not jobs:
            return
        self._jobs = list(jobs)
        threads: list[threading.Thread] = []
        try:
            # one lease rewrite for every blob, not one each as its ingest opens
            self.lease.add(digests={j.digest for j in jobs},
                           ingests={ResumableIngest.key_of(j.digest) for j in jobs})
            self._prepare_all(jobs)
            for job in jobs:
                if job.size == 0:
                    self._commit(job)
            window = min(MAX_WINDOW_CHUNKS, max(2, self.opts.window_bytes // max(1, max(
                (j.plan.chunk_size for j in jobs if j.plan is not None), default=1))))
            self._sched = Schedule(SchedulerOptions(
                window_chunks=window, min_steal=self.opts.min_steal,
                steal_age=self.opts.steal_age, steal_eta=self.opts.steal_eta,
                attempts=self.client.retry.attempts),
                [j.plan for j in jobs if j.plan is not None and j.status != "done"])
            most = max(1, self.opts.connections)
            tuner = None
            if self.opts.adaptive:
                tuner = ConnectionTuner(min(most, self.opts.start_connections), most)
                self._target = tuner.target
            threads = [threading.Thread(target=self._hasher, name="blobctl-hash", daemon=True)]
            threads[0].start()
            self._grow(threads)
            self._watch(threads, on_tick, tuner)
        except BaseException:
            with self._lock:  # stop the workers, then keep what they wrote
                self._fail_locked(_Abort())
            _join(threads, 2.0)
            raise
        finally:
            self._reader.close()
            # A worker still blocked in a read could write through the ingest's fd later:
            # close it only when no thread is left (leaking it is the safe choice).
            gone = not any(t.is_alive() for t in threads)
            for job in self._jobs:
                if job.ingest is not None and job.status != "done":
                    job.ingest.checkpoint()
                    if gone:
                        job.ingest.close()
        if self._failed is not None:
            raise self._failed
        unfinished = [j for j in self._jobs if j.status != "done"]
        if unfinished:
            raise InternalError(f"download of {unfinished[0].digest.short} did not finish")

    def _watch(self, threads: list[threading.Thread], on_tick: Callable[[], object] | None,
               tuner: ConnectionTuner | None) -> None:
        """The caller's thread: ticks, checkpoints, tuning and the no-progress watchdog."""
        last_ckpt = time.monotonic()
        cpu: list[int] = []
        _cpu_busy(cpu)
        while True:
            self._ended.wait(0.1)
            now = time.monotonic()
            if on_tick is not None:
                on_tick()
            with self._lock:
                if self._failed is not None or self._all_done():
                    break
                try:
                    self._sched.check()
                except ScheduleError as exc:
                    log.debug("download state:\n%s", self._sched.describe())
                    self._fail_locked(InternalError(f"download schedule broken: {exc}"))
                    break
                stuck = self._sched.stalled(self._hasher_busy)
                if stuck:
                    log.debug("download state:\n%s", self._sched.describe())
                    self._fail_locked(InternalError(
                        f"internal error: download of {stuck[0].key} cannot progress "
                        "(nothing in flight, nothing pending); rerun to resume, and report "
                        "this with --debug output"))
                    break
                fetched = sum(j.fetched_bytes for j in self._jobs)
                self._move_laggards(now)
            if tuner is not None and not tuner.settled:
                busy = _cpu_busy(cpu) if now - tuner.last_sample >= tuner.period else 0.0
                target = tuner.sample(now, fetched, busy)
                if target != self._target:
                    log.debug("connections: %d -> %d", self._target, target)
                    with self._lock:
                        self._target = target
                        self._work.notify_all()  # workers past the target leave
                    self._grow(threads)
            if now - last_ckpt >= self.opts.checkpoint_interval:
                last_ckpt = now
                for job in self._jobs:
                    if job.status == "downloading" and job.ingest is not None:
                        job.ingest.checkpoint()
        _join(threads, 2.0)

    def _move_laggards(self, now: float) -> None:
        """Under the lock: drop the connections of ranges to move off a slow connection
        (spec/pull.md, "Laggards") and mark them; with none to move on evidence and a
        worker idle, a probe (:meth:`Schedule.probe`). Under the lock, so a drop never
        reaches a connection its range has let go of (``_stream`` unregisters under it);
        only a range whose connection was dropped is marked."""
        moves = [(plan, piece, False) for plan, piece in self._sched.laggards(now)]
        if not moves and self._idle:
            found = self._sched.probe(now)
            if found is not None:
                moves.append((*found, True))
        for plan, piece, probe in moves:
            drop = self._drops.get(piece)
            if drop is None or not drop():
                continue
            job = self._by_plan[id(plan)]
            piece.moving = True
            piece.probe = probe
            piece.moves += 1
            job.ranges_moved += 1
            log.info("blob %s bytes %d-%d: %s on this connection; moving them to another%s",
                     job.digest.short, piece.pos, piece.limit,
                     "no byte yet" if piece.pos == piece.first
                     else f"{max(piece.recent, piece.rate(now)) / 1024:.1f} KiB/s lately",
                     " (nothing faster in reach: a probe)" if probe else "")

    def _grow(self, threads: list[threading.Thread]) -> None:
        """Start workers up to the target count (only as many threads as connections: an
        idle thread would still wake on every notification)."""
        alive = {t.name for t in threads if t.is_alive()}
        for i in range(self._target):
            name = f"blobctl-dl-{i}"
            if name not in alive:
                t = threading.Thread(target=self._worker_main, args=(i,), daemon=True, name=name)
                threads.append(t)
                t.start()

    def _all_done(self) -> bool:
        return all(j.status in ("done", "failed") for j in self._jobs)

    def _fail_locked(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = exc
            self._stop.set()
            self._ended.set()
            self._reader.abort()  # workers blocked in a read wake now, not at a timeout
            for drop in self._drops.values():  # (bodies read through httpx too)
                drop()
        self._work.notify_all()
        self._hash_cv.notify_all()

    def _fail(self, job: BlobJob | None, exc: BaseException) -> None:
        with self._lock:
            if job is not None:
                job.status = "failed"
                job.error = exc
                if job.plan is not None:
                    job.plan.failed = True
            self._fail_locked(exc)

    # ------------------------------------------------------------------ workers
    def _worker(self, index: int) -> None:
        while True:
            with self._lock:
                while True:
                    if self._failed is not None or self._all_done() or index >= self._target:
                        return
                    now = time.monotonic()
                    task = self._sched.next_task(now)
                    if task is not None:
                        break
                    due = self._sched.next_due(now)
                    self._idle += 1
                    try:
                        self._work.wait(0.25 if due is None else min(0.25, max(0.001, due)))
                    finally:
                        self._idle -= 1
            job = self._by_plan[id(task.plan)]
            try:
                if task.piece is None:
                    self._fetch_single(job, task)
                else:
                    self._fetch_piece(job, task.plan, task.piece)
            except _Abort:
                return
            except BaseException as exc:  # noqa: BLE001  (thread boundary: re-raised by run())
                self._fail(job, exc)
                return

    def _worker_main(self, index: int) -> None:
        try:
            self._worker(index)
        finally:
            reads: _StorageReads | None = getattr(self._local, "reads", None)
            if reads is not None:  # (made when this worker hashed a blob of one chunk)
                reads.close()

    def _fetch_piece(self, job: BlobJob, plan: Plan, piece: Piece) -> None:
        self._local.claim = None
        try:
            outcome = self._transfer(job, plan, piece)
        except BaseException:
            with self._lock:
                self._sched.release(plan, piece, time.monotonic())
                self._work.notify_all()
            raise  # (a hash this piece claimed goes with the pull, which is failing)
        # A blob of one chunk this piece completed, claimed when its last byte was
        # accounted: hashed and committed here, after the piece is let go.
        claimed: Chunk | None = self._local.claim
        self._local.claim = None
        with self._lock:
            now = time.monotonic()
            if outcome is None and piece.pos >= piece.limit:
                self._sched.release(plan, piece, now)
                self._work.notify()  # (a one-stream task may have become free)
                fails = 0
            else:
                why = outcome or _Retry(
                    f"connection closed after {piece.pos - piece.first} bytes of the range")
                delay = self.client.retry.delay(piece.fails + 1, why.retry_after)
                start, last = piece.pos, piece.limit - 1
                fails = self._sched.release(plan, piece, now, delay)
                self._work.notify()  # one range is pending again
                if self._failed is not None:
                    # the pull is stopping (another failure, Ctrl-C) and broke this
                    # connection off on purpose: no retry to announce
                    raise _Abort
        if claimed is not None:
            if self._failed is not None:
                raise _Abort  # nothing is committed once the pull stops
            reads: _StorageReads | None = getattr(self._local, "reads", None)
            if reads is None:
                reads = self._local.reads = _StorageReads()
            self._hash_chunk(job, plan, claimed, self._batch_buffer(), reads)
        if not fails:
            return
        if fails >= self.client.retry.attempts:
            cls = ProtocolError if why.protocol else TransferError
            raise cls(f"blob {job.digest.short}: bytes {start}-{last} failed {fails} times "
                      f"({why.reason})", url=job.source)
        log.warning("retry %d/%d of blob %s bytes %d-%d in %.2fs: %s", fails,
                    self.client.retry.attempts - 1, job.digest.short, start, last, delay,
                    why.reason)

    def _transfer(self, job: BlobJob, plan: Plan, piece: Piece) -> _Outcome:
        """Fetch ``piece``; None when its bytes are all written (or it was taken away)."""
        whole = plan.size <= plan.chunk_size and piece.pos == 0 and piece.limit == plan.size
        fast = job.fast
        raw: RawResponse | None = None
        if fast is not None and not whole:
            url, auth = fast
            try:
                raw = self._reader.get(url, piece.pos, piece.limit, auth)
            except UnreadableHead as exc:  # httpx decides, for this blob from now on
                log.debug("%s: the range reader cannot read a response head (%s): httpx "
                          "fetches this blob's ranges", job.digest.short, exc)
                job.fast, job.fast_refused = None, True
            except OSError as exc:
                return _Retry(f"{type(exc).__name__}: {exc}")
        if raw is not None:
            with raw:
                if raw.status == 206 and raw.plain:
                    bad = self._bad_range(job, plan, piece,
                                          raw.headers.get("content-range", ""))
                    return bad or self._stream(job, plan, piece, raw.readinto, raw.abort)
                if raw.status == 200 and raw.plain:
                    self._go_single(job, plan)
                    return None
                if raw.status in TRANSIENT_STATUSES:
                    return _Retry(f"HTTP {raw.status}",
                                  parse_retry_after(raw.headers.get("retry-after")))
            job.fast = None  # a redirect, auth, another status: httpx decides (and re-learns)
        try:
            with self.client.open_blob(job.name, job.digest, None if whole else piece.pos,
                                       None if whole else piece.limit, url=job.url,
                                       attempts=1) as resp:
                if resp.status_code in (200, 206):
                    check_identity(resp.headers, f"blob {job.digest.short}", job.source)
                if resp.status_code == 200 and not whole:
                    self._go_single(job, plan)
                    return None
                if resp.status_code == 200:
                    _check_length(job, resp.headers)
                if resp.status_code == 206:
                    bad = self._bad_range(job, plan, piece,
                                          resp.headers.get("content-range", ""))
                    if bad:
                        return bad
                elif resp.status_code != 200:
                    raise ProtocolError(f"blob {job.digest.short}: unexpected status "
                                        f"{resp.status_code}", url=job.source)
                if (self.opts.fast_path and not job.fast_refused
                        and resp.url.scheme in ("http", "https") and not proxied(resp.url)):
                    job.fast = (resp.url, resp.request.headers.get("authorization"))
                body = _IterReader(resp)
                outcome = self._stream(job, plan, piece, body.readinto,
                                       lambda: _drop_connection(resp))
                if outcome is None:
                    body.finish()
                return outcome
        except httpx.TransportError as exc:
            return _Retry(f"{type(exc).__name__}: {exc}")
        except RangeNotSatisfiable as exc:  # (`bytes */TOTAL`: the file is shorter; the
            _check_total(job, exc.content_range)  # check used to sit where no 416 came)
            raise
        except RegistryError as exc:
            if isinstance(exc, TransferError) or exc.status in TRANSIENT_STATUSES:
                return _Retry(str(exc), exc.retry_after)
            raise

    def _bad_range(self, job: BlobJob, plan: Plan, piece: Piece, value: str) -> _Outcome:
        """None if ``Content-Range`` starts where asked; else a retryable reason. A range
        that ends sooner than asked (a server may send less, some cap a response's size)
        shortens the piece to it, and the rest is due again at once: not a failure."""
        _check_total(job, value)
        try:
            unit, _, rest = value.partition(" ")
            span, _, total = rest.partition("/")
            first, _, last = span.partition("-")
            ok = (unit == "bytes" and int(first) == piece.pos and int(last) >= int(first)
                  and (total == "*" or int(total) == job.size))
        except ValueError:
            ok = False
        if ok:
            with self._lock:
                if self._sched.shorten(plan, piece, int(last) + 1, time.monotonic()):
                    self._work.notify()
                    log.debug("%s: the server sent bytes %d-%s of %d-%d", job.digest.short,
                              piece.pos, last, piece.pos, piece.limit - 1)
            return None
        return _Retry(f"asked for bytes {piece.pos}-{piece.limit - 1}, server sent "
                      f"Content-Range {value!r}", protocol=True)

    def _stream(self, job: BlobJob, plan: Plan, piece: Piece,
                readinto: Callable[[memoryview], int], drop: Callable[[], bool]) -> _Outcome:
        """Receive the piece's bytes into the worker's buffer, write and account them, one
        batch at a time. Bytes are accounted only once written; a failure mid-batch
        keeps what arrived before it. ``drop`` breaks the connection off from another
        thread (to move a laggard): the read returns what had arrived, then fails."""
        with self._lock:
            self._drops[piece] = drop
            self._sched.body_started(piece, time.monotonic())
        try:
            return self._stream_batches(job, plan, piece, readinto)
        finally:
            with self._lock:
                self._drops.pop(piece, None)

    def _batch_buffer(self) -> memoryview:
        """This worker thread's receive buffer: one batch, reused (no allocation and no
        page faults per batch)."""
        buf: memoryview | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(self.opts.batch))
        return buf

    def _stream_batches(self, job: BlobJob, plan: Plan, piece: Piece,
                        readinto: Callable[[memoryview], int]) -> _Outcome:
        chunk = piece.chunk
        ingest = job.ingest
        assert ingest is not None
        batch = self.opts.batch
        buf = self._batch_buffer()
        while True:
            with self._lock:
                if self._failed is not None:
                    raise _Abort
                off = piece.pos
                end = self._sched.reserve(piece, batch)
                if end <= off:
                    return None  # all written, or the rest was stolen
            view = buf[:end - off]
            got = 0
            ended = False
            error: BaseException | None = None
            t0 = time.monotonic()
            try:
                while got < len(view):
                    n = readinto(view[got:])
                    if n == 0:
                        ended = True
                        break
                    got += n
                    if got < len(view) and time.monotonic() - t0 >= REPORT_SECONDS:
                        break  # a slow connection: account what came, so its rate shows
            except (OSError, httpx.TransportError) as exc:  # reset, stall (timeout), close
                error = exc
            if got:
                ingest.write_at(view[:got], off)
                ingest.note_written(off, off + got)  # (a crash keeps them: one append)
                claimed = None
                with self._lock:
                    finished = self._sched.account(plan, piece, off + got)
                    job.completed += got
                    job.fetched_bytes += got
                    if finished and len(plan.chunks) == 1 and self._failed is None:
                        # a blob of one chunk: this worker hashes and commits it once the
                        # piece is let go (claimed here, before the hasher could take it),
                        # so the commits of many small blobs run side by side
                        claimed = self._sched.hash_take(plan)
                        self._local.claim = claimed
                    if finished and claimed is None:
                        self._hash_cv.notify()
                if finished and claimed is None:
                    ingest.start_writeback(chunk.start, chunk.end)
            if error is not None:
                return _Retry(f"{type(error).__name__}: {error}")
            if ended:
                return None if piece.pos >= piece.limit else _Retry(
                    f"body ended after {piece.pos - piece.first} bytes of the range")
            # A slow batch: claim about what arrives in REPORT_SECONDS from now on, so idle
            # workers can split the rest off (and show whether another connection is
            # faster); a batch that filled in time doubles the claim back up.
            batch = (min(self.opts.batch, batch * 2) if got == len(view)
                     else min(self.opts.batch, max(MIN_BATCH, got)))

    def _go_single(self, job: BlobJob, plan: Plan) -> None:
        with self._lock:
            if not plan.single:
                log.warning("%s ignores Range requests: downloading %s as one stream",
                            job.source, job.digest.short)
                self._sched.go_single(plan)
                # the stream starts at byte 0 and writes over what was resumed or
                # reused: none of it counts as such (spec/pull.md, "Ranges ignored")
                job.resumed_bytes = job.reused_bytes = 0
                self._work.notify_all()

    def _fetch_single(self, job: BlobJob, task: Task) -> None:
        """One stream from byte 0, hashed as it arrives (retried from scratch)."""
        ingest = job.ingest
        assert ingest is not None
        try:
            for attempt in range(1, self.client.retry.attempts + 1):
                hasher = job.digest.new_hasher()
                got = flushed = 0
                try:
                    with self.client.open_blob(job.name, job.digest, url=job.url,
                                               attempts=1) as resp:
                        check_identity(resp.headers, f"blob {job.digest.short}", job.source)
                        _check_length(job, resp.headers)
                        for block in resp.iter_raw():
                            if self._failed is not None:
                                raise _Abort
                            if got + len(block) > job.size:
                                raise ProtocolError(f"blob {job.digest.short}: server sent "
                                                    f"more than {job.size} bytes",
                                                    url=job.source)
                            ingest.write_at(memoryview(block), got)
                            hasher.update(block)
                            got += len(block)
                            if got - flushed >= WRITEBACK_BYTES:
                                ingest.start_writeback(flushed, got)
                                flushed = got
                            with self._lock:
                                job.completed = got
                                job.fetched_bytes += len(block)
                            if got < job.size:
                                self._frontier(job, got)
                    if got == job.size:
                        break
                    reason = f"stream ended after {got} of {job.size} bytes"
                except httpx.TransportError as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                except RegistryError as exc:
                    if not (isinstance(exc, TransferError) or exc.status in TRANSIENT_STATUSES):
                        raise
                    reason = str(exc)
                if attempt == self.client.retry.attempts:
                    raise TransferError(f"blob {job.digest.short}: {reason}", url=job.source)
                delay = self.client.retry.delay(attempt)
                log.warning("retry %d/%d of blob %s in %.2fs: %s", attempt,
                            self.client.retry.attempts - 1, job.digest.short, delay, reason)
                if self._stop.wait(delay):
                    raise _Abort
            job.hasher = hasher
            self._commit(job)
        finally:
            with self._lock:
                self._sched.release(task.plan, None, time.monotonic())
                task.plan.complete = job.status == "done"

    # ------------------------------------------------------------------ hashing
    def _hasher(self) -> None:
        job: BlobJob | None = None
        buf = memoryview(bytearray(HASH_READ))
        storage_reads = _StorageReads()
        try:
            while True:
                with self._lock:
                    while True:
                        if self._failed is not None or self._all_done():
                            return
                        ready = self._sched.hash_ready()
                        if ready is not None:
                            break
                        self._hash_cv.wait(0.25)
                    plan, chunk = ready
                    self._hasher_busy = True
                    job = self._by_plan[id(plan)]
                self._hash_chunk(job, plan, chunk, buf, storage_reads, hasher=True)
        except BaseException as exc:  # noqa: BLE001  (thread boundary: re-raised by run())
            with self._lock:
                self._hasher_busy = False
            self._fail(job, exc)
        finally:
            storage_reads.close()

    def _hash_chunk(self, job: BlobJob, plan: Plan, chunk: Chunk, buf: memoryview,
                    storage_reads: _StorageReads, *, hasher: bool = False) -> None:
        """Hash ``chunk`` (taken with :meth:`Schedule.hash_ready` or ``hash_take``), move
        the frontier on, and commit the blob when that was its last chunk. ``hasher``:
        called by the hasher thread (which is then no longer busy)."""
        assert job.hasher is not None and job.ingest is not None
        before = storage_reads()  # (what the prefetch reads counts too)
        cold = chunk.on_disk or chunk.seeded  # written before this run
        if cold:  # maybe on disk
            # only: read it, and the next chunk if on disk too, ahead of the hash
            # (hashing 512 MiB from disk here: 0.61-0.64 s against 1.04-1.60 s)
            after_it = (plan.chunks[chunk.index + 1]
                        if chunk.index + 1 < len(plan.chunks) else None)
            ahead = (after_it.end if after_it is not None and after_it.on_disk
                     else chunk.end)
            job.ingest.prefetch(chunk.start, ahead)
        job.ingest.hash_range(job.hasher, chunk.start, chunk.end, buf)
        after = storage_reads()
        if before is not None and after is not None:
            job.disk_read_bytes += after - before
        elif cold:
            job.disk_read_bytes += chunk.length
        with self._lock:
            self._sched.hashed(plan, chunk)
            if hasher:
                self._hasher_busy = False
            complete = plan.complete
            self._work.notify()  # the window moved on by one chunk
        if not complete:
            self._frontier(job, chunk.end)
            return
        try:
            self._commit(job)
        except DigestMismatch:
            if not (job.resumed_bytes or job.reused_bytes) or job.restarted:
                raise
            self._restart(job)

    def _restart(self, job: BlobJob) -> None:
        """Bytes resumed from an earlier run did not verify (that run met a corrupting
        server, say; the ingest is gone): fetch the blob once more from scratch, while the
        other blobs go on. A blob fetched whole in this run that does not verify is the
        server's fault and fails the pull."""
        log.warning("blob %s: bytes %s did not verify; fetching it again from scratch",
                    job.digest.short, "reused from a local blob (delta)" if job.reused_bytes
                    else "resumed from an earlier download")
        ingest = self._open_ingest(job)
        plan = Plan.make(str(job.digest), job.size, ingest.chunk_size, ingest.adopted)
        with self._lock:
            old = job.plan
            assert old is not None
            self._sched.plans[self._sched.plans.index(old)] = plan
            self._by_plan.pop(id(old), None)
            self._by_plan[id(plan)] = job
            job.plan, job.ingest, job.restarted = plan, ingest, True
            job.seed, job.reused_bytes = None, 0
            job.hasher = job.digest.new_hasher()
            job.resumed_bytes = sum(c.length for c in plan.chunks if c.on_disk)
            job.completed = job.resumed_bytes
            job.status = "downloading"
            self._work.notify_all()
        self._frontier(job, 0)

    # ------------------------------------------------------------------ commit
    def _commit(self, job: BlobJob) -> None:
        assert job.hasher is not None and job.ingest is not None
        job.status = "verifying"
        actual = Digest(job.digest.algorithm, job.hasher.hexdigest())
        if actual == job.digest:
            # Every byte is verified: a mirror may send the last ones while the commit
            # makes them durable (fsync + rename), not after it.
            self._frontier(job, job.size)
        job.ingest.commit(actual, source=job.source)
        with self._lock:
            job.status = "done"
            job.completed = job.size
            if job.plan is not None:
                job.plan.complete = True
            if self._all_done():
                self._ended.set()
            self._work.notify_all()
            self._hash_cv.notify_all()
        self._frontier(job, job.size)

    @staticmethod
    def _frontier(job: BlobJob, hashed: int) -> None:
        """Tell ``job.on_frontier`` (if any) that ``hashed`` leading bytes are final."""
        if job.on_frontier is not None:
            job.on_frontier(job, hashed)

