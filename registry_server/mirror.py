"""The pull-through mirror (spec/serve.md, "Mirror").

A miss under a mirrored host goes upstream and lands in the store exactly as
``blobctl pull HOST/ns/repo:tag`` would put it there (``registry_client.pull`` does the
work), so the next request is local. While a blob arrives, clients read it from the
ingest's data file up to the download's hash frontier (``BlobJob.on_frontier``): bytes
are sent only once written and hashed, in order, and the last ones only once the blob's
digest is verified (while the commit makes it durable). A blob whose digest does not
match never reaches its end: the stream raises first.

Threads and what they own:

* **fetch threads** (one per model or blob fetch): run ``pull``/``fetch_blobs`` (whose
  engine runs its own workers and hasher). The hasher reports each blob's frontier to
  its :class:`_Flight`, which wakes the streams waiting on it.
* **the event loop**: :meth:`UpstreamMirror.manifest` and :meth:`UpstreamMirror.blob`
  hand every blocking step (HTTP, disk) to worker threads; a stream waits on a future
  the fetch threads resolve (``call_soon_threadsafe``) once the frontier passes the
  stream's position. A zero-copy route sends :meth:`FlightStream.spans` (file spans up
  to the frontier) with ``sendfile``; others read the spans with ``pread`` in threads.

Single flight: one :class:`_Flight` per blob digest at a time; a second client of the same
missing blob follows the same flight from byte 0 (reading the data file).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from blobstore.digest import Digest
from blobstore.errors import BlobctlError, InvalidInput
from blobstore.manifest import INDEX_MEDIA_TYPES, Manifest
from blobstore.name import DEFAULT_HOST, ModelName
from blobstore.store import Store
from registry_client.client import RegistryClient
from registry_client.download import BlobJob
from registry_client.errors import (
    AuthError,
    ProtocolError,
    RangeNotSatisfiable,
    RateLimited,
    RegistryError,
    RemoteNotFound,
    TransferError,
)
from registry_client.pull import (
    ProgressEvent,
    PullOptions,
    fetch_blobs,
    pull,
    resolve_manifest,
)
from registry_client.retry import RetryPolicy
from registry_server.context import ActivityFeed, MirroredManifest, ServerContext

__all__ = ["FlightStream", "Span", "UpstreamMirror", "mirror_for", "parse_upstream"]

log = logging.getLogger("blobctl.mirror")

BLOCK = 4 << 20          # bytes read back from the data file per yield (no zero-copy)
SPAN = 32 << 20          # most bytes per span a zero-copy route sends in one message
OPEN_GRACE = 5.0         # seconds a stream waits for a data file caught mid-commit
WAKE = 1.0               # a stream re-checks its flight at least this often (seconds)
QUICK_STALL = 10.0       # the stall timeout of requests a client waits on (manifest, HEAD)


def parse_upstream(text: str, *, insecure: bool = False) -> tuple[str, str]:
    """``[HOST=]URL`` (the ``--upstream`` option) -> (mirrored host, base URL).

    Without ``HOST=`` the mirror covers Ollama's default host ``registry.ollama.ai``.
    ``URL`` is ``https://host[:port]`` (an OCI registry's root; ``http://`` only with
    ``insecure``). Raises ``InvalidInput`` with a message for the user.
    """
    host, sep, url = text.partition("=")
    if not sep:
        host, url = DEFAULT_HOST, text
    host = host.strip().lower()
    try:
        u = httpx.URL(url.strip())
    except httpx.InvalidURL as exc:
        raise InvalidInput(f"--upstream {text!r}: not a URL ({exc})") from exc
    if u.scheme not in ("http", "https") or not u.host:
        raise InvalidInput(f"--upstream {text!r}: expected [HOST=]http(s)://HOST[:PORT]")
    if u.scheme == "http" and not insecure:
        raise InvalidInput(f"--upstream {text!r}: plain http needs --insecure-upstream")
    if u.raw_path not in (b"", b"/") or u.query or u.userinfo:
        raise InvalidInput(f"--upstream {text!r}: give the registry's root URL (no path, "
                           "query or credentials; credentials come from the docker config)")
    try:
        ModelName(host, "ns", "model", "latest")
        ModelName(u.netloc.decode("ascii"), "ns", "model", "latest")
    except InvalidInput as exc:
        raise InvalidInput(f"--upstream {text!r}: invalid registry host ({exc})") from exc
    return host, f"{u.scheme}://{u.netloc.decode('ascii')}"


def mirror_for(ctx: ServerContext, options: PullOptions | None = None) -> UpstreamMirror | None:
    """The mirror a server started with ``ctx.options.upstreams`` uses (None: no mirror)."""
    if not ctx.options.upstreams:
        return None
    return UpstreamMirror(ctx.store, ctx.options.upstreams,
                          insecure=ctx.options.insecure_upstream, activity=ctx.activity,
                          count=ctx.count, options=options)


@dataclass(frozen=True)
class _Upstream:
    scheme: str
    netloc: str

    def remote(self, name: ModelName, tag: str | None = None) -> ModelName:
        """``name`` as the upstream registry calls it (its own host)."""
        return ModelName(self.netloc, name.namespace, name.model, tag or name.tag,
                         self.scheme)


class _Flight:
    """One upstream fetch of one blob, followed by any number of streams.

    State changes under ``lock``: ``frontier`` (leading bytes written and hashed; the size
    only once the digest is verified), ``epoch`` (bumped when the download starts over:
    bytes already sent may not match the new ones), ``error``. A waiting stream names the
    position it waits for; the producer wakes only the streams whose wait is over (the
    frontier passed their position, or the fetch failed, ended or started over), one
    ``call_soon_threadsafe`` per event loop and frontier step.
    """

    def __init__(self, store: Store, digest: Digest, size: int) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.lock = threading.Lock()
        self.frontier = 0
        self.epoch = 0
        self.path: Path | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.streams = 0
        self._waiting: set[_Waiter] = set()

    @classmethod
    def stored(cls, store: Store, digest: Digest, size: int, path: Path | None = None
               ) -> _Flight:
        """A flight for a blob already in the store (at ``path``, default its name)."""
        f = cls(store, digest, size)
        f.frontier, f.finished, f.path = size, True, path or store.layout.blob(digest)
        return f

    # -- producer side (fetch threads)
    def on_frontier(self, job: BlobJob, hashed: int) -> None:
        with self.lock:
            # all verified but not yet committed (renamed): still the data file
            landed = hashed >= self.size and job.status == "done"
            path = self.store.layout.blob(self.digest) if landed else job.data_path
            if hashed < self.frontier or (path != self.path and self.path is not None
                                          and hashed < self.size):
                self.epoch += 1  # started over: what streams sent so far is not theirs
            self.frontier, self.path = hashed, path
        self._wake()

    def finish(self, error: BaseException | None) -> None:
        with self.lock:
            if self.finished:
                return
            self.finished = True
            if error is None:
                self.frontier, self.path = self.size, self._landed()
            elif self.frontier < self.size:
                self.error = error
        self._wake()

    def _landed(self) -> Path:
        """Where the blob is once in the store."""
        layout = self.store.layout
        return layout.existing_blob(self.digest) or layout.blob(self.digest)

    def _over(self, w: _Waiter) -> bool:
        """Whether ``w``'s wait is over (call under ``lock``)."""
        return (self.frontier >= w.want or self.epoch != w.epoch or self.error is not None
                or self.finished)

    def _wake(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        with self.lock:
            done = [w for w in self._waiting if self._over(w)]
            for w in done:
                self._waiting.discard(w)
                by_loop.setdefault(w.loop, []).append(w.future)
        for loop, futures in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, futures)

    # -- consumer side
    async def _wait(self, want: int, epoch: int) -> None:
        """Until the frontier reaches ``want`` (or the fetch fails, ends or starts over
        since ``epoch``), at most ``WAKE`` seconds."""
        loop = asyncio.get_running_loop()
        w = _Waiter(loop, loop.create_future(), want, epoch)
        with self.lock:
            if self._over(w):
                return
            self._waiting.add(w)
        timer = loop.call_later(WAKE, _resolve, [w.future])
        try:
            await w.future
        finally:
            timer.cancel()
            with self.lock:
                self._waiting.discard(w)

    async def started(self) -> None:
        """Return once the fetch has its first byte written and hashed (it passed its
        checks, disk space among them, and the upstream answered), or has ended; raise
        TransferError (from the cause) if it failed before that."""
        while True:
            with self.lock:
                frontier, epoch, error, finished = (self.frontier, self.epoch, self.error,
                                                    self.finished)
            if error is not None:
                raise self._failure() from error
            if frontier > 0 or finished:
                return
            await self._wait(1, epoch)

    def _open(self) -> tuple[int, int]:
        """(fd, epoch) of the file the bytes are in (blocking: call in a thread)."""
        with self.lock:
            path, epoch = self.path, self.epoch
        assert path is not None
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        # The commit moves the data file aside, checks it is still the writer's, then
        # renames it into blobs/ (blobstore.ingest): for that instant it is at neither
        # name. Look again for a bounded time; a failed commit puts it back.
        deadline = time.monotonic() + OPEN_GRACE
        while True:
            for candidate in (path, self._landed()):
                try:
                    return os.open(candidate, flags), epoch
                except FileNotFoundError:
                    pass
            if time.monotonic() > deadline:
                raise FileNotFoundError(errno.ENOENT, "mirrored blob's data file vanished",
                                        str(path))
            time.sleep(0.005)

    def _failure(self) -> TransferError:
        cause = self.error
        return TransferError(f"mirror fetch of blob {self.digest.short} failed"
                             + (f": {cause}" if cause is not None else ""))

    def current(self, epoch: int) -> bool:
        """Whether the download is still the one of ``epoch`` (it did not start over)."""
        with self.lock:
            return self.epoch == epoch

    async def spans(self, start: int = 0, end: int | None = None
                    ) -> AsyncGenerator[Span, None]:
        """Bytes ``[start, end)`` (default: all) as file spans, in order, each final
        (written and hashed; the last one only once the digest is verified) when yielded.

        The consumer sends a span before it asks for the next one: the generator then
        checks that the download did not start over meanwhile, and raises TransferError if
        it did (the span may hold the old attempt's bytes) or if the fetch fails. Spans are
        at most ``SPAN`` bytes; the file descriptor stays open until the next step.
        """
        stop = self.size if end is None else min(end, self.size)
        with self.lock:
            self.streams += 1
        fd, seen, pos = -1, -1, start
        try:
            while pos < stop:
                with self.lock:
                    frontier, epoch, error = self.frontier, self.epoch, self.error
                if error is not None:
                    raise self._failure() from error
                if fd >= 0 and epoch != seen:
                    if pos > start:
                        raise self._failure()
                    os.close(fd)  # started over before anything was sent: the new file
                    fd = -1
                if frontier <= pos:
                    await self._wait(pos + 1, epoch)
                    continue
                if fd < 0:
                    fd, seen = await asyncio.to_thread(self._open)
                    continue  # (the epoch may have moved while it opened)
                span = Span(fd, pos, min(frontier, stop, pos + SPAN) - pos, seen)
                yield span
                pos = span.end
                if not self.current(seen):
                    raise self._failure()
        finally:
            with self.lock:
                self.streams -= 1
            if fd >= 0:
                os.close(fd)

    async def stream(self, start: int = 0, end: int | None = None
                     ) -> AsyncGenerator[bytes, None]:
        """The blob's bytes ``[start, end)`` (default: all), each yielded once final, read
        from the spans in ``BLOCK`` pieces in a worker thread; raises TransferError when
        the fetch fails (or starts over after bytes were read)."""
        spans = self.spans(start, end)
        try:
            async for span in spans:
                pos = span.offset
                while pos < span.end:
                    want = min(BLOCK, span.end - pos)
                    data = await asyncio.to_thread(os.pread, span.fd, want, pos)
                    if len(data) != want or not self.current(span.epoch):
                        raise self._failure()
                    pos += want
                    yield data
        finally:
            await spans.aclose()


@dataclass(frozen=True)
class Span:
    """``count`` final bytes of a mirrored blob at ``offset`` of the open file ``fd``
    (valid until the stream takes its next step), read under download ``epoch``."""

    fd: int
    offset: int
    count: int
    epoch: int

    @property
    def end(self) -> int:
        return self.offset + self.count


@dataclass(eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    want: int
    epoch: int


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for f in futures:
        if not f.done():
            f.set_result(None)


class FlightStream:
    """A mirrored blob's bytes ``[start, end)`` as the route receives them: an async
    iterator of ``bytes`` (pread in worker threads), or, for a server with the zero-copy
    extension, :meth:`spans` to send straight from the file. Use one of the two."""

    def __init__(self, flight: _Flight, start: int = 0, end: int | None = None) -> None:
        self._flight, self._start, self._end = flight, start, end
        self._used: AsyncGenerator[Any, None] | None = None

    def narrow(self, start: int, end: int | None) -> FlightStream:
        """The same flight's bytes ``[start, end)`` instead (before any was read)."""
        assert self._used is None, "narrowed after it was read"
        return FlightStream(self._flight, start, end)

    async def started(self) -> None:
        """See :meth:`_Flight.started` (for a route, before it sends a response head)."""
        await self._flight.started()

    def spans(self) -> AsyncGenerator[Span, None]:
        assert self._used is None, "a FlightStream is consumed once"
        self._used = gen = self._flight.spans(self._start, self._end)
        return gen

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._used is None:
            self._used = self._flight.stream(self._start, self._end)
        return await self._used.__anext__()

    async def aclose(self) -> None:
        gen, self._used = self._used, None
        if gen is not None:
            await gen.aclose()


class UpstreamMirror:
    """The :class:`~registry_server.context.Mirror` of ``blobctl serve --upstream``.

    ``upstreams`` maps mirrored hosts to registry base URLs (see :func:`parse_upstream`);
    ``count`` receives the metrics ``mirror_fetches`` (upstream fetches started: manifests
    and blob downloads), ``mirror_shared`` (blob requests that followed a running fetch
    or found the blob landed), ``mirror_errors`` and ``mirror_upstream_bytes`` (the
    routes count ``mirror_hits``/``mirror_misses`` themselves). Thread-safe; the async methods never
    block the event loop.
    """

    def __init__(self, store: Store, upstreams: Mapping[str, str], *, insecure: bool = False,
                 activity: ActivityFeed | None = None,
                 count: Callable[[str, float], None] | None = None,
                 options: PullOptions | None = None) -> None:
        self.store = store
        self._up: dict[str, _Upstream] = {}
        for host, url in upstreams.items():
            u = httpx.URL(url)
            self._up[host.lower()] = _Upstream(u.scheme, u.netloc.decode("ascii"))
        self.options = dataclasses.replace(options or PullOptions(), insecure=insecure)
        self.activity = activity or ActivityFeed()
        self._count = count or (lambda name, value: None)
        # (blob downloads run pull's engine with its own client and pull's retries)
        # for what a client waits on before its first byte (a manifest, a blob's HEAD):
        # two tries of at most QUICK_STALL seconds each, then 502 + Retry-After (found
        # from outside: with pull's policy, an upstream that accepts connections and never
        # answers held the client ~250 s; Ollama gives up after 30 s)
        quick = min(QUICK_STALL, self.options.stall_timeout)
        self._quick = RegistryClient(
            insecure=insecure, stall_timeout=quick, connect_timeout=quick,
            retry=RetryPolicy(attempts=2, base_delay=0.25, max_delay=1.0,
                              unreachable_attempts=2))
        self._lock = threading.Lock()
        self._flights: dict[Digest, _Flight] = {}
        self._models: set[ModelName] = set()
        self._threads: set[threading.Thread] = set()

    def close(self, timeout: float = 0.0) -> None:
        """Stop taking work; wait up to ``timeout`` seconds for running fetches (what they
        leave unfinished stays resumable)."""
        for t in list(self._threads):
            t.join(timeout)
        self._quick.close()

    def wait_idle(self, timeout: float) -> bool:
        """Wait for every fetch started so far to end; False on timeout (for tests and
        shutdown)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            threads[0].join(left)

    # ------------------------------------------------------------------ Mirror
    def covers(self, name: ModelName) -> bool:
        return name.host.lower() in self._up

    async def manifest(self, name: ModelName, reference: str) -> MirroredManifest | None:
        return await asyncio.to_thread(self._manifest, name, reference)

    async def blob(self, name: ModelName,
                   digest: Digest) -> tuple[int, AsyncIterator[bytes]] | None:
        return await self.blob_range(name, digest, 0, None)

    async def blob_range(self, name: ModelName, digest: Digest, start: int,
                         end: int | None) -> tuple[int, AsyncIterator[bytes]] | None:
        """Like :meth:`blob`, for bytes ``[start, end)`` only (``end`` None: to the end;
        the size returned is the whole blob's): a route can answer a ``Range`` request of
        a mirrored blob with ``206`` while it arrives, so a ranged client (blobctl pull,
        Ollama) keeps its parallel connections. Same single flight as :meth:`blob`."""
        flight = self._running(digest) or await asyncio.to_thread(self._blob_flight, name,
                                                                   digest)
        if flight is None:
            return None
        return flight.size, FlightStream(flight, start, end)

    # ------------------------------------------------------------------ manifests
    def _manifest(self, name: ModelName, reference: str) -> MirroredManifest | None:
        """Fetch the manifest upstream; nothing is written, nothing started (the route
        decides on the manifest's own tier first, then calls :meth:`prefetch`)."""
        up = self._up[name.host.lower()]
        by_digest: Digest | None = None
        with contextlib.suppress(ValueError):
            by_digest = Digest.parse(reference)
        remote = up.remote(name)
        self._count("mirror_fetches", 1)
        try:
            raw, media_type = self._quick.get_manifest(remote, reference)
        except RemoteNotFound:
            return None
        except BlobctlError:
            self._count("mirror_errors", 1)
            raise
        digest = Digest.of_bytes(raw, by_digest.algorithm if by_digest else "sha256")
        if by_digest is not None and digest != by_digest:
            self._count("mirror_errors", 1)
            raise ProtocolError(f"upstream manifest {reference} of {name} does not match "
                                "its digest", url=self._quick.manifest_url(remote, reference))
        return MirroredManifest(name, digest, media_type, raw, reference)

    async def prefetch(self, got: MirroredManifest) -> None:
        await asyncio.to_thread(self._prefetch, got)

    def _prefetch(self, got: MirroredManifest) -> None:
        name, reference, raw = got.name, got.reference or got.name.tag, got.body
        up = self._up[name.host.lower()]
        by_digest: Digest | None = None
        with contextlib.suppress(ValueError):
            by_digest = Digest.parse(reference)
        is_index = got.media_type in INDEX_MEDIA_TYPES or (b'"manifests"' in raw
                                                           and b'"config"' not in raw)
        target: ModelName | None = None
        if by_digest is None:
            with contextlib.suppress(InvalidInput):  # an OCI tag Ollama names cannot hold
                target = ModelName(name.host, name.namespace, name.model, reference,
                                   name.scheme)
        try:
            if target is not None:
                image = (resolve_manifest(self._quick, up.remote(name, reference), self.options)
                         if is_index else Manifest.decode(raw))
                self._start_model(up.remote(name, reference), target, image)
            elif not is_index:  # by digest (or a tag no store name holds): its blobs only
                image = Manifest.decode(raw)
                for desc in image.descriptors:
                    self._start_blob(up.remote(name), desc.digest, desc.size)
        except BlobctlError as exc:  # the manifest is served; its blobs come on request
            log.warning("mirror: cannot prefetch the blobs of %s: %s", name, exc)

    def _start_model(self, remote: ModelName, target: ModelName, image: Manifest) -> None:
        """Pull ``remote`` into the store as ``target`` in the background (once at a time
        per name), each missing blob a flight streams can follow."""
        with self._lock:
            if target in self._models:
                return
            mine: dict[Digest, _Flight] = {}
            for desc in image.descriptors:
                d = desc.digest
                if d in mine or d in self._flights or self.store.has_blob(d):
                    continue  # present, or another fetch has it (pull waits for its lock)
                mine[d] = self._flights[d] = _Flight(self.store, d, desc.size)
            self._models.add(target)
        total = sum(desc.size for desc in image.descriptors)
        act = self.activity.start("mirror", str(target), total)

        def on_frontier(job: BlobJob, hashed: int) -> None:
            f = mine.get(job.digest)
            if f is not None:
                f.on_frontier(job, hashed)

        done: dict[str, int] = {}

        def progress(ev: ProgressEvent) -> None:
            if "digest" in ev and "completed" in ev:
                done[ev["digest"]] = int(ev["completed"])
                self.activity.update(act, done=sum(done.values()))

        def run() -> None:
            error: BaseException | None = None
            try:
                res = pull(remote, store=self.store, store_as=target, manifest=image,
                           progress=progress,
                           options=dataclasses.replace(self.options, on_frontier=on_frontier))
                self._count("mirror_upstream_bytes", res.bytes_fetched)
                log.info("mirror: %s stored (%d bytes fetched)", target, res.bytes_fetched)
            except BaseException as exc:  # noqa: BLE001  (thread boundary: told to the streams)
                error = exc
                self._count("mirror_errors", 1)
                log.warning("mirror: pull of %s failed: %s", target, exc)
            finally:
                self._land(mine, error)
                with self._lock:
                    self._models.discard(target)
                self.activity.end(act, "" if error is None else str(error))

        self._spawn(run, f"mirror {target}")

    # ------------------------------------------------------------------ blobs
    def _running(self, digest: Digest) -> _Flight | None:
        """The running fetch of ``digest`` to follow, if any (never blocks: the event
        loop asks this first and goes to a thread only for a new flight)."""
        with self._lock:
            f = self._flights.get(digest)
        if f is not None and f.error is None:  # (a failed one is on its way out)
            self._count("mirror_shared", 1)
            return f
        return None

    def _blob_flight(self, name: ModelName, digest: Digest) -> _Flight | None:
        f = self._running(digest)
        if f is not None:
            return f
        landed = self.store.layout.existing_blob(digest)  # since the route looked
        if landed is not None:
            with contextlib.suppress(FileNotFoundError):
                size = landed.stat().st_size
                self._count("mirror_shared", 1)
                return _Flight.stored(self.store, digest, size, landed)
        remote = self._up[name.host.lower()].remote(name)
        try:
            upstream = self._upstream_size(remote, digest)
        except RegistryError:
            # the upstream is down or failing: not "no such blob" (a 404 tells clients
            # the blob does not exist; found from outside), the route answers 502
            self._count("mirror_errors", 1)
            raise
        if upstream is None:
            return None
        return self._start_blob(remote, digest, upstream)

    def _upstream_size(self, remote: ModelName, digest: Digest) -> int | None:
        """The blob's size upstream, or None when the upstream has no such blob; raises
        RegistryError when the upstream cannot tell (down, failing, refusing us).

        ``HEAD`` first. As for pull (spec/pull.md, "Order of a pull", step 5) an answer
        without a size is only a hint: a 401/403 from another origin a redirect led to
        (a presigned URL signs the method: S3 and R2 refuse ``HEAD`` on a URL made for
        ``GET``), a 404, a 405, another 4xx or 5xx, or no ``Content-Length``. Then one
        ``GET`` of byte 0 asks again, and its answer counts (found from outside: every
        blob miss behind such storage was a 502, and a 405 a 404). An upstream that
        cannot be reached, stalls or rate-limits us, or a 401/403 of its own origin,
        raises at once (a second request would only make the client wait longer).
        """
        what = f"blob {digest.short}"
        try:
            resp = self._quick.request("HEAD", self._quick.blob_url(remote, digest),
                                       scope=self._quick.scope(remote), what=what)
        except (TransferError, RateLimited, ProtocolError, AuthError):
            raise  # (a refusal by storage a redirect led to is no AuthError: below)
        except RegistryError as exc:
            log.debug("mirror: HEAD of %s answered %s: asking with GET", what, exc.status)
        else:
            resp.close()
            length = resp.headers.get("content-length", "")
            if length.isascii() and length.isdigit():
                return int(length)
        try:
            with self._quick.open_blob(remote, digest, 0, 1) as got:
                total = (got.headers.get("content-range", "").rpartition("/")[2]
                         if got.status_code == 206 else got.headers.get("content-length", ""))
                url = str(got.request.url).partition("?")[0]
        except RemoteNotFound:
            return None
        except RangeNotSatisfiable as exc:  # an empty blob has no byte 0: "bytes */0"
            total, url = exc.content_range.rpartition("/")[2], exc.url or ""
        if total.isascii() and total.isdigit():
            return int(total)
        raise ProtocolError(f"{what}: neither HEAD nor GET tells its size", url=url)

    def _start_blob(self, remote: ModelName, digest: Digest, size: int) -> _Flight:
        with self._lock:
            f = self._flights.get(digest)
            if f is not None and f.error is None:
                return f
            if self.store.has_blob(digest):
                return _Flight.stored(self.store, digest, size)
            f = self._flights[digest] = _Flight(self.store, digest, size)
        self._count("mirror_fetches", 1)
        act = self.activity.start("mirror", f"{remote.repository}@{digest.short}", size)

        def progress(ev: ProgressEvent) -> None:
            if ev.get("digest") == str(digest) and "completed" in ev:
                self.activity.update(act, done=int(ev["completed"]))

        def run() -> None:
            error: BaseException | None = None
            try:
                res = fetch_blobs(remote, {digest: size}, store=self.store, progress=progress,
                                  options=dataclasses.replace(self.options,
                                                              on_frontier=f.on_frontier))
                self._count("mirror_upstream_bytes", res.bytes_fetched)
            except BaseException as exc:  # noqa: BLE001  (thread boundary: told to the streams)
                error = exc
                self._count("mirror_errors", 1)
                log.warning("mirror: fetch of blob %s failed: %s", digest.short, exc)
            finally:
                self._land({digest: f}, error)
                self.activity.end(act, "" if error is None else str(error))

        self._spawn(run, f"mirror {digest.short}")
        return f

    def _land(self, flights: Mapping[Digest, _Flight], error: BaseException | None) -> None:
        """A fetch ended: tell its flights (a blob in the store counts as done whatever
        the fetch's outcome) and let the next request start afresh."""
        for d, f in flights.items():
            f.finish(None if self.store.has_blob(d) else
                     error or TransferError(f"blob {d.short} was not fetched"))
        with self._lock:
            for d, f in flights.items():
                if self._flights.get(d) is f:
                    del self._flights[d]

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        def body() -> None:
            try:
                target()
            finally:
                with self._lock:
                    self._threads.discard(t)

        t = threading.Thread(target=body, name=name, daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()
