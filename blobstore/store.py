"""The store: an Ollama models folder plus blobctl's hidden state (spec/store-layout.md).

Guarantees:

* Blobs under ``blobs/`` are complete and verified when they get their name (ingest).
* A manifest is written only after every blob it names is present, atomically, under
  the store lock; it is removed before any of its blobs.
* Names match existing manifests case-insensitively, as in Ollama; new manifests keep
  the case they were written with.
* Reading works on a store blobctl may not write to (state is then skipped).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from blobstore._gcpause import collector_paused
from blobstore.digest import DEFAULT_ALGORITHM, Digest
from blobstore.errors import (
    BlobNotFound,
    InvalidDigest,
    InvalidInput,
    InvalidManifest,
    InvalidName,
    ModelNotFound,
    StoreBusy,
    StoreDamaged,
    StoreUnwritable,
)
from blobstore.index import FileKey, ManifestIndex, Summary
from blobstore.ingest import BlobWriter, hash_file
from blobstore.layout import Layout, fsync_dir, read_small, write_atomic
from blobstore.lease import Lease, live_leases
from blobstore.manifest import (
    LAYER_ADAPTER,
    LAYER_PROJECTOR,
    Manifest,
    referenced_by,
)
from blobstore.name import ModelName
from blobstore.state import ModelState, State

__all__ = [
    "BlobProblem",
    "ModelEntry",
    "ModelUsage",
    "RemoveResult",
    "ResolvedModel",
    "Store",
    "UsageReport",
    "VerifyReport",
]

log = logging.getLogger("blobctl.store")

STORE_LOCK_TIMEOUT = 30.0


class ModelEntry:
    """One manifest file found in the store.

    ``summary`` (model ID, size, referenced digests) comes from the manifest index when
    the file is unchanged; ``manifest`` is decoded from the file on first access.
    """

    __slots__ = ("_manifest", "error", "file", "mtime", "name", "state", "summary")

    def __init__(self, name: ModelName, file: str, mtime: float, summary: Summary | None,
                 error: str | None = None, state: ModelState | None = None,
                 manifest: Manifest | None = None) -> None:
        self.name = name
        self.file = file  # kept as a string: building 20 000 Paths costs half a second
        self.mtime = mtime
        self.summary = summary
        self.error = error
        self.state = state if state is not None else ModelState(None, 0, False)
        self._manifest = manifest

    @property
    def manifest(self) -> Manifest | None:
        """The decoded manifest (read on first use), or None if it does not decode."""
        if self._manifest is None and self.error is None:
            try:
                self._manifest = Manifest.decode(read_small(self.file)[0], source=self.file)
            except (OSError, InvalidManifest) as exc:
                self.error = getattr(exc, "reason", None) or str(exc)
        return self._manifest

    @property
    def path(self) -> Path:
        return Path(self.file)

    @property
    def last_used(self) -> float | None:
        return self.state.last_used

    @property
    def pinned(self) -> bool:
        return self.state.pinned


@dataclass
class ResolvedModel:
    name: ModelName
    manifest: Manifest
    model_path: Path | None
    projector_paths: list[Path]
    adapter_paths: list[Path]


@dataclass
class RemoveResult:
    name: ModelName
    removed_blobs: list[Digest]
    freed_bytes: int
    kept_shared: list[Digest]
    kept_leased: list[Digest]


@dataclass
class BlobProblem:
    digest: Digest | None
    path: Path | None
    problem: str  # "corrupt", "missing", "size", "unreadable", "invalid-manifest"
    detail: str
    models: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    blobs_checked: int = 0
    bytes_checked: int = 0
    manifests_checked: int = 0
    problems: list[BlobProblem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class ModelUsage:
    name: ModelName
    size: int
    own_bytes: int
    shared_bytes: int


@dataclass
class UsageReport:
    total_bytes: int
    blob_count: int
    referenced_bytes: int
    unreferenced_bytes: int
    ingest_bytes: int
    models: list[ModelUsage]


def _lower_match(parent: Path, name: str) -> Path | None:
    try:
        for e in os.scandir(parent):
            if e.name.lower() == name.lower():
                return Path(e.path)
    except OSError:
        return None
    return None


class Store:
    """An open store. Cheap to create; thread-compatible, not thread-safe."""

    def __init__(self, root: Path | str, *, create: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        self.layout = Layout(self.root)
        if create:
            try:
                self.layout.ensure()
            except OSError as exc:
                raise StoreUnwritable(str(self.root), exc.strerror or str(exc)) from exc
        self._state: State | None = None
        self._state_failed = False

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> State | None:
        """The state database, or None when it cannot be opened (read-only store)."""
        if self._state is None and not self._state_failed:
            if not self.root.is_dir():
                return None
            try:
                self._state = State(self.layout.state_db)
            except StoreUnwritable as exc:
                log.warning("blobctl state unavailable: %s", exc.message)
                self._state_failed = True
        return self._state

    def _require_state(self) -> State:
        st = self.state
        if st is None:
            raise StoreUnwritable(str(self.root), "state database cannot be opened")
        return st

    def close(self) -> None:
        if self._state is not None:
            self._state.close()
            self._state = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lock(
        self, timeout: float = STORE_LOCK_TIMEOUT
    ) -> contextlib.AbstractContextManager[object]:
        """The store-wide lock (GC apply, rm, manifest commits). Raises StoreBusy."""
        import filelock

        self.layout.locks.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.layout.store_lock), timeout=timeout)

        @contextlib.contextmanager
        def held() -> Iterator[object]:
            try:
                lock.acquire()
            except filelock.Timeout as exc:
                raise StoreBusy("the store", timeout) from exc
            try:
                yield lock
            finally:
                lock.release()

        return held()

    # ------------------------------------------------------------------ blobs
    def has_blob(self, digest: Digest) -> bool:
        return self.layout.existing_blob(digest) is not None

    def blob_path(self, digest: Digest) -> Path:
        """Path of a present blob (canonical or legacy name); raise BlobNotFound."""
        p = self.layout.existing_blob(digest)
        if p is None:
            raise BlobNotFound(str(digest))
        return p

    def open_blob(self, digest: Digest) -> BinaryIO:
        return open(self.blob_path(digest), "rb")

    def put_blob(
        self,
        stream: BinaryIO,
        *,
        expected: Digest | None = None,
        size: int | None = None,
        algorithm: str = DEFAULT_ALGORITHM,
        source: str | None = None,
        lease: Lease | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Digest:
        """Store a stream as a blob (hash while writing, verify, atomic rename).

        With ``lease``, the digest is added to it before the blob gets its name;
        ``progress(bytes_so_far)`` is called as the copy advances.
        """
        with BlobWriter(self.layout, expected=expected, expected_size=size,
                        algorithm=algorithm, source=source, lease=lease) as w:
            w.copy_from(stream, progress)
            return w.commit()

    def put_bytes(self, data: bytes, *, algorithm: str = DEFAULT_ALGORITHM,
                  lease: Lease | None = None) -> Digest:
        digest = Digest.of_bytes(data, algorithm)
        if lease is not None:
            lease.add(digests={digest})
        if self.has_blob(digest):
            return digest
        with BlobWriter(self.layout, expected=digest, expected_size=len(data)) as w:
            w.write(data)
            return w.commit()

    def put_file(self, path: Path, *, mode: str = "copy", lease: Lease | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[Digest, int]:
        """Add a local file as a blob. ``mode``: ``copy``, ``hardlink`` or ``move``.

        ``copy`` hashes while copying; ``hardlink``/``move`` hash the file once, then
        link or rename it into place (falling back to a copy across filesystems).
        A hardlinked blob shares its inode with the source: editing the source later
        corrupts the blob (``verify`` will say so).
        """
        if mode == "copy":
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    return self.put_blob(f, size=size, source=str(path), lease=lease,
                                         progress=progress), size
            except OSError as exc:
                raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from exc
        if mode not in ("hardlink", "move"):
            raise ValueError(f"unknown mode {mode!r}")
        digest, size = hash_file(path)
        if lease is not None:
            lease.add(digests={digest})
        target = self.layout.blob(digest)
        if self.has_blob(digest):
            if mode == "move":
                os.unlink(path)
            return digest, size
        self.layout.blobs.mkdir(parents=True, exist_ok=True)
        tmp = self.layout.ingest / f"link-{os.getpid()}-{digest.hex[:16]}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            if mode == "hardlink":
                os.link(path, tmp)
            else:
                os.rename(path, tmp)
        except OSError:
            # another filesystem: fall back to a verified copy
            with open(path, "rb") as f:
                self.put_blob(f, expected=digest, size=size, source=str(path))
            if mode == "move":
                os.unlink(path)
            return digest, size
        # re-check what we linked: the source may have changed since it was hashed
        again, again_size = hash_file(tmp)
        if again != digest or again_size != size:
            if mode == "move":
                os.rename(tmp, path)
            else:
                os.unlink(tmp)
            raise InvalidInput(f"{path} changed while it was being imported; try again")
        if mode == "move":
            os.chmod(tmp, 0o444)
        os.replace(tmp, target)
        fsync_dir(self.layout.blobs)
        return digest, size

    def iter_blob_files(self) -> Iterator[tuple[Digest | None, str, os.stat_result]]:
        """Every file in ``blobs/``: (digest or None for a foreign name, path, stat)."""
        try:
            entries = list(os.scandir(self.layout.blobs))
        except FileNotFoundError:
            return
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            try:
                d: Digest | None = Digest.from_filename(e.name)
            except InvalidDigest:
                d = None
            yield d, e.path, st

    # ------------------------------------------------------------------ manifests
    def find_manifest_path(self, name: ModelName) -> Path | None:
        """The manifest file for ``name``: exact case first, then case-insensitively."""
        exact = self.layout.manifest(name)
        if exact.is_file():
            return exact
        cur = self.layout.manifests
        for part in name.parts:
            nxt = _lower_match(cur, part)
            if nxt is None:
                return None
            cur = nxt
        return cur if cur.is_file() else None

    def get_manifest(self, name: ModelName) -> Manifest:
        path = self.find_manifest_path(name)
        if path is None:
            raise ModelNotFound(name.display())
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ModelNotFound(name.display()) from exc
        return Manifest.decode(raw, source=str(path))

    def has_model(self, name: ModelName) -> bool:
        return self.find_manifest_path(name) is not None

    def missing_blobs(self, manifest: Manifest) -> list[Digest]:
        return [d.digest for d in manifest.descriptors if not self.has_blob(d.digest)]

    def put_manifest(self, name: ModelName, manifest: Manifest) -> Path:
        """Write ``manifest`` for ``name``, exactly its raw bytes, after its blobs.

        Under the store lock, checks every blob is present (raises StoreDamaged if not),
        then writes atomically. An existing manifest with the same name in another case
        is replaced in place.
        """
        with self.lock():
            missing = self.missing_blobs(manifest)
            if missing:
                raise StoreDamaged(name.display(), [str(d) for d in missing])
            path = self.find_manifest_path(name) or self.layout.manifest(name)
            try:
                write_atomic(path, manifest.raw, self.layout.ingest)
            except OSError as exc:
                raise StoreUnwritable(str(self.root), exc.strerror or str(exc)) from exc
        return path

    def list_models(self) -> list[ModelEntry]:
        """Every ``manifests/*/*/*/*`` entry, newest first, like ``ollama list``.

        Files whose path is not a valid name are skipped (logged); manifests that do not
        decode are listed with ``error`` set so that ``verify`` can report them.
        """
        with collector_paused():
            return self._list_models()

    def _list_models(self) -> list[ModelEntry]:
        states = self.state.all() if self.state is not None else {}
        index = self.state.manifest_index() if self.state is not None else None
        known = index.load() if index is not None else {}
        out: list[ModelEntry] = []
        present: set[str] = set()
        for parts, path in self.layout.iter_manifest_files():
            try:
                name = ModelName.from_parts(parts)
            except InvalidName as exc:
                log.debug("skipping %s: %s", path, exc.message)
                continue
            try:
                st = os.stat(path)
            except OSError as exc:
                log.warning("cannot read %s: %s", path, exc)
                continue
            present.add(path)
            summary = ManifestIndex.trusted(known.get(path), FileKey.of(st))
            manifest: Manifest | None = None
            error: str | None = None
            if summary is None:
                try:
                    raw, st = read_small(path)
                except OSError as exc:
                    log.warning("cannot read %s: %s", path, exc)
                    continue
                try:
                    manifest = Manifest.decode(raw, source=str(path))
                    summary = Summary.of(manifest)
                    if index is not None:
                        index.remember(path, FileKey.of(st), summary)
                except InvalidManifest as exc:
                    error = exc.reason
            out.append(ModelEntry(name, path, st.st_mtime, summary, error,
                                  states.get(name.key), manifest))
        if index is not None:
            index.flush(present if len(known) > len(present) else None)
        out.sort(key=lambda e: (-e.mtime, e.name.key))
        return out

    def resolve(self, name: ModelName, *, record: bool = True) -> ResolvedModel:
        """A model's GGUF (and projector/adapter) paths. Records a use when asked.

        Raises ModelNotFound, or StoreDamaged if a blob the model needs is missing.
        """
        manifest = self.get_manifest(name)
        missing = self.missing_blobs(manifest)
        if missing:
            raise StoreDamaged(name.display(), [str(d) for d in missing])
        layer = manifest.model_layer()
        resolved = ResolvedModel(
            name=name,
            manifest=manifest,
            model_path=self.blob_path(layer.digest) if layer else None,
            projector_paths=[self.blob_path(d.digest)
                             for d in manifest.layers_of(LAYER_PROJECTOR)],
            adapter_paths=[self.blob_path(d.digest) for d in manifest.layers_of(LAYER_ADAPTER)],
        )
        if record:
            self.record_use(name)
        return resolved

    # ------------------------------------------------------------------ state ops
    def canonical_name(self, name: ModelName) -> ModelName:
        """The name as stored on disk (its case), or ``name`` if there is none."""
        path = self.find_manifest_path(name)
        if path is None:
            return name
        rel = path.relative_to(self.layout.manifests).parts
        return ModelName(rel[0], rel[1], rel[2], rel[3])

    def record_use(self, name: ModelName, when: float | None = None) -> None:
        st = self.state
        if st is None:
            return
        try:
            st.record_use(self.canonical_name(name), when)
        except StoreUnwritable as exc:
            log.warning("could not record use of %s: %s", name.display(), exc.message)

    def set_pinned(self, name: ModelName, pinned: bool) -> ModelName:
        if not self.has_model(name):
            raise ModelNotFound(name.display())
        canonical = self.canonical_name(name)
        self._require_state().set_pinned(canonical, pinned)
        return canonical

    def get_config(self, key: str) -> str | None:
        st = self.state
        return st.get_config(key) if st is not None else None

    def set_config(self, key: str, value: str | None) -> None:
        self._require_state().set_config(key, value)

    # ------------------------------------------------------------------ removal
    def referenced_digests(self) -> set[Digest]:
        """Digests named by every manifest (whatever an undecodable one mentions, too)."""
        refs: set[Digest] = set()
        for _, path in self.layout.iter_manifest_files():
            try:
                refs |= referenced_by(read_small(path)[0])
            except OSError:
                continue
        return refs

    def remove_model(self, name: ModelName) -> RemoveResult:
        """Remove a model: its manifest first, then blobs no other manifest uses.

        Blobs held by a live lease (a running pull) are kept. Runs under the store lock.
        """
        with self.lock():
            path = self.find_manifest_path(name)
            if path is None:
                raise ModelNotFound(name.display())
            canonical = self.canonical_name(name)
            try:
                manifest: Manifest | None = Manifest.decode(path.read_bytes())
            except InvalidManifest:
                manifest = None
            os.unlink(path)
            fsync_dir(path.parent)
            self._prune_empty_dirs(path.parent)
            result = RemoveResult(canonical, [], 0, [], [])
            if manifest is not None:
                still = self.referenced_digests()
                leased: set[Digest] = set()
                for lease in live_leases(self.layout):
                    leased |= lease.digests
                for d in sorted(manifest.blob_digests):
                    if d in still:
                        result.kept_shared.append(d)
                        continue
                    if d in leased:
                        result.kept_leased.append(d)
                        continue
                    for p in (self.layout.blob(d), self.layout.legacy_blob(d)):
                        try:
                            size = p.stat().st_size
                            os.unlink(p)
                        except FileNotFoundError:
                            continue
                        result.removed_blobs.append(d)
                        result.freed_bytes += size
                fsync_dir(self.layout.blobs)
        st = self.state
        if st is not None:
            with contextlib.suppress(StoreUnwritable):
                st.forget(canonical)
        return result

    def _prune_empty_dirs(self, start: Path) -> None:
        cur = start
        while cur != self.layout.manifests and self.layout.manifests in cur.parents:
            try:
                cur.rmdir()
            except OSError:
                return
            cur = cur.parent

    # ------------------------------------------------------------------ checks
    def verify(
        self, *, progress: Callable[[int, int], None] | None = None, workers: int = 2
    ) -> VerifyReport:
        """Rehash every blob; report corrupt, wrongly sized and missing blobs.

        ``progress(done_bytes, total_bytes)`` is called as blobs finish. Read-only.
        """
        t0 = time.monotonic()
        report = VerifyReport()
        expected_size: dict[Digest, int] = {}
        users: dict[Digest, list[str]] = {}
        for entry in self.list_models():
            report.manifests_checked += 1
            if entry.manifest is None:
                report.problems.append(BlobProblem(
                    None, entry.path, "invalid-manifest", entry.error or "does not decode",
                    [entry.name.display()]))
                continue
            for desc in entry.manifest.descriptors:
                expected_size.setdefault(desc.digest, desc.size)
                users.setdefault(desc.digest, []).append(entry.name.display())
        files = [(d, Path(p), st.st_size) for d, p, st in self.iter_blob_files()
                 if d is not None]
        present = {d for d, _, _ in files}
        for d, names in users.items():
            if d not in present:
                report.problems.append(BlobProblem(d, None, "missing",
                                                   "referenced but not in blobs/", names))
        total = sum(s for _, _, s in files)
        done = 0

        def check(item: tuple[Digest, Path, int]) -> BlobProblem | None:
            d, p, _ = item
            try:
                actual, size = hash_file(p, d.algorithm)
            except OSError as exc:
                return BlobProblem(d, p, "unreadable", str(exc), users.get(d, []))
            if actual != d:
                return BlobProblem(d, p, "corrupt", f"content hashes to {actual}",
                                   users.get(d, []))
            want = expected_size.get(d)
            if want is not None and want != size:
                return BlobProblem(d, p, "size", f"{size} bytes, manifest says {want}",
                                   users.get(d, []))
            return None

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for item, problem in zip(files, pool.map(check, files), strict=True):
                done += item[2]
                report.blobs_checked += 1
                report.bytes_checked += item[2]
                if problem is not None:
                    report.problems.append(problem)
                if progress is not None:
                    progress(done, total)
        report.seconds = time.monotonic() - t0
        return report

    def disk_usage(self) -> UsageReport:
        """Unique bytes on disk, and per model its own vs shared bytes."""
        sizes: dict[Digest, int] = {}
        count = 0
        for d, _, st in self.iter_blob_files():
            count += 1
            if d is not None:
                sizes[d] = sizes.get(d, 0) + st.st_size
        total = sum(st.st_size for _, _, st in self.iter_blob_files())
        entries = [e for e in self.list_models() if e.summary is not None]
        refcount: dict[Digest, int] = {}
        for e in entries:
            assert e.summary is not None
            for d in e.summary.refs:
                refcount[d] = refcount.get(d, 0) + 1
        models: list[ModelUsage] = []
        for e in entries:
            assert e.summary is not None
            own = shared = 0
            for d in e.summary.refs:
                b = sizes.get(d, 0)
                if refcount[d] > 1:
                    shared += b
                else:
                    own += b
            models.append(ModelUsage(e.name, e.summary.size, own, shared))
        referenced = sum(b for d, b in sizes.items() if d in refcount)
        ingest = 0
        for dirpath, _, filenames in os.walk(self.layout.ingest):
            for fn in filenames:
                with contextlib.suppress(OSError):
                    ingest += os.lstat(os.path.join(dirpath, fn)).st_blocks * 512
        models.sort(key=lambda m: -(m.own_bytes + m.shared_bytes))
        return UsageReport(total, count, referenced, total - referenced, ingest, models)
