"""``pull()``: fetch a model into a store (spec/pull.md).

Order of events, each step safe to interrupt:

1. fetch the manifest (raw bytes kept; an index is resolved to the ``linux/<arch>``
   entry); validate every descriptor;
2. take a lease on every digest the manifest names (GC keeps them from now on);
3. skip blobs the store already has (dedupe); check free space; cross-check sizes with
   ``HEAD``;
4. take each missing blob's download lock (another process pulling the same blob is
   waited for, then its blob is reused); download what is ours (``download.py``);
5. write the manifest, last and atomically, only once every blob is present;
6. record a use, and apply the store's ``max-size`` setting (``blobctl config``).
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock

from blobstore.digest import Digest
from blobstore.errors import (
    BlobctlError,
    InsufficientSpace,
    InvalidManifest,
    InvalidName,
    InvalidOption,
    ModelNotFound,
    StoreDamaged,
)
from blobstore.ingest import activity as ingest_activity
from blobstore.ingest import preallocated
from blobstore.layout import file_mode
from blobstore.lease import Lease
from blobstore.manifest import INDEX_MEDIA_TYPES, Index, Manifest
from blobstore.name import ModelName
from blobstore.owner import hand_over, make_dirs
from blobstore.store import Store
from blobstore.units import check_count, check_seconds
from registry_client.client import RegistryClient
from registry_client.download import BlobJob, Downloader, DownloadOptions
from registry_client.download.engine import FrontierCallback
from registry_client.errors import ProtocolError, RemoteNotFound, UnsupportedManifest
from registry_client.retry import RetryPolicy

if TYPE_CHECKING:
    from registry_client.delta.plan import DeltaPlan

__all__ = ["FetchResult", "ProgressEvent", "PullEstimate", "PullOptions", "PullResult",
           "check_bases", "estimate", "fetch_blobs", "pull", "resolve_manifest"]

log = logging.getLogger("blobctl.pull")

ProgressEvent = dict[str, Any]
AUTO_START = 16
AUTO_MAX = 48
# a pull of this many missing blobs or more sends its size-check HEADs this many at a time
HEAD_PARALLEL_FROM = 4
HEAD_THREADS = 8
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class PullOptions:
    insecure: bool = False
    connections: int | None = 16  # None: adaptive (AUTO_START, growing to AUTO_MAX)
    stall_timeout: float = 30.0
    window_bytes: int = 192 << 20  # how far past the hash frontier ranges are fetched
    chunk_size: int | None = None  # fixed range chunk size (default: 1-8 MiB, derived)
    os: str = "linux"
    architecture: str = field(default_factory=lambda: _GOARCH.get(platform.machine().lower(),
                                                                  platform.machine().lower()))
    lock_poll: float = 0.5
    auto_gc: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # each downloaded blob's hash frontier (BlobJob.on_frontier; spec/pull.md, "Hash
    # frontier"): what a pull-through mirror streams from while the blob arrives
    on_frontier: FrontierCallback | None = field(default=None, compare=False)
    delta: bool = True              # reuse chunks of local versions (spec/delta.md)
    base: tuple[str, ...] = ()      # more local models to reuse chunks from (--base)

    def __post_init__(self) -> None:
        """Raises InvalidOption for a value out of range, before any request (found from
        outside: ``chunk_size=0`` and ``stall_timeout=-1`` failed a pull with a
        ValueError from deep inside, ``connections=0`` was taken silently)."""
        check_count("PullOptions", "connections", self.connections, 1, none_ok=True)
        check_seconds("PullOptions", "stall_timeout", self.stall_timeout, positive=True,
                      finite=True)
        check_count("PullOptions", "window_bytes", self.window_bytes, 1)
        check_count("PullOptions", "chunk_size", self.chunk_size, 1, none_ok=True)
        check_seconds("PullOptions", "lock_poll", self.lock_poll, positive=True, finite=True)
        if not isinstance(self.retry, RetryPolicy):
            raise InvalidOption("PullOptions", "retry", self.retry, "a RetryPolicy")

    @property
    def max_connections(self) -> int:
        """The most connections a pull may open (the fixed count, or adaptive's ceiling)."""
        return self.connections or AUTO_MAX

    def download_options(self) -> DownloadOptions:
        """The download engine's options for these pull options."""
        dl = DownloadOptions(connections=self.max_connections,
                             adaptive=self.connections is None, start_connections=AUTO_START,
                             window_bytes=self.window_bytes, stall_timeout=self.stall_timeout)
        if self.chunk_size is not None:
            dl = dataclasses.replace(dl, min_chunk=self.chunk_size, max_chunk=self.chunk_size)
        return dl


@dataclass
class PullResult:
    name: ModelName
    manifest: Manifest
    blobs_total: int = 0
    blobs_present: int = 0        # already in the store (dedupe)
    blobs_fetched: int = 0
    blobs_from_other_process: int = 0
    bytes_fetched: int = 0        # over the network in this run
    bytes_resumed: int = 0        # found in a resumable ingest from an earlier run
    bytes_read_back: int = 0      # read back from disk for hashing
    bytes_reused: int = 0         # copied from a local blob by a delta (spec/delta.md)
    delta_blobs: int = 0          # blobs committed with bytes from a base (spec/delta.md)
    ranges_moved: int = 0         # ranges moved off a connection far slower than the rest
    seconds: float = 0.0


@dataclass
class PullEstimate:
    """What a pull would transfer (``update --dry-run``), decided as the pull decides."""

    name: ModelName
    manifest: Manifest
    blobs_missing: int = 0
    bytes_missing: int = 0        # size of the blobs the store lacks
    bytes_reused: int = 0         # of those, what a delta would copy from local blobs
    delta_blobs: int = 0

    @property
    def bytes_to_fetch(self) -> int:
        return self.bytes_missing - self.bytes_reused


@dataclass
class FetchResult:
    """What :func:`fetch_blobs` did (the blob counters of :class:`PullResult`)."""

    blobs_fetched: int = 0
    blobs_from_other_process: int = 0
    bytes_fetched: int = 0
    bytes_resumed: int = 0
    bytes_read_back: int = 0
    bytes_reused: int = 0
    delta_blobs: int = 0
    ranges_moved: int = 0


def _emit(progress: Callable[[ProgressEvent], None] | None, **event: Any) -> None:
    if progress is not None:
        progress(event)


def resolve_manifest(client: RegistryClient, name: ModelName, opts: PullOptions) -> Manifest:
    """The image manifest ``pull`` would store for ``name`` (an index is resolved to the
    ``opts.os``/``opts.architecture`` entry, whose digest is checked)."""
    raw, media_type = client.get_manifest(name, name.tag)
    source = client.manifest_url(name, name.tag)
    is_index = media_type in INDEX_MEDIA_TYPES or (b'"manifests"' in raw and
                                                   b'"config"' not in raw)
    if is_index:
        try:
            index = Index.decode(raw, source=source)
        except InvalidManifest as exc:  # the registry's answer, as for a manifest below
            raise UnsupportedManifest(f"{name}: {exc.reason}", url=source) from exc
        chosen = index.select(opts.os, opts.architecture)
        if chosen is None:
            platforms = ", ".join(
                f"{d.platform.os}/{d.platform.architecture}" for d in index.manifests
                if d.platform is not None) or "none"
            raise UnsupportedManifest(
                f"{name} has no image for {opts.os}/{opts.architecture} "
                f"(available: {platforms})", url=source)
        try:
            raw, media_type = client.get_manifest(name, str(chosen.digest))
        except RemoteNotFound as exc:
            # the tag is there; the registry lost what its index names (a deleted
            # platform manifest): the registry is broken, not the name (spec/pull.md)
            raise ProtocolError(
                f"{name} is an index whose {opts.os}/{opts.architecture} manifest "
                f"{chosen.digest} is not in the registry", url=source, status=exc.status,
                hint="the registry's index names a deleted manifest: push the tag again"
            ) from exc
        if Digest.of_bytes(raw, chosen.digest.algorithm) != chosen.digest:
            raise ProtocolError(f"manifest {chosen.digest} of {name} does not match its digest",
                                url=source)
    try:
        return Manifest.decode(raw, source=source)
    except InvalidManifest as exc:
        raise UnsupportedManifest(f"{name}: {exc.reason}", url=source) from exc


_resolve_manifest = resolve_manifest  # the old private name (catalog/updates.py uses it)


def check_bases(store: Store, options: PullOptions) -> list[ModelName]:
    """The ``base`` models of ``options`` (``--base``), parsed and found in ``store``, in
    order. Called before any network request (and whether or not a delta will be tried),
    so a mistyped base fails at once: raises ``InvalidName`` for a name off the grammar,
    ``ModelNotFound`` for a model the store does not have (spec/delta.md, "Old
    versions")."""
    bases: list[ModelName] = []
    for ref in options.base:
        try:
            name = ModelName.parse(ref)
        except InvalidName as exc:
            exc.message = f"--base {ref!r}: {exc.message}"
            raise
        if not store.has_model(name):
            err = ModelNotFound(ref)
            err.message = f"base model {ref!r} not found in this store"
            err.hint = ("a --base model must be a local model ('blobctl list' shows them; "
                        "pull it first)")
            raise err
        bases.append(name)
    return bases


def pull(
    ref: str | ModelName,
    *,
    store: Store | str | Path,
    progress: Callable[[ProgressEvent], None] | None = None,
    options: PullOptions | None = None,
    store_as: ModelName | None = None,
    manifest: Manifest | None = None,
) -> PullResult:
    """Pull model ``ref`` into ``store``; return what was done.

    ``store_as`` stores the model under another name than ``ref`` (a mirror fetches
    ``registry.ollama.ai/ns/repo`` from its upstream's address); ``manifest`` is the
    manifest to pull when the caller fetched it from ``ref``'s registry already (see
    :func:`resolve_manifest`).

    ``progress`` receives events ``{"status": …, "digest": …, "total": …, "completed": …}``
    (the shape of Ollama's pull progress). Raises ``BlobctlError`` subclasses; after any
    failure the store holds no partial blob under a digest name and no manifest whose blobs
    are missing, and an interrupted download resumes on the next call.
    """
    opts = options or PullOptions()
    name = ref if isinstance(ref, ModelName) else ModelName.parse(ref)
    st = store if isinstance(store, Store) else Store(store)
    bases = check_bases(st, opts)  # before any request
    t0 = time.monotonic()
    with RegistryClient(insecure=opts.insecure, max_connections=opts.max_connections,
                        stall_timeout=opts.stall_timeout, retry=opts.retry) as client:
        target = store_as or name
        if manifest is None:
            _emit(progress, status="pulling manifest")
            manifest = resolve_manifest(client, name, opts)
        result = PullResult(target, manifest)
        with Lease(st.layout, f"pull {target}", digests=manifest.blob_digests) as lease:
            wanted: dict[Digest, int] = {}
            for desc in manifest.descriptors:
                wanted.setdefault(desc.digest, desc.size)
            result.blobs_total = len(wanted)
            missing = {d: s for d, s in wanted.items() if not _present(st, d, s)}
            result.blobs_present = len(wanted) - len(missing)
            for d, s in wanted.items():
                if d not in missing:
                    _emit(progress, status=f"pulling {d.short}", digest=str(d), total=s,
                          completed=s)
            _check_space(st, missing)
            _cross_check_sizes(client, name, missing)
            deltas = _plan_deltas(st, client, name, target, manifest, missing, opts, bases)
            if deltas:
                lease.add(digests={p.base for p in deltas.values()})
                for d, p in deltas.items():
                    _emit(progress, status=f"delta {d.short}: reusing {p.reused} of {p.size} "
                                           f"bytes from {p.base.short}", digest=str(d),
                          total=p.size, completed=0)
            dl = opts.download_options()
            _fetch_all(st, client, name, missing, lease, dl, opts, progress, result, deltas)
            _drop_damaged_legacy(st, missing)
            _emit(progress, status="verifying sha256 digest")
            _emit(progress, status="writing manifest")
            try:
                st.put_manifest(target, manifest)
            except StoreDamaged:  # a blob vanished under us (e.g. removed by hand): refetch
                again = {d: s for d, s in wanted.items() if not _present(st, d, s)}
                _fetch_all(st, client, name, again, lease, dl, opts, progress, result)
                st.put_manifest(target, manifest)
    st.record_use(target)
    result.seconds = time.monotonic() - t0
    _emit(progress, status="success")
    gc_after_pull(st, opts)
    return result


def gc_after_pull(st: Store, opts: PullOptions) -> None:
    """The store's ``max-size`` cap applied after a download that added a model (a
    registry pull, ``fetch``, ``pull --file``: spec/gc.md); GC trouble is a warning, the
    download succeeded."""
    if not opts.auto_gc:
        return
    from blobstore.gc import auto_gc

    try:
        auto_gc(st)
    except Exception as exc:  # noqa: BLE001  (the pull succeeded; GC trouble is a warning)
        log.warning("automatic gc after pull: %s", exc)


def fetch_blobs(
    ref: str | ModelName,
    blobs: dict[Digest, int],
    *,
    store: Store | str | Path,
    progress: Callable[[ProgressEvent], None] | None = None,
    options: PullOptions | None = None,
) -> FetchResult:
    """Download ``blobs`` (digest -> size) of ``ref``'s repository into ``store`` the way
    :func:`pull` downloads a model's blobs (dedupe, other processes' downloads waited for,
    parallel ranges, resume, verified commit), without writing any manifest. Raises what
    ``pull`` raises, with the same guarantees for what is left behind."""
    opts = options or PullOptions()
    name = ref if isinstance(ref, ModelName) else ModelName.parse(ref)
    st = store if isinstance(store, Store) else Store(store)
    result = FetchResult()
    with RegistryClient(insecure=opts.insecure, max_connections=opts.max_connections,
                        stall_timeout=opts.stall_timeout, retry=opts.retry) as client, \
            Lease(st.layout, f"fetch {name}", digests=set(blobs)) as lease:
        missing = {d: s for d, s in blobs.items() if not _present(st, d, s)}
        _check_space(st, missing)
        _fetch_all(st, client, name, missing, lease, opts.download_options(), opts, progress,
                   result)
    return result


def _present(st: Store, digest: Digest, size: int) -> bool:
    """Whether the store holds the blob, at the size the manifest gives. A file of
    another size at its name is damaged (cut short, overwritten): it is fetched again
    and the verified download replaces it (found from outside: a pull took such a file
    for the blob and wrote a manifest of a broken model, again at every pull)."""
    if st.has_blob(digest, size):
        return True
    # (only to say why: the size rule is the store's; asked again, since a GC may have
    # removed it and another writer committed it between the two looks: found from
    # outside, a false "not of the manifest's bytes" beside concurrent rm/gc)
    if st.has_blob(digest):
        if st.has_blob(digest, size):
            return True
        log.warning("blob %s in the store is not of the manifest's %d bytes: fetching it "
                    "again", digest.short, size)
    return False


def _drop_damaged_legacy(st: Store, sizes: dict[Digest, int]) -> None:
    """After a verified download of a blob whose old (``sha256:``) name held a file of
    another size: that file is proven wrong, and would be all ``verify`` still finds."""
    for d, size in sizes.items():
        legacy = st.layout.legacy_blob(d)
        try:
            if (legacy.stat().st_size != size
                    and st.layout.blob(d).stat().st_size == size):
                legacy.unlink()
                log.warning("removed %s: a damaged copy of blob %s", legacy, d.short)
        except OSError:
            continue


def _plan_deltas(st: Store, client: RegistryClient, name: ModelName, local: ModelName,
                 manifest: Manifest, missing: dict[Digest, int],
                 opts: PullOptions, bases: list[ModelName]) -> dict[Digest, DeltaPlan]:
    """Delta plans for the missing blobs that pay off (spec/delta.md); {} when delta is
    off, nothing qualifies, or anything goes wrong (then the pull is a plain pull); never
    raises. ``name``: where the model is fetched from; ``local``: its name in the store
    (whose other tags are bases); ``bases``: the ``--base`` models (:func:`check_bases`)."""
    if not opts.delta or not missing:
        return {}
    from registry_client.delta.local import plan_blobs

    try:
        return plan_blobs(st, client, name, manifest, missing, bases, local=local)
    except (BlobctlError, OSError) as exc:
        log.warning("delta update not possible (%s): pulling whole blobs", exc)
        return {}


def estimate(ref: str | ModelName, *, store: Store | str | Path,
             options: PullOptions | None = None) -> PullEstimate:
    """What ``pull(ref)`` would transfer now: the manifest is fetched and the delta
    decision made (local bases are indexed and cached) but no blob is fetched."""
    opts = options or PullOptions()
    name = ref if isinstance(ref, ModelName) else ModelName.parse(ref)
    st = store if isinstance(store, Store) else Store(store)
    bases = check_bases(st, opts)  # before any request
    with RegistryClient(insecure=opts.insecure, max_connections=4,
                        stall_timeout=opts.stall_timeout, retry=opts.retry) as client:
        manifest = resolve_manifest(client, name, opts)
        wanted: dict[Digest, int] = {}
        for desc in manifest.descriptors:
            wanted.setdefault(desc.digest, desc.size)
        missing = {d: s for d, s in wanted.items() if not _present(st, d, s)}
        est = PullEstimate(name, manifest, len(missing), sum(missing.values()))
        deltas = _plan_deltas(st, client, name, name, manifest, missing, opts, bases)
        est.bytes_reused = sum(p.reused for p in deltas.values())
        est.delta_blobs = len(deltas)
    return est


def _count(result: PullResult | FetchResult, todo: dict[Digest, int], jobs: list[BlobJob],
           deltas: dict[Digest, DeltaPlan] | None = None) -> None:
    """Book ``jobs`` (downloaded) into ``result`` and off ``todo``. A blob counts in
    ``delta_blobs`` only if it was planned as a delta and its committed bytes hold bytes
    seeded from its base, in this run or in the interrupted run it resumed: not when every
    seeded chunk failed its check (an empty or damaged base) or the seeded bytes did not
    verify and the blob was fetched again whole (spec/delta.md, "Reporting")."""
    for j in jobs:
        if (deltas and j.digest in deltas and not j.restarted
                and (j.reused_bytes or j.resumed_bytes)):
            result.delta_blobs += 1
        del todo[j.digest]
        result.blobs_fetched += 1
        result.bytes_fetched += j.fetched_bytes
        result.bytes_resumed += j.resumed_bytes
        result.bytes_read_back += j.disk_read_bytes
        result.bytes_reused += j.reused_bytes
        result.ranges_moved += j.ranges_moved


def _check_space(st: Store, missing: dict[Digest, int]) -> None:
    need = 0
    for d, size in missing.items():
        need += 0 if preallocated(st.layout, d, size) else size
    if not need:
        return
    make_dirs(st.layout.blob_ingest)  # (on the blobs' disk)
    free = shutil.disk_usage(st.layout.blob_ingest).free
    if need > free:
        raise InsufficientSpace(str(st.root), need - free, free)


def _cross_check_sizes(client: RegistryClient, name: ModelName, missing: dict[Digest, int]) -> None:
    """``HEAD`` every missing blob: a registry that reports another size than the manifest
    fails the pull before any byte is fetched. From ``HEAD_PARALLEL_FROM`` blobs on,
    ``HEAD_THREADS`` at a time (300 one after another took 0.80-0.88 s against the local
    docker-registry, 0.46-0.61 s so; over 50 ms round trips they would take 15 s). The
    first failure to arrive is raised at once, and no further ``HEAD`` is sent; the ones
    in flight finish in their daemon threads, unwaited (also on Ctrl-C)."""
    items = list(missing.items())
    if len(items) < HEAD_PARALLEL_FROM:
        for d, size in items:
            _check_size(client, name, d, size)
        return
    todo: queue.SimpleQueue[tuple[Digest, int]] = queue.SimpleQueue()
    for item in items:
        todo.put(item)
    done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
    stop = threading.Event()

    def heads() -> None:
        while not stop.is_set():
            try:
                d, size = todo.get_nowait()
            except queue.Empty:
                return
            try:
                _check_size(client, name, d, size)
            except BaseException as exc:  # noqa: BLE001  (handed to the caller's thread)
                done.put(exc)
                return
            done.put(None)

    for i in range(min(HEAD_THREADS, len(items))):
        threading.Thread(target=heads, name=f"blobctl-head-{i}", daemon=True).start()
    try:
        for _ in items:
            failure = done.get()
            if failure is not None:
                raise failure
    finally:
        stop.set()


def _check_size(client: RegistryClient, name: ModelName, d: Digest, size: int) -> None:
    reported = client.head_blob(name, d)
    if reported is not None and reported != size:
        raise ProtocolError(f"registry reports {reported} bytes for blob {d.short}, the "
                            f"manifest says {size}", url=client.blob_url(name, d))


def _fetch_all(st: Store, client: RegistryClient, name: ModelName, missing: dict[Digest, int],
               lease: Lease, dl: DownloadOptions, opts: PullOptions,
               progress: Callable[[ProgressEvent], None] | None,
               result: PullResult | FetchResult,
               deltas: dict[Digest, DeltaPlan] | None = None) -> None:
    """Download the blobs we can lock; wait for the ones another process is fetching, as
    long as its download makes progress (a stopped or hung peer is not waited for: after
    ``stall_timeout`` without a write to its ingest we fetch the blob ourselves, into a
    folder of our own, see ``blobstore.ingest.Ingest``)."""
    todo = dict(missing)
    make_dirs(st.layout.locks)
    watch: dict[Digest, tuple[tuple[float, int], float]] = {}  # signature, since
    while todo:
        mine: list[tuple[BlobJob, filelock.BaseFileLock | None]] = []
        now = time.monotonic()
        for d, size in list(todo.items()):
            lock: filelock.BaseFileLock | None = filelock.FileLock(
                str(st.layout.blob_lock(d)), mode=file_mode())
            assert lock is not None
            try:
                lock.acquire(timeout=0)
                hand_over(lock.lock_file)
            except PermissionError:
                # another user's lock file that this user may not open (made 0644 by
                # an older blobctl, or under a umask that keeps the group out): the
                # lock only saves work (two writers never share a folder), so go on
                # without it
                log.info("cannot take the download lock of %s (another user's): "
                         "fetching it without", d.short)
                lock = None
            except filelock.Timeout:
                sig = ingest_activity(st.layout, d)
                seen = watch.get(d)
                if seen is None or seen[0] != sig:
                    watch[d] = (sig, now)
                    continue
                if now - seen[1] < opts.stall_timeout:
                    continue
                log.warning("the other download of %s made no progress for %.0fs: "
                            "fetching it here", d.short, now - seen[1])
                lock = None
            if _present(st, d, size):  # another process finished it just now
                if lock is not None:
                    lock.release()
                del todo[d]
                result.blobs_from_other_process += 1
                continue
            plan = (deltas or {}).get(d)
            mine.append((BlobJob(name, d, size, on_frontier=opts.on_frontier,
                                 seed=plan.seed if plan else None), lock))
        if mine:
            jobs = [j for j, _ in mine]
            downloader = Downloader(client, st.layout, lease, dl)

            told: dict[int, tuple[int, float]] = {}  # job -> (bytes, when) last reported

            def tick(jobs: list[BlobJob] = jobs,
                     told: dict[int, tuple[int, float]] = told) -> None:
                # every blob once, then those that moved: the engine ticks ten times a
                # second, and reporting all 4,000 blobs of a pull each time made its
                # cost grow with the square of the blob count (found from outside);
                # and a running blob that did not move once a second (a stalled
                # connection: its rate on a terminal falls rather than freezing)
                now = time.monotonic()
                for i, j in enumerate(jobs):
                    done = j.completed
                    last = told.get(i)
                    if last is None or last[0] != done or (
                            0 < done < j.size and now - last[1] >= 1.0):
                        told[i] = (done, now)
                        _emit(progress, status=f"pulling {j.digest.short}",
                              digest=str(j.digest), total=j.size, completed=done)

            try:
                downloader.run(jobs, on_tick=tick)
            finally:
                for _, held in mine:
                    if held is not None:
                        held.release()
                tick()
            _count(result, todo, jobs, deltas)
            continue
        # every remaining blob is being fetched by another process: wait for it
        for d, size in todo.items():
            _emit(progress, status=f"waiting for another download of {d.short}",
                  digest=str(d), total=size, completed=0)
        time.sleep(opts.lock_poll)
        for d in list(todo):
            if _present(st, d, todo[d]):
                del todo[d]
                result.blobs_from_other_process += 1
