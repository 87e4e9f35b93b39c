"""The store: an Ollama models folder plus blobctl's hidden state (spec/store-layout.md).

Guarantees:

* Blobs under ``blobs/`` are complete and verified when they get their name (ingest).
* A manifest is written only after every blob it names is present, atomically, under
  the store lock; it is removed before any of its blobs.
* Names match existing manifests case-insensitively, as in Ollama; new manifests keep
  the case they were written with.
* Reading works on a store blobctl may not write to (state is then skipped).
* Thread-safe: one ``Store`` may be used from any number of threads of a process
  (state: one sqlite connection per thread; the store lock is reentrant and shared
  by every ``Store`` of the process for the same folder). See spec/api.md, "Embedding
  the store".
* Every failure is a ``BlobctlError`` subclass: ``OSError``s are mapped at this
  boundary (ENOSPC/EDQUOT: ``InsufficientSpace``; others: ``StoreUnwritable`` or
  ``StoreError``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, ParamSpec, TypeVar

from blobstore import removal
from blobstore._gcpause import collector_paused
from blobstore.digest import DEFAULT_ALGORITHM, Digest
from blobstore.errors import (
    BlobctlError,
    BlobNotFound,
    DigestMismatch,
    InsufficientSpace,
    InvalidDigest,
    InvalidInput,
    InvalidManifest,
    InvalidName,
    ModelNotFound,
    NotFound,
    SizeMismatch,
    StateUnreadable,
    StoreDamaged,
    StoreError,
    StoreUnreadable,
    StoreUnwritable,
)
from blobstore.index import Summary, link_target, walk_manifests
from blobstore.ingest import BlobWriter, hash_file, link_in
from blobstore.layout import Layout, fsync_dir, read_small, refused_path, write_atomic
from blobstore.lease import Lease
from blobstore.manifest import (
    LAYER_ADAPTER,
    LAYER_MODEL,
    LAYER_PROJECTOR,
    Manifest,
    decode_stored,
)
from blobstore.name import ModelName
from blobstore.removal import RemoveResult
from blobstore.state import ModelState, State, holds_nothing, out_of_space, unmakeable
from blobstore.storelock import store_lock
from blobstore.usage import ModelUsage, UsageReport, disk_usage
from blobstore.verify import BlobProblem, VerifyReport, blob_intact, verify_store

__all__ = [
    "BlobProblem",
    "ModelEntry",
    "ModelUsage",
    "RemoveResult",
    "ResolvedModel",
    "Store",
    "UsageReport",
    "VerifyReport",
    "refuse_moving_symlink",
]

log = logging.getLogger("blobctl.store")

STORE_LOCK_TIMEOUT = 30.0
STATE_BUSY_S = 10.0  # the first open of the state database waits out a busy one this long

P = ParamSpec("P")
R = TypeVar("R")


def refuse_moving_symlink(path: Path) -> None:
    """InvalidInput when ``path`` itself is a symlink: a move takes the file a path names
    and removes that path, and neither half fits a symlink. Unlinking the link leaves the
    file under its real name, now sharing its inode with a blob (a later edit corrupts
    it, what ``move`` is there to rule out); unlinking the target removes a file the user
    still has under another name (found from outside: the blob became the symlink)."""
    if os.path.islink(path):
        target = os.path.realpath(path)
        raise InvalidInput(
            f"{path} is a symlink (to {target}): --move takes a file, not a link",
            hint=f"import the link with --hardlink or --copy, or --move the file itself: "
                 f"{target}")


def os_error(exc: OSError, where: str) -> StoreError:
    """The library error for an ``OSError`` met while writing in ``where`` (a store
    folder: its disk is the one reported full). A refusal names the file or folder that
    refused (the error's own path, or the folder above it that cannot be written or
    read), not ``where``: found from outside, `rm` refused by a root-owned folder of
    ``manifests/`` said "cannot write to store at <root>" of a root the user can write."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        import shutil

        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = 0
        return InsufficientSpace(where, None, free)
    if exc.errno in (errno.EACCES, errno.EPERM):
        unreadable = _unreadable_on_the_way(exc.filename, where)
        if unreadable is not None:
            # a read refused (found from outside: `list` of a store of mode 000 said
            # "cannot write to store")
            return StoreUnreadable(unreadable, exc.strerror or str(exc))
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreUnwritable(refused_path(exc, where), exc.strerror or str(exc))
    return StoreError(f"{where}: {exc.strerror or exc}"
                      + (f" ({exc.filename})" if exc.filename else ""))


def _unreadable_on_the_way(filename: object, root: str) -> str | None:
    """The file an error names, or a folder between it and the store root, that exists
    and cannot be read (a folder: listed and entered) by this process; None if none."""
    if not isinstance(filename, (str, bytes, os.PathLike)):
        filename = root
    p = Path(os.fsdecode(filename))
    stop = Path(root).parent
    for q in (p, *p.parents):
        if q in (stop, q.parent):
            break
        try:
            is_dir = stat.S_ISDIR(os.stat(q).st_mode)
        except OSError:
            continue  # not there (yet): a write would make it
        if not os.access(q, os.R_OK | os.X_OK if is_dir else os.R_OK):
            return str(q)
    return None


def _boundary(fn: Callable[P, R]) -> Callable[P, R]:
    """Map stray ``OSError``/``ValueError`` of a public method to ``BlobctlError``s."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except BlobctlError:
            raise
        except OSError as exc:
            root = args[0].root if args and isinstance(args[0], Store) else Path(".")
            raise os_error(exc, str(root)) from exc
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc

    return wrapper


class _SourceUnreadable(InvalidInput):
    """Reading the *source* of an import failed (not the store)."""


class _Source:
    """A readable stream whose read errors say "cannot read <source>"."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self._f = f
        self._name = name

    def readinto(self, buf: bytearray) -> int:
        try:
            return self._f.readinto(buf)  # type: ignore[attr-defined,no-any-return]
        except OSError as exc:
            raise _SourceUnreadable(f"cannot read {self._name}: {exc.strerror or exc}") \
                from exc


class ModelEntry:
    """One manifest file found in the store.

    ``summary`` (model ID, size, referenced digests) comes from the manifest index when
    the file is unchanged; ``manifest`` is decoded from the file on first access.
    """

    __slots__ = ("_layout", "_manifest", "error", "file", "mtime", "name", "state", "summary")

    def __init__(self, name: ModelName, file: str, mtime: float, summary: Summary | None,
                 error: str | None = None, state: ModelState | None = None,
                 manifest: Manifest | None = None, layout: Layout | None = None) -> None:
        self._layout = layout
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
                raw = read_small(self.file)[0]
                self._manifest = (
                    decode_stored(raw, source=self.file, read_blob=self._layout.read_small_blob)
                    if self._layout is not None else Manifest.decode(raw, source=self.file))
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
    """A model's blob paths. ``model_path`` is its first model layer's (the only one of
    a one-file GGUF); ``model_paths`` all of them in layer order: a split GGUF's parts,
    which llama.cpp loads only under split names (``catalog.splits``)."""

    name: ModelName
    manifest: Manifest
    model_path: Path | None
    projector_paths: list[Path]
    adapter_paths: list[Path]
    model_paths: list[Path] = field(default_factory=list)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _link_id(path: Path) -> tuple[int, int, int, str] | None:
    """Which file (or symlink, and to what) is at ``path`` now: None if nothing."""
    try:
        st = os.lstat(path)
        text = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, text


def _lower_matches(parent: Path, name: str) -> list[Path]:
    """Entries of ``parent`` named ``name`` in any case (the exact case first)."""
    try:
        found = [e.name for e in os.scandir(parent) if e.name.lower() == name.lower()]
    except OSError:
        return []
    return [parent / n for n in sorted(found, key=lambda n: (n != name, n))]


class Store:
    """An open store. Cheap to create; thread-safe (spec/api.md, "Embedding the store")."""

    def __init__(self, root: Path | str, *, create: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        self.layout = Layout(self.root)
        if self.root.exists() and not self.root.is_dir():
            # (found from outside: `list` of a file said "no models", exit 0, while `du`
            # failed with exit 11 "Not a directory")
            raise NotFound(f"no store at {self.root}: it is a file, not a folder",
                           hint="pick the store folder with --store or BLOBCTL_STORE")
        if create:
            try:
                self.layout.ensure()
            except OSError as exc:
                raise os_error(exc, str(self.root)) from exc
        self._state: State | None = None
        self._state_failed = False
        self._state_warned = False
        self._state_tried = False  # opening for writing was tried once
        self._state_guard = threading.Lock()
        self._state_id: tuple[int, int] | None = None  # (device, inode) of the open database
        self._stale: list[State] = []  # databases no longer at the path: closed at close()
        self._failed_root: tuple[int, int] | None = None  # the folder where opening failed
        self._open_error: StoreUnwritable | None = None  # why the last open failed

    def _failed_here(self) -> bool:
        """Whether the store folder is still the one where the state could not be had."""
        return self._failed_root is not None and self._failed_root == _file_id(self.root)

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> State | None:
        """The state database, or None when it cannot be opened (read-only store).

        Where it cannot be opened for writing it is read read-only
        (:meth:`_read_only_state`). A ``mode=ro`` connection sees every later commit and
        is kept; an immutable one would not (it reads neither the WAL nor changes after
        it opened), so it is never kept: each use opens afresh, first trying to write
        again (space may have been freed), then checking that the WAL is still empty. A
        database that exists but cannot be read now is tried again at the next use. Only
        the first try waits out a busy database (up to sqlite's busy timeout); later ones
        try once, so where locks always answer busy (NFS without a lock daemon) a use
        does not wait 10 s each time. (That is the open only: once open, every statement
        waits out a lock for the whole busy timeout.)"""
        st = self._state
        if st is not None and self._state_id != _file_id(self.layout.state_db):
            # the database under the store's path is not the one open (the store folder
            # was deleted or moved and made again by a later write): pins written to the
            # open one would be lost to a GC reading the path's (found from outside)
            old: list[State] = []
            with self._state_guard:
                if self._state is st:
                    self._stale.append(st)
                    self._state = None
                    # (a thread may still be using the one just replaced: it stays open;
                    # older ones are closed, so a store made again and again does not
                    # pile up connections: found by review)
                    while len(self._stale) > 2:
                        old.append(self._stale.pop(0))
            for stale in old:
                stale.close()  # (waits for a statement another thread runs on it)
            st = None
        if st is not None or (self._state_failed and self._failed_here()):
            return st
        with self._state_guard:
            if self._state is not None or (self._state_failed and self._failed_here()):
                return self._state
            if not self.root.is_dir():
                return None
            first = not self._state_tried
            self._state_tried = True
            try:
                opened = State(self.layout.state_db,
                               busy_wait=STATE_BUSY_S if first else 0.0)
                self._state_id = _file_id(self.layout.state_db)
                self._state = opened
                return self._state
            except StoreUnwritable as exc:
                fallback = self._read_only_state()
                if fallback is None:
                    if not self._state_warned:
                        log.warning("blobctl state unavailable: %s", exc.message)
                        self._state_warned = True
                    # no database, and none can be made (a read-only folder): no state,
                    # for good (while the store folder is the same: one moved away and
                    # made again is tried afresh); else (a full disk, a folder moved
                    # during the open, a database that cannot be read now) try again at
                    # the next use
                    self._state_failed = unmakeable(self.layout.state_db)
                    self._failed_root = _file_id(self.root)
                    self._open_error = exc
                    return None
                fallback.refusal = exc  # what a write through it is refused with
                if not self._state_warned:
                    log.warning("blobctl state is read-only (%s): uses are not recorded, "
                                "and pins cannot change", exc.message)
                    self._state_warned = True
                if not fallback.immutable:
                    self._state_id = _file_id(self.layout.state_db)
                    self._state = fallback
                return fallback

    def _read_only_state(self) -> State | None:
        """The state database read-only, for a store whose database exists but cannot be
        opened for writing (a full disk: not even the WAL's shared memory can be made; a
        read-only medium). Pins and last uses stay known, so ``list`` shows them and GC
        and ``rm`` can still free space. Read as immutable (no locks, no shared memory)
        only where the WAL is empty: its contents would be missed."""
        db = self.layout.state_db
        if not db.is_file():
            return None
        wal = db.with_name(db.name + "-wal")
        shm = db.with_name(db.name + "-shm")
        tries = [False]
        try:
            if wal.stat().st_size == 0:
                tries.append(True)
        except FileNotFoundError:
            tries.append(True)
        except OSError:
            pass
        if (tries[-1] and not (wal.exists() and shm.exists())
                and os.access(db.parent, os.W_OK | os.X_OK)):
            # a mode=ro connection would make the -wal and -shm that are missing, as this
            # user's, 0644 (sqlite gives them the database's mode): the database's owner
            # then can no longer open it for writing (found from outside: one `list` of
            # a group member's locked its owner out of pins and settings). Nothing to
            # miss in a WAL that is empty or absent: read it immutable, making nothing.
            tries = [True]
        for immutable in tries:
            st: State | None = None
            try:
                st = State(db, readonly=True, immutable=immutable)
                st.probe()  # (sqlite opens lazily: this is where it fails)
                return st
            except StoreError:
                if st is not None:
                    st.close()
        return None

    def model_states(self) -> dict[str, ModelState]:
        """Every model's state (pins, last use), keyed by ``ModelName.key``.

        Empty for a store without state; raises StateUnreadable when a state database
        exists but cannot be read: pins must never silently read as "not pinned".
        """
        st = self._readable_state()
        return st.all() if st is not None else {}

    def _readable_state(self) -> State | None:
        """The state, None for a store without one; StateUnreadable where a database
        exists but cannot be read (never taken for "no pins" or "no setting")."""
        st = self.state
        if st is None and not holds_nothing(self.layout.state_db):
            raise StateUnreadable(str(self.layout.state_db), "cannot be opened")
        return st  # (None: no database, or an empty one: no pins, no settings)

    def _require_state(self) -> State:
        st = self.state
        if st is None:
            full = out_of_space(self.layout.state_db.parent)
            if full is not None:  # (the open failed for want of space)
                raise full
            if self._open_error is not None:
                raise StoreUnwritable(self._open_error.path, self._open_error.reason)
            raise StoreUnwritable(str(self.layout.state_db), "state database cannot be opened")
        return st

    def close(self) -> None:
        """Close the state database's connections (every thread's). Safe from any thread
        while others use the store: a statement running on a connection finishes before
        it is closed, and a later use opens the database again (spec/api.md, "Threads")."""
        with self._state_guard:
            states = [s for s in (self._state, *self._stale) if s is not None]
            self._state = None
            self._stale = []
            # the next open is a first one again: it waits out a busy database (the last
            # connection's close checkpoints the WAL under an exclusive lock, and an open
            # that did not wait for that fell back to read-only for good)
            self._state_tried = False
        for st in states:
            st.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lock(
        self, timeout: float = STORE_LOCK_TIMEOUT
    ) -> contextlib.AbstractContextManager[None]:
        """The store-wide lock (GC apply, rm, manifest commits). Raises StoreBusy.

        Reentrant within the process: ``put_manifest``/``remove_model`` (which take it)
        work inside ``with store.lock():``. Other threads and processes wait up to
        ``timeout`` seconds.
        """
        return store_lock(self.layout.store_lock).hold(timeout)

    # ------------------------------------------------------------------ blobs
    def has_blob(self, digest: Digest, size: int | None = None) -> bool:
        """Whether the blob is present (with ``size``: at that size; a file of another
        size at its name is damaged, and a writer replaces it)."""
        return self.layout.existing_blob(digest, size) is not None

    def blob_path(self, digest: Digest) -> Path:
        """Path of a present blob (canonical or legacy name); raise BlobNotFound."""
        p = self.layout.existing_blob(digest)
        if p is None:
            raise BlobNotFound(str(digest))
        return p

    @_boundary
    def open_blob(self, digest: Digest) -> BinaryIO:
        """Open a blob for reading. While it is open, GC treats it as in use."""
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(str(digest)) from exc

    @_boundary
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
        check: Callable[[Path], None] | None = None,
    ) -> Digest:
        """Store a stream as a blob (hash while writing, verify, atomic rename).

        With ``lease``, the digest is added to it before the blob gets its name;
        ``progress(bytes_so_far)`` is called as the copy advances. ``check(path)`` is
        given the store's own copy (exactly the bytes hashed) before it gets its name;
        whatever it raises drops the copy and propagates. Raises
        DigestMismatch/SizeMismatch (nothing is written), InsufficientSpace (also for
        ENOSPC while writing), StoreUnwritable/StoreError.
        """
        try:
            with BlobWriter(self.layout, expected=expected, expected_size=size,
                            algorithm=algorithm, source=source, lease=lease) as w:
                w.copy_from(stream, progress)
                if check is not None:
                    check(w.ingest.data_path)
                return w.commit()
        except OSError as exc:
            raise os_error(exc, str(self.layout.blob_ingest)) from exc

    @_boundary
    def put_bytes(self, data: bytes, *, algorithm: str = DEFAULT_ALGORITHM,
                  lease: Lease | None = None) -> Digest:
        """Store ``data`` as a blob (idempotent); with ``lease``, named in it first."""
        digest = Digest.of_bytes(data, algorithm)
        if lease is not None:
            lease.add(digests={digest})
        if self.has_blob(digest, len(data)):
            return digest
        try:
            with BlobWriter(self.layout, expected=digest, expected_size=len(data),
                            lease=lease) as w:
                w.write(data)
                return w.commit()
        except OSError as exc:
            raise os_error(exc, str(self.layout.blob_ingest)) from exc

    @_boundary
    def put_file(self, path: Path, *, mode: str = "copy", lease: Lease | None = None,
                 progress: Callable[[int], None] | None = None,
                 unlink_source: bool = True,
                 check: Callable[[Path], None] | None = None) -> tuple[Digest, int]:
        """Add a local file as a blob. ``mode``: ``copy``, ``hardlink`` or ``move``.

        ``copy`` hashes while copying. ``hardlink`` hashes the file, links it into the
        ingest area (the link named in ``lease``), hashes the link again (the source may
        have changed meanwhile) and renames it into ``blobs/``; across filesystems it
        falls back to a verified copy. A hardlinked blob shares its inode with the
        source: editing the source later corrupts the blob (``verify`` will say so).
        ``move`` is ``hardlink`` (or the copy) followed by unlinking the source; it
        needs a ``lease`` (the blob must not be collected before a manifest names it).
        The source is never renamed: it stays at its path until it is unlinked, which,
        with ``unlink_source=False``, is left to the caller, to do once a manifest
        naming the blob is committed (``import_gguf`` does that).

        A symlink source is followed (a chain, relative or absolute): the blob is the
        regular file it names, never a link. ``move`` of a symlink is refused
        (:func:`refuse_moving_symlink`).

        A source that is the store's own file (``Layout.owns``: a blob, reached by any
        path, or anything under the store's folders) is never unlinked and never
        hardlinked: if it is the blob of its digest nothing is written, else it is
        copied. ``check(path)`` is given the store's bytes for the digest (the ingest
        copy or link before it gets its name, or the blob already present) and may
        raise to refuse them; a copy or link is then dropped.

        Raises InvalidInput (unreadable or changing source), InsufficientSpace (also
        ENOSPC while copying), StoreUnwritable/StoreError.
        """
        if mode == "copy":
            try:
                f = open(path, "rb")  # noqa: SIM115  (closed by the with below)
            except OSError as exc:
                raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from exc
            with f:
                size = os.fstat(f.fileno()).st_size
                digest = self.put_blob(_Source(f, str(path)), size=size,  # type: ignore[arg-type]
                                       source=str(path), lease=lease, progress=progress,
                                       check=check)
                return digest, size
        if mode not in ("hardlink", "move"):
            raise InvalidInput(f"unknown import mode {mode!r}",
                               hint="use copy, hardlink or move")
        if mode == "move" and lease is None:
            raise InvalidInput("put_file(mode='move') needs a lease",
                               hint="hold a blobstore.Lease until a manifest names the blob")
        if mode == "move":
            refuse_moving_symlink(path)
        try:
            digest, size = hash_file(path)
        except OSError as exc:
            raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from exc
        if lease is not None:
            lease.add(digests={digest})
        own = self.layout.owns(path)
        existing = self.layout.existing_blob(digest, size)  # (another size: damaged)
        if existing is not None:
            if check is not None:
                check(existing)
        elif own:
            # a store-internal file that is not the blob (an ingest's data, a manifest):
            # linking it would share an inode some other writer may still change
            self._copy_in(path, digest, size, lease, check)
        else:
            self._link_in(path, digest, size, lease, check)
        if mode == "move" and unlink_source and not own:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return digest, size

    def _link_in(self, path: Path, digest: Digest, size: int, lease: Lease | None,
                 check: Callable[[Path], None] | None) -> None:
        """Hardlink ``path`` (hashed as ``digest``) into ``blobs/`` through the one ingest
        writer (``blobstore.ingest.link_in``), or copy it across filesystems."""
        try:
            linked = link_in(self.layout, path, expected=digest, expected_size=size,
                             lease=lease, source=str(path), check=check)
        except (DigestMismatch, SizeMismatch) as exc:
            # what we linked is not what we hashed: the source changed meanwhile
            raise InvalidInput(f"{path} changed while it was being imported; try again") \
                from exc
        if linked is None:  # another filesystem (or no hard links there)
            self._copy_in(path, digest, size, lease, check)

    def _copy_in(self, path: Path, digest: Digest, size: int, lease: Lease | None,
                 check: Callable[[Path], None] | None) -> None:
        """A verified copy of ``path`` (hashed as ``digest``) into ``blobs/``."""
        try:
            f = open(path, "rb")  # noqa: SIM115
        except OSError as exc2:
            raise InvalidInput(f"cannot read {path}: {exc2.strerror or exc2}") from exc2
        with f:
            self.put_blob(_Source(f, str(path)), expected=digest,  # type: ignore[arg-type]
                          size=size, source=str(path), lease=lease, check=check)

    def iter_blob_files(self, *, follow_links: bool = False,
                        ) -> Iterator[tuple[Digest | None, str, os.stat_result]]:
        """Every file in ``blobs/``: (digest or None for a foreign name, path, stat).

        ``follow_links``: a symlink to a regular file counts too, with the target's stat
        (a big blob moved to another disk and linked back: ``verify`` hashes it)."""
        try:
            entries = list(os.scandir(self.layout.blobs))
        except FileNotFoundError:
            return
        for e in entries:
            try:
                st = e.stat(follow_symlinks=follow_links and e.is_symlink())
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
        """The manifest file for ``name``: exact case first, then case-insensitively;
        in each, ``manifests-v2/`` (newer Ollama's) before ``manifests/``, as Ollama
        reads them."""
        # (a manifests-v2/ link counts even when it leads nowhere: for Ollama, which
        # checks with lstat, it is the model, a broken one; get_manifest says so)
        v2 = self.layout.manifest_v2(name)
        if os.path.lexists(v2) and not v2.is_dir():
            return v2
        exact = self.layout.manifest(name)
        if exact.is_file():
            return exact

        # every case-variant folder is tried: one may be empty (left by a killed removal)
        # while another holds the manifest
        def walk(cur: Path, parts: tuple[str, ...], links: bool) -> Path | None:
            if not parts:
                ok = cur.is_file() or (links and cur.is_symlink() and not cur.exists())
                return cur if ok else None
            for nxt in _lower_matches(cur, parts[0]):
                found = walk(nxt, parts[1:], links)
                if found is not None:
                    return found
            return None

        return (walk(self.layout.manifests_v2,
                     v2.relative_to(self.layout.manifests_v2).parts, True)
                or walk(self.layout.manifests, name.parts, False))

    def manifest_paths(self, name: ModelName) -> list[Path]:
        """Every file that names ``name`` as :meth:`find_manifest_path` finds it: the one it
        returns, and the ``manifests/`` file a ``manifests-v2/`` entry hides (``rm`` removes
        both, as Ollama does; either alone would bring the other back)."""
        first = self.find_manifest_path(name)
        if first is None:
            return []
        out = [first]
        if self.layout.is_v2(first):
            # the one Ollama hides: the same name exactly (its legacy path); a name that
            # differs in case is another model for Ollama, and for list (found from
            # outside: rm foo removed Foo's manifest too)
            hidden = self.layout.manifest(self.name_at(first) or name)
            if hidden.is_file():
                out.append(hidden)
        return out

    @_boundary
    def get_manifest(self, name: ModelName) -> Manifest:
        """The decoded manifest; raises ModelNotFound, InvalidManifest."""
        path = self.find_manifest_path(name)
        if path is None:
            raise ModelNotFound(name.display())
        try:
            raw = read_small(str(path))[0]
        except FileNotFoundError as exc:
            if self.layout.is_v2(path) and path.is_symlink():  # its manifest blob is gone
                raise StoreDamaged(name.display(), [link_target(str(path))]) from exc
            raise ModelNotFound(name.display()) from exc
        return decode_stored(raw, source=str(path), read_blob=self.layout.read_small_blob)

    def manifest_file_digest(self, name: ModelName) -> Digest | None:
        """The digest of the model's manifest file (its ID), or None if it cannot be read.
        For an Ollama manifest list it is the list's, not the runner's manifest's."""
        path = self.find_manifest_path(name)
        try:
            return Digest.of_bytes(read_small(str(path))[0]) if path is not None else None
        except OSError:
            return None

    def has_model(self, name: ModelName) -> bool:
        return self.find_manifest_path(name) is not None

    def missing_blobs(self, manifest: Manifest) -> list[Digest]:
        """The blobs of ``manifest`` not present at the size it names (absent, cut short
        or overwritten: the store's one rule, ``has_blob(digest, size)``)."""
        return [d.digest for d in manifest.descriptors if not self.has_blob(d.digest, d.size)]

    def check_blobs(self, name: ModelName, manifest: Manifest) -> None:
        """Raise StoreDamaged (exit 5) unless every blob of ``manifest`` is present at
        its size; the error tells absent blobs from ones of another size."""
        bad = self.missing_blobs(manifest)
        if bad:
            absent = [str(d) for d in bad if not self.has_blob(d)]
            raise StoreDamaged(name.display(), absent,
                               [str(d) for d in bad if str(d) not in absent])

    def put_manifest(self, name: ModelName, manifest: Manifest) -> Path:
        """Write ``manifest`` for ``name``, exactly its raw bytes, after its blobs.

        Under the store lock, checks every blob is present (raises StoreDamaged if not),
        then writes atomically. An existing manifest with the same name in another case
        is replaced in place. Written to ``manifests/``, which every Ollama reads; a
        ``manifests-v2/`` entry of newer Ollama's for the name goes once it is written
        (it would hide the new manifest from both Ollama and blobctl).
        """
        with self.lock():
            self._check_writable()
            self.check_blobs(name, manifest)
            found = self.manifest_paths(name)
            legacy = [p for p in found if not self.layout.is_v2(p)]
            if legacy:
                path = legacy[0]
            elif found:  # a manifests-v2/ name: its manifests/ path, spelt as it is
                path = self.layout.manifest(self.name_at(found[0]) or name)
            else:
                path = self._in_repository_folder(name) or self.layout.manifest(name)
            links = {p: _link_id(p) for p in found if self.layout.is_v2(p)}
            try:
                write_atomic(path, manifest.raw, self.layout.ingest)
                for p, seen in links.items():
                    # only the link found: one Ollama made meanwhile (it takes no lock)
                    # is newer than this manifest, and stays
                    if seen is not None and _link_id(p) == seen:
                        p.unlink(missing_ok=True)
                        fsync_dir(p.parent)
            except OSError as exc:  # (a full disk is exit 8, as for every write)
                raise os_error(exc, str(self.root)) from exc
        _warn_ollama_prune(name, manifest)
        return path

    def _in_repository_folder(self, name: ModelName) -> Path | None:
        """A new tag of a repository that is there in another case goes into that
        repository's folder, spelt as it is: names compare case-insensitively, and a
        second folder (``T/M`` beside ``t/m``) would split its tags (found from outside:
        ``serve`` then listed the tags of one folder only, and its catalog one of them)."""
        host, ns, model, tag = name.parts

        def walk(cur: Path, parts: tuple[str, ...]) -> Path | None:
            if not parts:
                return cur if any(p.is_file() for p in cur.iterdir()) else None
            for nxt in _lower_matches(cur, parts[0]):
                if nxt.is_dir():
                    found = walk(nxt, parts[1:])
                    if found is not None:
                        return found
            return None

        try:
            folder = walk(self.layout.manifests, (host, ns, model))
        except OSError:
            return None
        return folder / tag if folder is not None else None

    def _check_writable(self) -> None:
        """Raise StoreUnwritable early for a store this process cannot change."""
        if not os.access(self.layout.manifests, os.W_OK) and self.layout.manifests.exists():
            try:
                ro = bool(os.statvfs(self.layout.manifests).f_flag & os.ST_RDONLY)
            except OSError:
                ro = False
            raise StoreUnwritable(str(self.layout.manifests),
                                  "read-only file system" if ro else "permission denied")

    @_boundary
    def list_models(self, problems: list[tuple[str, str]] | None = None) -> list[ModelEntry]:
        """Every ``manifests/*/*/*/*`` entry, newest first, like ``ollama list``.

        Files whose path is not a valid name are skipped (logged); manifests that do not
        decode are listed with ``error`` set so that ``verify`` can report them. Folders
        and files that exist but cannot be read are skipped with a warning, and appended
        to ``problems`` as ``(path, reason)`` when given.
        """
        with collector_paused():
            return self._list_models(problems)

    def _list_models(self, problems: list[tuple[str, str]] | None) -> list[ModelEntry]:
        states = self.model_states()
        index = self.state.manifest_index() if self.state is not None else None
        out: list[ModelEntry] = []
        present: set[str] = set()
        loaded = 0

        def unreadable(path: str, reason: str) -> None:
            log.warning("cannot read %s: %s", path, reason)
            if problems is not None:
                problems.append((path, reason))

        in_v2: set[tuple[str, ...]] = set()
        for f in walk_manifests(self.layout, index, read_unnamed=False,
                                on_problem=unreadable):
            present.add(f.path)
            if f.name is None:
                log.debug("skipping %s: not a valid model name", f.path)
                continue
            if self.layout.is_v2(f.path):
                in_v2.add(f.name.parts)
            elif f.name.parts in in_v2:  # Ollama reads the manifests-v2/ one (first)
                continue
            loaded += 1
            out.append(ModelEntry(f.name, f.path, f.st.st_mtime, f.summary, f.error,
                                  states.get(f.name.key), f.manifest, self.layout))
        if index is not None:
            index.flush(present)
        out.sort(key=lambda e: (-e.mtime, e.name.key))
        return out

    @_boundary
    def resolve(self, name: ModelName, *, record: bool = True,
                lease: Lease | None = None) -> ResolvedModel:
        """A model's GGUF (and projector/adapter) paths. Records a use when asked.

        With ``lease`` (held by the caller): every blob of the manifest returned is named
        by the lease before it is checked, so GC and ``rm`` cannot delete it between this
        check and the caller's load, nor later while the lease is held. The manifest is
        read again once the lease names its blobs; one replaced meanwhile (another
        process's import, pull or update of the name) is resolved again, its blobs
        leased too (spec/api.md, "The store as llama-cpp-python's model source").

        Raises ModelNotFound, or StoreDamaged if a blob the model needs is missing.
        """
        manifest = self.get_manifest(name)
        while lease is not None and not manifest.blob_digests <= lease.digests:
            lease.add(digests=manifest.blob_digests)
            manifest = self.get_manifest(name)  # (read after every process sees the lease)
        self.check_blobs(name, manifest)
        models = [self.blob_path(d.digest) for d in manifest.layers_of(LAYER_MODEL)]
        resolved = ResolvedModel(
            name=name,
            manifest=manifest,
            model_path=models[0] if models else None,
            projector_paths=[self.blob_path(d.digest)
                             for d in manifest.layers_of(LAYER_PROJECTOR)],
            adapter_paths=[self.blob_path(d.digest) for d in manifest.layers_of(LAYER_ADAPTER)],
            model_paths=models,
        )
        if record:
            self.record_use(name)
        return resolved

    # ------------------------------------------------------------------ state ops
    @_boundary
    def canonical_name(self, name: ModelName) -> ModelName:
        """The name as stored on disk (its case), or ``name`` if there is none."""
        path = self.find_manifest_path(name)
        return (self.name_at(path) if path is not None else None) or name

    def name_at(self, path: Path | str) -> ModelName | None:
        """The model name of the manifest file at ``path`` (None: not a model's path)."""
        for root, host_of in self.layout.manifest_roots():
            try:
                rel = Path(path).relative_to(root).parts
            except ValueError:
                continue
            try:
                return ModelName(host_of(rel[0]), *rel[1:]) if len(rel) == 4 else None
            except InvalidName:
                return None
        return None

    def record_use(self, name: ModelName, when: float | None = None) -> None:
        st = self.state
        if st is None or st.readonly:  # (opening it read-only said uses are not recorded)
            return
        try:
            st.record_use(self.canonical_name(name), when)
        except StoreUnwritable as exc:
            log.warning("could not record use of %s: %s", name.display(), exc.message)

    @_boundary
    def set_pinned_all(self, names: list[ModelName], pinned: bool) -> list[ModelName]:
        """:meth:`set_pinned` of each name, after checking that every one is a model here
        (ModelNotFound for the first that is not: then nothing changed)."""
        for name in names:
            if not self.has_model(name):
                raise ModelNotFound(name.display())
        return [self.set_pinned(name, pinned) for name in names]

    @_boundary
    def set_pinned(self, name: ModelName, pinned: bool) -> ModelName:
        """Pin or unpin a model; returns its name as stored.

        Under the store lock, so a GC or ``rm`` either finished before (the model may
        be gone: ModelNotFound) or sees the pin.
        """
        if not self.has_model(name):  # (before the lock: which makes the store's folders)
            raise ModelNotFound(name.display())
        with self.lock():
            if not self.has_model(name):
                raise ModelNotFound(name.display())
            canonical = self.canonical_name(name)
            self._require_state().set_pinned(canonical, pinned)
        return canonical

    @_boundary
    def get_config(self, key: str) -> str | None:
        """A setting, None when unset. Raises StateUnreadable where a state database
        exists but cannot be read (a cap must not silently read as "none")."""
        st = self._readable_state()
        return st.get_config(key) if st is not None else None

    @_boundary
    def set_config(self, key: str, value: str | None) -> None:
        self._require_state().set_config(key, value)

    # ------------------------------------------------------------------ removal
    @_boundary
    def referenced_digests(
        self, on_problem: Callable[[str, str], None] | None = None
    ) -> set[Digest]:
        """Digests named by every manifest (whatever an undecodable one mentions, too).

        Raises ManifestsUnreadable where a part of ``manifests/`` cannot be read: what
        it references is unknown, and a caller would take it for unreferenced; or, with
        ``on_problem(path, reason)``, tells that and goes on (a report, not a removal)."""
        index = self.state.manifest_index() if self.state is not None else None
        refs: set[Digest] = set()
        for f in walk_manifests(self.layout, index, on_problem=on_problem):
            refs |= f.refs
        if index is not None:
            index.flush()
        return refs

    def is_pinned(self, name: ModelName) -> bool:
        """Whether the model is pinned; raises StateUnreadable if that is unknown."""
        st = self.model_states().get(self.canonical_name(name).key)
        return bool(st and st.pinned)

    @_boundary
    def remove_model(self, name: ModelName, *, force: bool = False) -> RemoveResult:
        """Remove a model: its manifest first, then blobs no other manifest uses.

        A pinned model is refused with ModelPinned unless ``force``. Blobs held by a
        live lease (a running pull) or open/mapped by a running process (this one
        too) are kept. Runs under the store lock (reentrant: callable inside
        ``with store.lock():``). Raises ModelNotFound, ModelPinned, ManifestsUnreadable
        (another manifest cannot be read: what it uses is unknown; nothing removed).
        """
        return removal.remove_model(self, name, force=force)

    @_boundary
    def remove_models(self, names: list[ModelName], *,
                      force: bool = False) -> list[RemoveResult]:
        """Remove several models as :meth:`remove_model` removes one, checking every name
        first (a refused or unknown one removes nothing), with one look at the manifests,
        leases and running processes for all of them (see
        :func:`blobstore.removal.remove_models`). Names of the same files count once."""
        return removal.remove_models(self, names, force=force)

    def forget_removed(self, names: list[ModelName]) -> None:
        """Drop the state (pin, last use) of models whose manifests were removed (see
        :func:`blobstore.removal.forget_removed`). Call under the store lock."""
        removal.forget_removed(self, names)

    # ------------------------------------------------------------------ checks
    @_boundary
    def verify(
        self, *, progress: Callable[[int, int], None] | None = None, workers: int = 2
    ) -> VerifyReport:
        """Rehash every blob; report corrupt, wrongly sized and missing blobs.

        ``progress(done_bytes, total_bytes)`` is called as blobs finish. Read-only.
        """
        return verify_store(self, progress=progress, workers=workers)

    def check_blob_content(self, name: ModelName, digest: Digest) -> None:
        """Rehash one blob of model ``name``; raise StoreDamaged (exit 5) if its bytes
        are not ``digest``'s. For a caller whose reading of the blob failed: damage,
        not bad input, when the bytes are not the ones the manifest names."""
        path = self.layout.existing_blob(digest)
        if path is None:
            raise StoreDamaged(name.display(), [str(digest)])
        if not blob_intact(path, digest):
            raise StoreDamaged(name.display(), [], [str(digest)])

    @_boundary
    def disk_usage(self) -> UsageReport:
        """Unique bytes on disk, and per model its own vs shared bytes (see
        :func:`blobstore.usage.disk_usage`). Read-only."""
        return disk_usage(self)


def _warn_ollama_prune(name: ModelName, manifest: Manifest) -> None:
    """Ollama's startup prune (server/images.go PruneLayers) removes every file in
    ``blobs/`` whose name is not ``sha256-<hex>`` once it is an hour old, unless
    ``OLLAMA_NOPRUNE`` is set: a model with other blobs loses them to an Ollama server
    that shares the folder (spec/store-layout.md, "Blobs"). Said once per model."""
    algs = sorted({d.digest.algorithm for d in manifest.descriptors} - {"sha256"})
    if algs:
        log.warning("%s uses %s blobs, which an Ollama server sharing this folder deletes "
                    "when it starts (its prune keeps only sha256 names) unless it runs "
                    "with OLLAMA_NOPRUNE=1", name.display(), "/".join(algs))
