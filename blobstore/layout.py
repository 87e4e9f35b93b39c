"""Where things live in a store, and the primitives that write there safely.

See spec/store-layout.md. A store root holds exactly what Ollama expects::

    blobs/<alg>-<hex>                                 committed, verified, read-only
    manifests/<host>/<namespace>/<model>/<tag>        manifest bytes as received
    .blobctl/                                         blobctl's own state (Ollama ignores it)
        state.db                                      sqlite (WAL): last use, pins, config
        ingest/                                       temp files of writes in progress
        leases/                                       one file per live pull / user
        locks/                                        lock files (filelock)
        gc-intent.json                                a GC's unfinished work, if any

Every write goes to a temp file under ``.blobctl/ingest`` (same filesystem), is fsynced,
checked, then ``os.replace``-d into place, and the directory is fsynced. Nothing but
complete, verified content ever stands under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from blobstore.digest import Digest
from blobstore.errors import ManifestsUnreadable
from blobstore.name import ModelName

__all__ = ["STATE_DIRNAME", "Layout", "fsync_dir", "read_small", "start_writeback",
           "write_atomic"]

STATE_DIRNAME = ".blobctl"


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink in it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait
_writeback: list[Callable[[int, int, int, int], int] | None] = []  # [] unknown, [None] none


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``[offset, offset + length)`` of a file to disk without waiting for it
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``); a no-op where unsupported.

    A blob's bytes must be on disk before it gets its name, and an ``fsync`` of a freshly
    written multi-GB file waits for all of it at the very end (0.6 s per GiB here, on top
    of a pull's transfer time). Writeback started as each part is written overlaps that
    with the transfer; the closing ``fsync`` is still what makes the blob durable.
    Errors are ignored: that ``fsync`` reports them.
    """
    if not _writeback:
        _writeback.append(_load_sync_file_range())
    call = _writeback[0]
    if call is None or length <= 0:
        return
    if call(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        import ctypes

        if ctypes.get_errno() == errno.ENOSYS:
            _writeback[0] = None  # this kernel does not have it (other errors: this fd)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range  # ctypes lets the GIL go during the call
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
    except (OSError, AttributeError, ImportError):
        return None
    return fn


def unreadable(on_problem: Callable[[str, str], None] | None, path: str,
               exc: OSError) -> None:
    """A part of ``manifests/`` that exists but cannot be read: told to ``on_problem``,
    or, without one, raised as ``ManifestsUnreadable`` (the one rule of both walkers)."""
    reason = exc.strerror or str(exc)
    if on_problem is None:
        raise ManifestsUnreadable(path, reason) from exc
    on_problem(path, reason)


def read_small(path: str) -> tuple[bytes, os.stat_result]:
    """Read a small file (a manifest) and its stat with the fewest syscalls."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        chunks = [os.read(fd, st.st_size + 1)]
        while chunks[-1] and len(chunks[-1]) > st.st_size:  # grew meanwhile: read the rest
            chunks.append(os.read(fd, 1 << 20))
        return b"".join(chunks), st
    finally:
        os.close(fd)


def write_atomic(target: Path, data: bytes, tmp_dir: Path, *, mode: int = 0o644,
                 durable: bool = True) -> None:
    """Write ``data`` to ``target`` atomically: temp file, fsync, rename, dir fsync.

    Readers see either the old file or the complete new one, never a mix, even if the
    process is killed at any instant. ``durable=False`` leaves out both fsyncs, for a file
    that means nothing after a power loss (a lease: its holder is gone then) or whose
    loss then costs nothing but work: it is still atomic for every process of this boot.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="w-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(target.parent)


class Layout:
    """Path arithmetic for one store root. Never touches the disk unless asked."""

    __slots__ = ("blobs", "ingest", "leases", "locks", "manifests", "root", "state_dir")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.manifests = root / "manifests"
        self.state_dir = root / STATE_DIRNAME
        self.ingest = self.state_dir / "ingest"
        self.leases = self.state_dir / "leases"
        self.locks = self.state_dir / "locks"

    @property
    def state_db(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def gc_intent(self) -> Path:
        return self.state_dir / "gc-intent.json"

    @property
    def store_lock(self) -> Path:
        return self.locks / "store.lock"

    def blob(self, digest: Digest) -> Path:
        """The canonical path of a blob (whether or not it exists)."""
        return self.blobs / digest.filename

    def legacy_blob(self, digest: Digest) -> Path:
        return self.blobs / digest.legacy_filename

    def existing_blob(self, digest: Digest, size: int | None = None) -> Path | None:
        """The path of the blob if present, under its canonical or legacy name; with
        ``size``, only a file of that size counts (one of another size at the name is
        damaged, cut short or overwritten: a writer fetches or copies it again and its
        verified commit replaces it)."""
        for p in (self.blob(digest), self.legacy_blob(digest)):
            try:
                st = p.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (size is None or st.st_size == size):
                return p
        return None

    def blob_lock(self, digest: Digest) -> Path:
        return self.locks / f"{digest.filename}.lock"

    def manifest(self, name: ModelName) -> Path:
        """The manifest path for a name, with the name's case as written."""
        return self.manifests.joinpath(*name.parts)

    def iter_manifest_files(
        self, on_problem: Callable[[str, str], None] | None = None
    ) -> Iterator[tuple[tuple[str, str, str, str], str]]:
        """Every ``manifests/*/*/*/*`` regular file (path as a string), as Ollama globs.

        A folder or entry that exists but cannot be read (permissions, a symlink loop,
        an I/O error) may hide manifests, and so the blobs they use: it is passed to
        ``on_problem(path, reason)``, or, without one, raised as ``ManifestsUnreadable``
        (what GC and ``rm`` need: never take an unreadable folder for an empty one).
        Entries that vanish meanwhile, dangling symlinks and stray files at the folder
        levels are not problems (they hold no manifest)."""

        def entries(path: str, dirs: bool) -> list[os.DirEntry[str]]:
            try:
                found = list(os.scandir(path))
            except (FileNotFoundError, NotADirectoryError):
                return []  # gone, or replaced meanwhile
            except OSError as exc:
                unreadable(on_problem, path, exc)
                return []
            out = []
            for e in found:
                try:
                    if e.is_dir() if dirs else e.is_file():
                        out.append(e)
                except OSError as exc:  # (a dangling link is just False)
                    unreadable(on_problem, e.path, exc)
            return out

        if not os.path.lexists(self.manifests):
            return
        for h in entries(str(self.manifests), True):
            for ns in entries(h.path, True):
                for model in entries(ns.path, True):
                    for t in entries(model.path, False):
                        yield (h.name, ns.name, model.name, t.name), t.path

    def owns(self, path: Path | str) -> bool:
        """True when ``path`` is one of this store's own files: a file anywhere under the
        store's folders (``blobs/``, ``manifests/``, ``.blobctl/``, the root), reached
        however (a symlinked folder, a bind mount, a legacy ``sha256:<hex>`` name), or
        the target of a blob that is a symlink (a blob moved to another disk).

        Folders are compared by identity (device and inode), not by spelling, so no
        alias of a store folder escapes. A hardlink of a blob *outside* the store is not
        the store's: unlinking that name leaves the blob whole. Reads the disk; a path
        that cannot be examined counts as not owned (it is not a store file we can see).
        """
        try:
            real = Path(os.path.realpath(path))
            target = os.stat(real)
        except OSError:
            return False
        if self._under(real.parents):
            return True
        try:
            entries = list(os.scandir(self.blobs))
        except OSError:
            return False
        for e in entries:
            with contextlib.suppress(OSError):
                if e.is_symlink():
                    st = os.stat(e.path)
                    if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                        return True
        return False

    def _under(self, folders: Sequence[Path]) -> bool:
        """True when one of ``folders`` is one of the store's own folders (the root,
        ``blobs/``, ``manifests/``, ``.blobctl/``), compared by device and inode."""
        own: set[tuple[int, int]] = set()
        for d in (self.root, self.blobs, self.manifests, self.state_dir):
            with contextlib.suppress(OSError):
                st = os.stat(d)
                own.add((st.st_dev, st.st_ino))
        for folder in folders:
            with contextlib.suppress(OSError):
                st = os.stat(folder)
                if (st.st_dev, st.st_ino) in own:
                    return True
        return False

    def contains(self, folder: Path | str) -> bool:
        """True when ``folder`` (existing or not yet) is one of the store's folders or lies
        anywhere below one, reached however (a symlinked folder, ``..``, a bind mount of
        the store or of any folder in it): what is written there would be read as the
        store's own files. Every folder of the store is compared by identity (device and
        inode) with ``folder`` and the folders above it; reads the disk (a walk of the
        store's folders, not of its files' contents)."""
        real = Path(os.path.realpath(folder))
        mine = self._folder_ids()
        for d in (real, *real.parents):
            with contextlib.suppress(OSError):
                st = os.stat(d)
                if (st.st_dev, st.st_ino) in mine:
                    return True
        return False

    def _folder_ids(self) -> set[tuple[int, int]]:
        """Device and inode of every folder of the store (symlinked ones followed once:
        ``blobs/`` moved to another disk)."""
        ids: set[tuple[int, int]] = set()
        stack = [str(d) for d in (self.root, self.blobs, self.manifests, self.state_dir)]
        while stack:
            d = stack.pop()
            try:
                st = os.stat(d)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in ids:
                continue
            ids.add((st.st_dev, st.st_ino))
            try:
                with os.scandir(d) as it:
                    stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
            except OSError:
                continue
        return ids

    def ensure(self) -> None:
        """Create the folders of a store (idempotent)."""
        for p in (self.blobs, self.manifests, self.ingest, self.leases, self.locks):
            p.mkdir(parents=True, exist_ok=True)
