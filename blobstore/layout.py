"""Where things live in a store, and the primitives that write there safely.

See spec/store-layout.md. A store root holds exactly what Ollama expects::

    blobs/<alg>-<hex>                                 committed, verified, read-only
    manifests/<host>/<namespace>/<model>/<tag>        manifest bytes as received
    manifests-v2/<host>/<namespace>/<model>/<tag>     newer Ollama's: a link to the
                                                      manifest's own blob (read, not written)
    .blobctl/                                         blobctl's own state (Ollama ignores it)
        state.db                                      sqlite (WAL): last use, pins, config
        ingest/                                       temp files of writes in progress
        leases/                                       one file per live pull / user
        locks/                                        lock files (filelock)
        gc-intent.json                                a GC's unfinished work, if any

Every write goes to a temp file on the target's file system (``.blobctl/ingest``; blobs on
another disk: ``Layout.blob_ingest``; a manifest on another disk: beside it), is fsynced,
checked, then ``os.replace``-d into place, and the directory is fsynced. Nothing but
complete, verified content ever stands under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from blobstore.digest import Digest
from blobstore.errors import ManifestsUnreadable
from blobstore.manifest import MAX_MANIFEST_SIZE
from blobstore.name import DEFAULT_HOST, ModelName
from blobstore.owner import hand_over, make_dirs

__all__ = ["BLOB_INGEST_DIRNAME", "OLLAMA_V2_HOST", "STATE_DIRNAME", "V2_DIRNAME", "Layout",
           "file_mode", "fsync_dir", "read_small", "refused_path", "start_writeback",
           "write_atomic"]

STATE_DIRNAME = ".blobctl"
# the blob ingest inside blobs/ for a blobs/ on another file system (Layout.blob_ingest):
# a folder, which Ollama's prune skips (newer) or cannot remove while it holds anything
BLOB_INGEST_DIRNAME = ".blobctl-ingest"
# Ollama (since PR #15735, 2026) names models in ``manifests-v2/``: each entry is a link
# (symlink, else hardlink, else copy) to the manifest's bytes stored as a blob, and the
# default registry's host is spelt ``ollama.com`` there (``manifest/paths.go``).
V2_DIRNAME = "manifests-v2"
OLLAMA_V2_HOST = "ollama.com"


def _v2_host(host: str) -> str:
    """The host folder of ``manifests-v2/`` for a model's host (Ollama's canonicalV2Name)."""
    return OLLAMA_V2_HOST if host.lower() in (DEFAULT_HOST, OLLAMA_V2_HOST) else host


def _logical_host(host: str) -> str:
    """The model's host for a ``manifests-v2/`` host folder (Ollama's normalizeLogicalName:
    both spellings of the default registry are one)."""
    return DEFAULT_HOST if host.lower() in (DEFAULT_HOST, OLLAMA_V2_HOST) else host


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


# Files blobctl makes are created with this mode, the umask taking its share, as every
# ordinary tool does (Ollama: os.Create, 0666): in a group-shared store (a setgid folder,
# umask 002) a group member can then take over what another one left (an interrupted
# download, a lock file, state). Committed blobs alone are made read-only (0444).
CREATE_MODE = 0o666


def file_mode(mode: int = CREATE_MODE) -> int:
    """``mode`` less this process's umask: what ``open(O_CREAT, mode)`` gives a new file
    (for a file whose mode is set afterwards, e.g. one put back from read-only)."""
    try:  # Linux 4.7+: read without changing it (os.umask is process-wide, not atomic)
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return mode & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return mode & ~old


def refused_path(exc: OSError, default: str) -> str:
    """The file or folder an ``EACCES``/``EPERM``/``EROFS`` error was about: of the paths
    it names (and the folders above them), the first that exists and this process cannot
    write (a folder: write and enter, as creating or removing in it needs); else the path
    it names; else ``default`` (e.g. the store root). An error names the file it meant to
    make or remove, while what refused it is often its folder."""
    names = [os.fsdecode(f) for f in (exc.filename, exc.filename2)
             if isinstance(f, (str, bytes, os.PathLike))]
    for name in names:
        p = Path(name)
        for q in (p, *p.parents):
            try:
                st = os.stat(q)
            except OSError:
                continue
            need = os.W_OK | os.X_OK if stat.S_ISDIR(st.st_mode) else os.W_OK
            if not os.access(q, need):
                return str(q)
            if q != p:
                break  # its folder could be written: the file itself was refused
    return names[0] if names else default


def write_atomic(target: Path, data: bytes, tmp_dir: Path, *, mode: int | None = None,
                 durable: bool = True) -> None:
    """Write ``data`` to ``target`` atomically: temp file, fsync, rename, dir fsync.

    Readers see either the old file or the complete new one, never a mix, even if the
    process is killed at any instant. ``durable=False`` leaves out both fsyncs, for a file
    that means nothing after a power loss (a lease: its holder is gone then) or whose
    loss then costs nothing but work: it is still atomic for every process of this boot.
    When ``target`` is on another file system than ``tmp_dir`` (a ``manifests/`` that is
    a symlink to another disk), the temp file is made again beside ``target``, as
    ``.<name>.blobctl-w-*.tmp`` (an invalid manifest name: no lister takes it for a model).
    The file's mode is ``mode`` if given, else 0666 less the umask (``CREATE_MODE``).
    """
    make_dirs(target.parent)
    make_dirs(tmp_dir)
    try:
        _write_replace(target, data, tmp_dir, "w-", mode, durable)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _write_replace(target, data, target.parent, f".{target.name}.blobctl-w-", mode,
                       durable)
    if durable:
        fsync_dir(target.parent)


def _write_replace(target: Path, data: bytes, tmp_dir: Path, prefix: str, mode: int | None,
                   durable: bool) -> None:
    fd, tmp = _create_temp(tmp_dir, prefix, ".tmp")
    try:
        hand_over(tmp, fd, folder=target.parent)  # (the owner of the target's folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        for tries in range(_FOLDER_TRIES, 0, -1):
            try:
                os.replace(tmp, target)
                break
            except FileNotFoundError:
                # the folder went meanwhile: Ollama removes empty manifest folders after
                # each write and rm of its own (PruneDirectory), and takes no lock (found
                # from outside: an import failed at its last step, "check permissions")
                if tries == 1 or not os.path.exists(tmp):
                    raise
                make_dirs(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _create_temp(folder: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file of a random name in ``folder``, opened for writing, of mode 0666 less
    the umask (``tempfile.mkstemp`` makes 0600 files, which no group member could read)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{os.urandom(6).hex()}{suffix}")
        try:
            return os.open(path, flags, CREATE_MODE), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp file name", str(folder))


# how often a write makes its target's folder again when another program removed it
_FOLDER_TRIES = 5

# how deep ``Layout.contains`` looks below the store's folders: a manifest is five
# levels below the root (six for Ollama's kind names); a symlink elsewhere is not walked
# into a whole disk
_FOLDER_DEPTH = 7


class Layout:
    """Path arithmetic for one store root. Never touches the disk unless asked."""

    __slots__ = ("_blob_ingest", "blobs", "ingest", "leases", "locks", "manifests",
                 "manifests_v2", "root", "state_dir")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.manifests = root / "manifests"
        self.manifests_v2 = root / V2_DIRNAME
        self.state_dir = root / STATE_DIRNAME
        self.ingest = self.state_dir / "ingest"
        self.leases = self.state_dir / "leases"
        self.locks = self.state_dir / "locks"
        self._blob_ingest: Path | None = None

    @property
    def blob_ingest(self) -> Path:
        """Where blobs are written before they get their name: ``.blobctl/ingest``, or
        ``blobs/.blobctl-ingest`` when ``blobs/`` (resolved) is on another file system
        than ``.blobctl/`` (a symlink to a big disk): a commit is a rename, and the bytes
        belong on the disk meant for them (spec/store-layout.md, "Ingest"). Stats the
        folders once (and again while ``blobs/`` is not there yet)."""
        if self._blob_ingest is None:
            try:
                blobs_dev = os.stat(self.blobs).st_dev
            except OSError:
                return self.ingest  # made beside the rest when it is made
            here = self.ingest
            for p in (self.state_dir, self.root):
                with contextlib.suppress(OSError):
                    if os.stat(p).st_dev != blobs_dev:
                        here = self.blobs / BLOB_INGEST_DIRNAME
                    break
            self._blob_ingest = here
        return self._blob_ingest

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

    def read_small_blob(self, digest: Digest, limit: int = MAX_MANIFEST_SIZE) -> bytes | None:
        """The bytes of a blob of at most ``limit`` bytes (a manifest stored as a blob),
        or None: absent, larger, or unreadable."""
        p = self.existing_blob(digest)
        try:
            if p is None or p.stat().st_size > limit:
                return None
            return p.read_bytes()
        except OSError:
            return None

    def blob_lock(self, digest: Digest) -> Path:
        return self.locks / f"{digest.filename}.lock"

    def manifest(self, name: ModelName) -> Path:
        """The manifest path for a name, with the name's case as written."""
        return self.manifests.joinpath(*name.parts)

    def manifest_v2(self, name: ModelName) -> Path:
        """Where newer Ollama names the model in ``manifests-v2/`` (the name's case)."""
        host, ns, model, tag = name.parts
        return self.manifests_v2 / _v2_host(host) / ns / model / tag

    def manifest_roots(self) -> tuple[tuple[Path, Callable[[str], str]], ...]:
        """The two manifest trees, ``manifests-v2/`` first (Ollama reads it first: a model
        in both is the ``manifests-v2/`` one), each with its host-folder-to-host rule."""
        return ((self.manifests_v2, _logical_host), (self.manifests, str))

    def is_v2(self, path: str | Path) -> bool:
        """Whether a manifest path is in ``manifests-v2/`` (its entry is a link to the
        manifest's own blob, which the model then references too)."""
        return str(path).startswith(str(self.manifests_v2) + os.sep)

    def iter_manifest_files(
        self, on_problem: Callable[[str, str], None] | None = None
    ) -> Iterator[tuple[tuple[str, str, str, str], str]]:
        """Every ``manifests-v2/*/*/*/*`` then ``manifests/*/*/*/*`` file (path as a string;
        a symlink to a file counts), as Ollama globs them, with the model's name parts
        (``ollama.com`` in ``manifests-v2/`` is the default registry's host).

        A folder or entry that exists but cannot be read (permissions, a symlink loop,
        an I/O error) may hide manifests, and so the blobs they use: it is passed to
        ``on_problem(path, reason)``, or, without one, raised as ``ManifestsUnreadable``
        (what GC and ``rm`` need: never take an unreadable folder for an empty one).
        Entries that vanish meanwhile, dangling symlinks and stray files at the folder
        levels are not problems (they hold no manifest); a dangling symlink at a
        ``manifests-v2/`` name is yielded (a model whose manifest blob is missing)."""

        dangling_too = False

        def scan(path: str) -> tuple[list[os.DirEntry[str]], list[os.DirEntry[str]]]:
            """The folders and the files in ``path`` (a symlink counts as its target)."""
            try:
                found = list(os.scandir(path))
            except (FileNotFoundError, NotADirectoryError):
                return [], []  # gone, or replaced meanwhile
            except OSError as exc:
                unreadable(on_problem, path, exc)
                return [], []
            dirs, files = [], []
            for e in found:
                try:  # (a dangling link is neither, but see below)
                    if e.is_dir():
                        dirs.append(e)
                    elif e.is_file() or (dangling_too and e.is_symlink()
                                         and not os.path.exists(e.path)):
                        files.append(e)
                except OSError as exc:
                    unreadable(on_problem, e.path, exc)
            return dirs, files

        for root, host_of in self.manifest_roots():
            if not os.path.lexists(root):
                continue
            # a manifests-v2/ name whose manifest blob is gone is still the model for
            # Ollama (it checks with lstat): a broken one, hiding a manifests/ file
            dangling_too = root == self.manifests_v2
            for h in scan(str(root))[0]:
                host = host_of(h.name)
                for ns in scan(h.path)[0]:
                    for model in scan(ns.path)[0]:
                        subs, tags = scan(model.path)
                        for t in tags:
                            yield (host, ns.name, model.name, t.name), t.path
                        # Ollama's five-level "kind" names (<host>/<ns>/<kind>/<model>/
                        # <tag>): not a model blobctl names (a "/" in the model part),
                        # but GC must see what they use
                        for sub in subs:
                            for t in scan(sub.path)[1]:
                                yield (host, ns.name, f"{model.name}/{sub.name}", t.name), t.path

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
        ``blobs/``, ``manifests/``, ``manifests-v2/``, ``.blobctl/``), compared by device
        and inode."""
        own: set[tuple[int, int]] = set()
        for d in (self.root, self.blobs, self.manifests, self.manifests_v2, self.state_dir):
            with contextlib.suppress(OSError):
                st = os.stat(d)
                own.add((st.st_dev, st.st_ino))
        for folder in folders:
            with contextlib.suppress(OSError):
                st = os.stat(folder)
                if (st.st_dev, st.st_ino) in own:
                    return True
        return False

    def contains(self, folder: Path | str,
                 mine: set[tuple[int, int]] | None = None) -> bool:
        """True when ``folder`` (existing or not yet) is one of the store's folders or lies
        anywhere below one, reached however (a symlinked folder, ``..``, a bind mount of
        the store or of any folder in it): what is written there would be read as the
        store's own files. Every folder of the store is compared by identity (device and
        inode) with ``folder`` and the folders above it; reads the disk (a walk of the
        store's folders, not of its files' contents). ``mine``: ``folder_ids()`` taken
        once for many checks (each call would walk the store again)."""
        real = Path(os.path.realpath(folder))
        if mine is None:
            mine = self.folder_ids()
        for d in (real, *real.parents):
            with contextlib.suppress(OSError):
                st = os.stat(d)
                if (st.st_dev, st.st_ino) in mine:
                    return True
        return False

    def folder_ids(self) -> set[tuple[int, int]]:
        """Device and inode of every folder of the store (symlinked ones followed once:
        ``blobs/`` moved to another disk)."""
        ids: set[tuple[int, int]] = set()
        stack = [(str(d), 0) for d in (self.root, self.blobs, self.manifests,
                                       self.manifests_v2, self.state_dir)]
        while stack:
            d, depth = stack.pop()
            try:
                st = os.stat(d)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in ids:
                continue
            ids.add((st.st_dev, st.st_ino))
            if depth >= _FOLDER_DEPTH:
                continue
            try:  # symlinked folders too: the manifest walk follows them (found by review)
                with os.scandir(d) as it:
                    stack.extend((e.path, depth + 1) for e in it if e.is_dir())
            except OSError:
                continue
        return ids

    def ensure(self) -> None:
        """Create the folders of a store (idempotent)."""
        for p in (self.blobs, self.manifests, self.ingest, self.leases, self.locks):
            make_dirs(p)
