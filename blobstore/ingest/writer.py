"""The one ingest writer (:class:`Ingest`) and its two historical faces,
:class:`ResumableIngest` (offset writes) and :class:`BlobWriter` (appends), and
:func:`link_in` (a hardlinked file, verified). See the package docstring."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec

from blobstore.digest import DEFAULT_ALGORITHM, Digest, Hasher, new_hasher
from blobstore.errors import (
    DigestMismatch,
    InsufficientSpace,
    InvalidDigest,
    InvalidInput,
    SizeMismatch,
    StoreError,
    StoreUnwritable,
)
from blobstore.ingest.folder import (
    CLOEXEC,
    HEARTBEAT_SECONDS,
    JOURNAL_MAGIC,
    PRIVATE_PREFIX,
    RECORD,
    STAGING_PREFIX,
    IngestState,
    boot_id,
    coalesce,
    covered_chunks,
    owner_record,
    owner_status,
    read_state,
)
from blobstore.layout import (
    CREATE_MODE,
    Layout,
    file_mode,
    fsync_dir,
    refused_path,
    start_writeback,
    write_atomic,
)
from blobstore.lease import Lease
from blobstore.owner import hand_over, make_dirs

log = logging.getLogger("blobctl.ingest")

__all__ = ["CHUNK", "WRITEBACK_BYTES", "BlobWriter", "Ingest", "ResumableIngest",
           "check_free_space", "hash_file", "is_upload_key", "link_in"]

CHUNK = 1 << 20
PREFETCH_SLICE = 128 << 10  # bytes per read-ahead request (Ingest.prefetch)
_DONE_COALESCE = 4096  # merge the done list when it holds this many ranges
WRITEBACK_BYTES = 8 << 20  # sequential writers (appends, one-stream downloads) start the
# writeback of each such stretch as it is written
_TOKEN_BYTES = 12
# exactly what Ingest.new generates: nothing else is ever looked up on disk
_UPLOAD_KEY = re.compile(re.escape(PRIVATE_PREFIX) + f"[0-9a-f]{{{2 * _TOKEN_BYTES}}}")


def is_upload_key(key: str) -> bool:
    """Whether ``key`` has the exact form of an ``up-`` key :meth:`Ingest.new` makes
    (checked before any lookup, lease or I/O: a hostile id never reaches the disk)."""
    return _UPLOAD_KEY.fullmatch(key) is not None

def check_free_space(path: Path, needed: int, *, reserve: int = 64 << 20) -> None:
    """Raise InsufficientSpace unless ``needed`` bytes (+ a small reserve: the disk is never
    filled to the last block by blobctl) fit at ``path``; the message says both."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return
    if needed + reserve > free:
        raise InsufficientSpace(str(path), needed + reserve - free, free, size=needed,
                                reserve=reserve)


def hash_file(path: Path, algorithm: str = DEFAULT_ALGORITHM) -> tuple[Digest, int]:
    """Digest and size of a file, read once in 1 MiB chunks."""
    h = new_hasher(algorithm)
    fd = os.open(path, os.O_RDONLY | CLOEXEC)
    try:
        size = _hash_fd(fd, h)
    finally:
        os.close(fd)
    return Digest(algorithm, h.hexdigest()), size


def _hash_fd(fd: int, h: Hasher, end: int | None = None, start: int = 0,
             buf: memoryview | None = None) -> int:
    """Feed ``h`` the file's bytes from ``start`` to ``end`` (default: its end), read
    through ``buf`` (default: a fresh 1 MiB); return the offset it stopped at (short of
    ``end`` at the end of the file)."""
    view = memoryview(bytearray(CHUNK)) if buf is None else buf
    pos = start
    while end is None or pos < end:
        n = os.preadv(fd, [view if end is None else view[:min(len(view), end - pos)]], pos)
        if not n:
            break
        h.update(view[:n])
        pos += n
    return pos


def _subtract(ranges: list[tuple[int, int]],
              holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ``ranges`` minus sorted, disjoint ``holes``."""
    out: list[tuple[int, int]] = []
    k = 0
    for s, e in ranges:
        pos = s
        while k < len(holes) and holes[k][1] <= pos:
            k += 1
        j = k
        while j < len(holes) and holes[j][0] < e:
            hs, he = holes[j]
            if hs > pos:
                out.append((pos, hs))
            pos = max(pos, he)
            j += 1
        if pos < e:
            out.append((pos, e))
    return out


def _upload_key() -> str:
    """A fresh key for a folder whose digest is not known up front (``up-`` + hex)."""
    return PRIVATE_PREFIX + secrets.token_hex(_TOKEN_BYTES)


# ---------------------------------------------------------------------------- heartbeat
# No thread of its own (a library that starts threads stops its caller's GC from forking,
# blobstore/_forked.py): an open writer beats from its lease's heartbeat thread, which
# lives exactly while the lease is held, and from its own writes.
def _register(ing: Ingest) -> None:
    if ing.lease is not None:
        ing.lease.on_beat(ing.heartbeat)


def _unregister(ing: Ingest) -> None:
    if ing.lease is not None:
        ing.lease.on_beat(ing.heartbeat, remove=True)


def _closed_upload(layout: Layout, key: str) -> IngestState | None:
    """The last checkpoint of the ``up-`` folder ``key`` (read only), or None if ``key``
    is not an upload key (checked before any lookup) or holds no append checkpoint."""
    if not is_upload_key(key):
        return None
    state = read_state(layout.blob_ingest / key)
    return state if state is not None and state.kind == "append" else None


def _new_owner_file(path: Path) -> tuple[bytes, int]:
    """Create an owner file naming this process (it must not exist); return its record
    and inode. Its mtime, the first heartbeat, is set by our clock (spec: "Ingest")."""
    now = time.time()
    me = owner_record(now)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | CLOEXEC, CREATE_MODE)
    try:
        hand_over(path, fd)
        os.write(fd, me)
        os.utime(fd, (now, now))
        return me, os.fstat(fd).st_ino
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)  # no half-made owner file left behind
        raise
    finally:
        os.close(fd)


# what link(2) answers where the file system has no hard links (vfat, exFAT: EPERM; some
# FUSE and network file systems: EOPNOTSUPP/ENOTSUP/ENOSYS) or no more of them (EMLINK)
_NO_LINK = frozenset({errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP,
                      errno.ENOSYS})


def _put_back(away: Path, path: Path) -> None:
    """Move ``away`` back to ``path`` unless something stands there now (best effort):
    with link(2), which never replaces; where the file system has no hard links, by a
    rename once ``path`` is seen free. ``away`` is gone afterwards (left only when
    ``path`` was taken meanwhile and the rename fails)."""
    try:
        os.link(away, path)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno in _NO_LINK and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.rename(away, path)
                return
    with contextlib.suppress(OSError):
        os.unlink(away)


def _owner_identity(path: Path) -> tuple[int, int, int, bytes]:
    """(device, inode, mtime in ns, bytes) of an owner file, read through one descriptor:
    what tells one owner file from another. Bytes alone do not: an owner file made with
    O_EXCL is empty for an instant, as is the one a crash at that instant left behind.
    Raises OSError (FileNotFoundError when it is gone)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | CLOEXEC)
    try:
        st = os.fstat(fd)
        parts = []
        while chunk := os.read(fd, 1 << 16):
            parts.append(chunk)
        return st.st_dev, st.st_ino, st.st_mtime_ns, b"".join(parts)
    finally:
        os.close(fd)


def _close_fds(fds: tuple[int, int]) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _space_error(exc: OSError, where: Path, needed: int) -> InsufficientSpace | StoreUnwritable:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = 0
        # how much more is known only where more was asked than is free; else (a write
        # that is not the whole file, file system overhead) the disk filled up while
        # writing (found from outside: "need 1 more bytes, 8392704 bytes available")
        short = needed - free
        return InsufficientSpace(str(where), short if short > 0 else None, free)
    return StoreUnwritable(refused_path(exc, str(where)), exc.strerror or str(exc))


# ---------------------------------------------------------------------------- the writer
class Ingest:
    """A blob being written into its own ingest folder; the one writer of the store.

    Open it with :meth:`for_digest` (known digest and size: offset writes, adoptable
    after a crash), :meth:`new` (appends, digest known or not) or :meth:`reopen` (an
    ``up-`` folder by its key, after a restart). One owner per folder, whether or not
    file locks work: ``owner`` is created with ``link``/``O_EXCL`` (atomic, also over
    NFS); a dead owner's file is renamed away by one taker only.

    Thread-safe for concurrent :meth:`write_at` / :meth:`note_written` / :meth:`mark_done`
    at disjoint offsets,
    :meth:`hash_range` / :meth:`prefetch` of finished bytes and :meth:`checkpoint` from
    other threads; :meth:`append` is for one thread.
    """

    dir: Path
    fd: int

    def __init__(self, layout: Layout, key: str, *, kind: str, digest: Digest | None,
                 size: int | None, algorithm: str, chunk_size: int = 0,
                 lease: Lease | None = None, source: str | None = None,
                 meta: dict[str, str] | None = None) -> None:
        self.layout = layout
        self.key = key
        self.meta = dict(meta or {})     # kept in state.json, given back by reopen()
        self.kind = kind
        self.digest = digest
        self.expected_size = size
        self.algorithm = algorithm
        self.chunk_size = chunk_size
        self.lease = lease
        self.source = source
        self.dir = layout.blob_ingest / key
        self.fd = -1
        self.written = 0                 # appends: bytes so far (the next offset)
        self._flushed = 0                # appends: writeback started below this offset
        self.adopted: set[tuple[int, int]] = set()
        # bytes an earlier run wrote in chunks it did not finish (sorted, disjoint)
        self.adopted_parts: list[tuple[int, int]] = []
        self._hasher: Hasher | None = new_hasher(algorithm) if kind == "append" else None
        self._journal = -1
        self._owner: bytes | None = None
        self._owner_ino = -1               # the inode of our owner file
        self._lost = False                 # another writer took the folder over
        self._lock = threading.Lock()      # the done list, the journal fd, the owner
        self._fd_lock = threading.Lock()   # the data fd's lifetime vs. checkpoint()
        self._done: list[tuple[int, int]] = []
        # what the last durable checkpoint recorded (None: not known to be on disk)
        self._durable_done: list[tuple[int, int]] | None = None
        # ranges: keep a journal and state (False: a small blob opened without them, and
        # never resumed; ResumableIngest)
        self._journaled = True
        self._coalesce_at = _DONE_COALESCE  # merge _done when it grows to this
        self._beat_at = time.monotonic()   # of the last heartbeat written
        self._writing = 0                  # writes (and reads) in progress on the data fd
        self._idle = threading.Condition(self._lock)  # notified when _writing drops to 0

    @property
    def data_path(self) -> Path:
        """The file the bytes are written to until the commit renames it."""
        return self.dir / "data"

    # -- opening
    @classmethod
    def for_digest(cls, layout: Layout, digest: Digest, size: int, chunk_size: int,
                   lease: Lease | None = None) -> Ingest:
        """The folder of ``digest`` (``size`` bytes), adopting what an earlier run left
        (:attr:`adopted`: the finished chunks), or a private folder if a live writer owns
        it. Raises InsufficientSpace (nothing left behind) or StoreUnwritable."""
        return ResumableIngest(layout, digest, size, chunk_size, lease)

    @classmethod
    def new(cls, layout: Layout, *, expected: Digest | None = None,
            expected_size: int | None = None, algorithm: str | None = None,
            lease: Lease | None = None, source: str | None = None,
            meta: dict[str, str] | None = None) -> Ingest:
        """A fresh ``up-<token>`` folder for :meth:`append`. The free space for
        ``expected_size`` is checked before anything is created (InsufficientSpace).
        ``meta`` is kept with each checkpoint and given back by :meth:`reopen`."""
        ing = cls(layout, _upload_key(), kind="append",
                  digest=expected, size=expected_size,
                  algorithm=expected.algorithm if expected else (algorithm or DEFAULT_ALGORITHM),
                  lease=lease, source=source, meta=meta)
        ing._open_private(check_space=True)
        try:
            ing.fd = os.open(ing.data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | CLOEXEC,
                             CREATE_MODE)
            hand_over(ing.data_path, ing.fd)
        except OSError as exc:
            ing.drop()
            raise _space_error(exc, layout.blob_ingest, expected_size or 0) from exc
        return ing

    @staticmethod
    def peek_meta(layout: Layout, key: str) -> dict[str, str] | None:
        """The ``meta`` of the closed ``up-`` folder ``key`` (read only: nothing is
        claimed or changed), or None if ``key`` is not an upload key or has no checkpoint."""
        state = _closed_upload(layout, key)
        return None if state is None else state.meta

    @classmethod
    def reopen(cls, layout: Layout, key: str, lease: Lease | None = None, *,
               expect_meta: dict[str, str] | None = None) -> Ingest | None:
        """Re-open the ``up-`` folder ``key`` that a writer closed (or that a killed
        process left): its bytes up to the last :meth:`checkpoint` are kept and hashed
        again, the rest dropped. None if ``key`` is not an upload key, there is no such
        folder, it holds no checkpoint, its ``meta`` is not ``expect_meta`` (when given:
        checked before anything is claimed or changed), or a live writer owns it."""
        state = _closed_upload(layout, key)
        if state is None:
            return None
        folder = layout.blob_ingest / key
        if expect_meta is not None and state.meta != expect_meta:
            return None  # another caller's: the folder is left exactly as it is
        try:
            digest = Digest.parse(state.digest) if state.digest else None
        except InvalidDigest:
            return None
        ing = cls(layout, key, kind="append", digest=digest,
                  size=state.size if state.size >= 0 else None,
                  algorithm=state.algorithm or DEFAULT_ALGORITHM, lease=lease,
                  meta=state.meta)
        if lease is not None:
            lease.add(ingests={key})
        try:
            if not ing._claim():
                return None
        except FileNotFoundError:  # removed meanwhile (GC, or the writer's own commit)
            return None
        except OSError as exc:
            raise _space_error(exc, folder, 0) from exc
        try:
            _register(ing)
            end = state.done[0][1] if state.done and state.done[0][0] == 0 else 0
            ing.fd = os.open(ing.data_path, os.O_RDWR | CLOEXEC)
            if os.fstat(ing.fd).st_size < end:
                end = 0
            os.ftruncate(ing.fd, end)
            assert ing._hasher is not None
            ing.written = ing._flushed = _hash_fd(ing.fd, ing._hasher, end)
        except OSError as exc:
            ing.close()
            raise _space_error(exc, folder, 0) from exc
        return ing

    def _open_private(self, *, check_space: bool) -> None:
        try:
            if not self.layout.blob_ingest.is_dir():  # one stat when it exists (put_bytes)
                make_dirs(self.layout.blob_ingest)
        except OSError as exc:
            raise _space_error(exc, self.layout.root, 0) from exc
        if check_space and self.expected_size:  # before the folder: a refusal leaves nothing
            check_free_space(self.layout.blob_ingest, self.expected_size)
        # The key is in the lease before the folder exists: GC never takes it for stale.
        if self.lease is not None:
            self.lease.add(ingests={self.key})
        # Made under a staging name with its owner inside, then renamed into place: the
        # folder never exists without its owner (GC sees a live writer from the start).
        staging = self.layout.blob_ingest / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
        try:
            # (parents: an older Ollama's prune removes an empty blobs/.blobctl-ingest)
            make_dirs(staging)
            me, self._owner_ino = _new_owner_file(staging / "owner")
            os.rename(staging, self.dir)  # a fresh random key: nothing stands there
            self._owner = me
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise _space_error(exc, self.layout.blob_ingest, 0) from exc
        _register(self)

    # -- ownership: one writer per folder, whether or not file locks work
    def _claim(self) -> bool:
        """Become the folder's only writer. False if a live writer owns it.

        ``owner`` is created with ``link`` (atomic create-if-absent, also over NFS), or
        where the file system has no hard links (vfat, exFAT) with ``O_EXCL`` in place.
        A dead owner's file is renamed away (only one taker can) and the claim tried
        again.
        """
        tmp = self.dir / f"owner.{os.getpid()}.{secrets.token_hex(4)}"
        me, ino = _new_owner_file(tmp)
        owner = self.dir / "owner"
        try:
            for _ in range(3):
                try:
                    try:
                        os.link(tmp, owner)
                    except OSError as exc:
                        if exc.errno not in _NO_LINK:
                            raise
                        # no hard links here (vfat, exFAT): the owner file is created
                        # in place with O_EXCL, as atomic a create-if-absent; a claimer
                        # that finds it still empty takes it for alive (owner_status)
                        me, ino = _new_owner_file(owner)
                    self._owner, self._owner_ino = me, ino
                    return True
                except FileExistsError:
                    pass
                try:
                    seen = _owner_identity(owner)
                except FileNotFoundError:
                    continue
                status = owner_status(self.dir, time.time())
                if status is not None and status[0]:
                    return False
                away = self.dir / f"owner.stale.{secrets.token_hex(4)}"
                try:
                    os.rename(owner, away)
                except FileNotFoundError:
                    continue  # another taker moved it first
                # another owner file came meanwhile (linked in, or made with O_EXCL and
                # still as empty as the dead one was): the same file or not, by identity
                if _owner_identity(away) != seen:  # not the one judged dead: undo
                    _put_back(away, owner)
                    return False
                away.unlink(missing_ok=True)
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def heartbeat(self, *, due_only: bool = False) -> None:
        """Refresh the owner's heartbeat (the open-writer thread calls it; best effort):
        the mtime of our own owner file, set through a descriptor of that very inode, so
        a beat never touches another owner's file. Seeing the folder taken over (we were
        judged dead) marks this writer lost: its writes and commit then fail.
        ``due_only``: only if the last beat is older than ``HEARTBEAT_SECONDS``
        (re-checked under the lock: concurrent writers beat once)."""
        with self._lock:
            if self._owner is None or self._lost:
                return
            if due_only and time.monotonic() - self._beat_at <= HEARTBEAT_SECONDS:
                return
            self._beat_at = time.monotonic()  # also when it fails: no retry per write
            if not self._owns_locked(beat=True):
                self._lost = True
                log.warning("ingest %s was taken over by another writer", self.dir)

    def _owns_locked(self, *, beat: bool = False) -> bool:
        """Whether the owner file is still ours (same inode and record); under _lock.
        True when it cannot be read for another reason than its absence (best effort).
        ``beat``: if ours, set its mtime to now through the same descriptor."""
        if self._owner is None or self._lost:
            return False
        try:
            fd = os.open(self.dir / "owner", os.O_RDONLY | CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError:
            return True
        try:
            ours = (os.fstat(fd).st_ino == self._owner_ino
                    and os.pread(fd, len(self._owner) + 1, 0) == self._owner)
            if ours and beat:
                now = time.time()
                os.utime(fd, (now, now))
            return ours
        except OSError:
            return True
        finally:
            os.close(fd)

    def _release_owner(self) -> None:
        _unregister(self)
        with self._lock:
            mine, self._owner = self._owner, None
        if mine is None:
            return
        if self._lost:
            return  # the owner file is another writer's now
        # Not by its path after a look (a taker may replace it in between): moved aside
        # first, then deleted if it is ours, else put back.
        owner = self.dir / "owner"
        away = self.dir / f"owner.release.{secrets.token_hex(4)}"
        try:
            os.rename(owner, away)
        except OSError:
            return
        with contextlib.suppress(OSError):
            if not (os.stat(away).st_ino == self._owner_ino and away.read_bytes() == mine):
                _put_back(away, owner)
        with contextlib.suppress(OSError):
            away.unlink()

    # -- ranges: adopt or start
    def _read_adoptable(self) -> tuple[int, set[tuple[int, int]], list[tuple[int, int]]] | None:
        """(chunk size, the chunks an earlier run finished, the ranges it wrote in the
        others) or None."""
        assert self.digest is not None and self.expected_size is not None
        size = self.expected_size
        state = read_state(self.dir)
        try:
            if (state is None or state.kind != "ranges" or state.digest != str(self.digest)
                    or state.size != size or self.data_path.stat().st_size != size):
                return None
        except OSError:
            return None
        done = {(s, e) for s, e in state.done if 0 <= s < e <= size}
        try:
            raw = (self.dir / "journal").read_bytes()
        except OSError:
            raw = b""
        head, sep, body = raw.partition(b"\n")
        parts = head.split(b" ")
        boot = boot_id()
        if (sep and len(parts) == 4 and parts[0] == JOURNAL_MAGIC and boot
                and parts[1].decode("ascii", "replace") == boot
                and parts[2].decode("ascii", "replace") == str(self.digest)
                and parts[3] == str(state.chunk_size).encode()):
            usable = len(body) - len(body) % RECORD.size  # a torn tail record is dropped
            for i in range(0, usable, RECORD.size):
                s, e = RECORD.unpack_from(body, i)
                if 0 <= s < e <= size:
                    done.add((s, e))
        whole = covered_chunks(done, size, state.chunk_size)
        return state.chunk_size, whole, _subtract(coalesce(list(done)), sorted(whole))

    def _open_ranges(self) -> None:
        assert self.digest is not None and self.expected_size is not None
        if self.lease is not None:
            self.lease.add(ingests={self.key}, digests={self.digest})
        journaled, chunk_size = self._journaled, self.chunk_size
        try:
            make_dirs(self.dir)
            try:
                mine = self._claim()
            except OSError as exc:
                if not (isinstance(exc, PermissionError) or exc.errno == errno.ELOOP):
                    raise
                # another user's folder, which we may not write in; or one whose owner
                # file is a symlink (never followed: found by review)
                mine = False
                log.warning("%s was left by another user and cannot be written here "
                            "(%s); downloading it separately", self.dir,
                            exc.strerror or exc)
            else:
                if not mine:
                    # Another live writer has this blob (its lock did not keep us out,
                    # e.g. on NFS): write a private folder of our own instead; never
                    # share the file.
                    log.warning("another process is writing %s; downloading it "
                                "separately", self.digest.short)
            if not mine:
                self._go_private()
            _register(self)
            try:
                self._open_files()
            except OSError as exc:
                if self.key != self.digest.filename or not (
                        isinstance(exc, PermissionError) or exc.errno == errno.ELOOP):
                    raise
                # owned, but its files are another user's (an interrupted download of
                # theirs in a group-shared store, made before files followed the umask),
                # or a symlink (ELOOP: never followed): not ours to resume; a private
                # folder instead (GC collects that one)
                log.warning("%s holds files that cannot be written here (%s); "
                            "downloading it separately", self.dir,
                            exc.strerror or exc)
                with self._fd_lock, self._lock:
                    fds = self._take_fds_locked()
                _close_fds(fds)
                self._release_owner()
                self._journaled, self.chunk_size = journaled, chunk_size
                self.adopted, self.adopted_parts, self._done = set(), [], []
                self._go_private()
                _register(self)
                self._open_files()
        except OSError as exc:
            self.close()
            raise _space_error(exc, self.layout.blob_ingest, self.expected_size) from exc

    def _go_private(self) -> None:
        """Switch to a fresh folder of this writer's own (``<digest>.<pid>-<token>``),
        named in the lease first, and own it."""
        assert self.digest is not None
        self.key = f"{self.digest.filename}.{os.getpid()}-{secrets.token_hex(4)}"
        self.dir = self.layout.blob_ingest / self.key
        if self.lease is not None:
            self.lease.add(ingests={self.key})
        make_dirs(self.dir)
        if not self._claim():  # pragma: no cover - a fresh folder has no owner
            raise StoreUnwritable(str(self.dir), "cannot own a fresh ingest folder")

    def _open_files(self) -> None:
        """Adopt what an earlier run left in the owned folder, or start it: the data
        file, the journal, the first checkpoint. Raises OSError."""
        assert self.digest is not None and self.expected_size is not None
        self._recover_commit()
        adopt = self._read_adoptable()
        if adopt is not None:
            self.chunk_size, self.adopted, self.adopted_parts = adopt
            self._journaled = True  # an earlier run's folder goes on as it was kept
        # (never through a symlink: the folder may be another user's, who could point
        # ``data`` at any file, to be truncated, written and handed over by root)
        self.fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | CLOEXEC | os.O_NOFOLLOW,
                          CREATE_MODE)
        hand_over(self.data_path, self.fd)
        if hasattr(os, "posix_fadvise"):  # read back just after written: no readahead
            with contextlib.suppress(OSError):  # advice only
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        if adopt is None:
            os.ftruncate(self.fd, 0)
            if self.expected_size:
                try:
                    os.posix_fallocate(self.fd, 0, self.expected_size)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        # what it did allocate goes back (ext4 keeps it): a size
                        # that does not fit must not leave the disk full
                        with contextlib.suppress(OSError):
                            os.ftruncate(self.fd, 0)
                        raise
                    os.ftruncate(self.fd, self.expected_size)  # sparse where unsupported
        self._done = coalesce([*self.adopted, *self.adopted_parts])
        if not self._journaled:
            # No journal and no state (two files less to create: a model of 300 small
            # layers spent most of its time creating files); its checkpoints record
            # nothing. Those of an earlier run that could not be adopted go: a later
            # run must not take their record for this file's.
            for name in ("state.json", "journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / name)
            return
        # A fresh journal holding what is adopted, in this boot; then the durable state.
        tmp = self.dir / "journal.tmp"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | CLOEXEC
                               | os.O_NOFOLLOW, CREATE_MODE), "wb") as f:
            hand_over(tmp, f.fileno())
            f.write(b" ".join((JOURNAL_MAGIC, boot_id().encode() or b"-",
                               str(self.digest).encode(), str(self.chunk_size).encode()))
                    + b"\n" + b"".join(RECORD.pack(s, e) for s, e in self._done))
        os.replace(tmp, self.dir / "journal")
        self._journal = os.open(self.dir / "journal", os.O_WRONLY | os.O_APPEND | CLOEXEC)
        if adopt is None:
            # Nothing written yet: a durable record of nothing is worth as much as none
            # after a power loss, so this one needs no fsync (a 300-layer pull spent 3
            # of its 12 fsyncs a blob here); the journal needs it within this boot.
            self._durable_done = []
            self.checkpoint(durable=False)

    def _recover_commit(self) -> None:
        """A commit killed between its two renames (``data`` out of reach as
        ``data.commit-*``, then into ``blobs/``) left the verified bytes under that
        private name: put them back as ``data`` (writable again), so the journal's records
        describe them and this run resumes them, rehashing from disk instead of fetching
        everything again (found by the kill search: a kill right after the last byte).
        Call once this run owns the folder."""
        data = self.data_path
        if data.exists():
            return
        try:
            left = sorted(self.dir.glob("data.commit-*"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return
        for i, p in enumerate(reversed(left)):
            with contextlib.suppress(OSError):
                if i == 0:
                    os.chmod(p, file_mode())  # as a new file of ours would be
                    os.rename(p, data)
                    log.info("%s: resuming the bytes of an interrupted commit",
                             self.digest.short if self.digest else self.key)
                else:
                    os.unlink(p)  # (an older one: the newest is what the journal names)

    # -- writing
    @contextlib.contextmanager
    def _writing_fd(self) -> Iterator[int]:
        """The data fd, kept open (and this file's) until the block ends: closing waits
        for writes and reads in progress (:meth:`_take_fds`). StoreUnwritable once
        closed."""
        with self._lock:
            fd = self.fd
            if fd < 0 or self._lost:
                if self._lost:
                    raise self._lost_error()
                raise StoreUnwritable(str(self.dir), "the ingest was closed meanwhile")
            self._writing += 1
        try:
            yield fd
        finally:
            with self._lock:
                self._writing -= 1
                if not self._writing:
                    self._idle.notify_all()

    def _wait_idle_locked(self) -> None:
        """Under _lock: wait until no write uses the data fd."""
        while self._writing:
            self._idle.wait()

    def _take_fds_locked(self) -> tuple[int, int]:
        """Take the data and journal fds away (under _lock) once no write uses them."""
        self._wait_idle_locked()
        fds, self.fd, self._journal = (self.fd, self._journal), -1, -1
        return fds

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` after what is written and hash it (in order). More bytes than
        the expected size: the folder is dropped, SizeMismatch. Raises OSError as met
        (ENOSPC included; the caller maps it)."""
        assert self._hasher is not None, "not an append ingest"
        view = memoryview(data)
        off = self.written
        with self._writing_fd() as fd:
            while view:
                n = os.pwrite(fd, view, off)
                self._hasher.update(view[:n])
                view, off = view[n:], off + n
            if off - self._flushed >= WRITEBACK_BYTES:
                start_writeback(fd, self._flushed, off - self._flushed)
                self._flushed = off
        self.written = off
        if time.monotonic() - self._beat_at > HEARTBEAT_SECONDS:
            self.heartbeat(due_only=True)
        if self.expected_size is not None and self.written > self.expected_size:
            self.drop()
            raise SizeMismatch(str(self.digest) if self.digest else "blob",
                               self.expected_size, self.written, source=self.source)

    def write_at(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (raises InsufficientSpace/StoreUnwritable,
        the latter also once another writer took the folder over)."""
        try:
            with self._writing_fd() as fd:
                while data:
                    n = os.pwrite(fd, data, offset)
                    data, offset = data[n:], offset + n
        except OSError as exc:
            raise _space_error(exc, self.layout.blob_ingest, len(data)) from exc
        if time.monotonic() - self._beat_at > HEARTBEAT_SECONDS:
            self.heartbeat(due_only=True)

    def read_at(self, size: int, offset: int) -> bytes:
        try:
            data = os.pread(self.fd, size, offset)
        except OSError as exc:
            raise StoreUnwritable(str(self.dir), exc.strerror or str(exc)) from exc
        if len(data) != size:
            raise StoreUnwritable(str(self.dir), "ingest file shorter than recorded")
        return data

    def hash_range(self, h: Hasher, start: int, end: int, buf: memoryview) -> None:
        """Feed ``h`` bytes [start, end) of the data file, read through ``buf``. Bytes
        written in this run come from the page cache (unless memory pressure evicted
        them). Raises StoreUnwritable (a read error, a file shorter than recorded, or the
        ingest closed meanwhile)."""
        try:
            with self._writing_fd() as fd:
                stopped = _hash_fd(fd, h, end, start, buf)
        except OSError as exc:
            raise StoreUnwritable(str(self.dir), exc.strerror or str(exc)) from exc
        if stopped < end:
            raise StoreUnwritable(str(self.dir), "ingest file shorter than recorded")

    def prefetch(self, start: int, end: int) -> None:
        """Start reading bytes [start, end) from disk into the page cache without waiting
        (``POSIX_FADV_WILLNEED``): :meth:`hash_range` of bytes an earlier run wrote then
        overlaps its reads with hashing. Advice only: a no-op where unsupported or once
        closed."""
        if not hasattr(os, "posix_fadvise") or end <= start:
            return
        with (contextlib.suppress(OSError, StoreUnwritable), self._writing_fd() as fd):
            # in slices: the kernel reads at most max(read_ahead_kb, max_sectors_kb) per
            # call (128 KiB at the least by default)
            for off in range(start, end, PREFETCH_SLICE):
                os.posix_fadvise(fd, off, min(PREFETCH_SLICE, end - off),
                                 os.POSIX_FADV_WILLNEED)

    def note_written(self, start: int, end: int) -> None:
        """Record that bytes [start, end) are written (a light checkpoint: one append; no
        writeback). Any range: a run after a crash in this boot resumes from it, also
        inside a chunk it did not finish."""
        with self._lock:  # held across the write: close() never races it (fd reuse)
            self._done.append((start, end))
            if len(self._done) >= self._coalesce_at:  # (amortised: many gaps stay apart)
                self._done = coalesce(self._done)
                self._coalesce_at = max(_DONE_COALESCE, 2 * len(self._done))
            if self._journal >= 0:
                with contextlib.suppress(OSError):  # the durable checkpoint still covers it
                    os.write(self._journal, RECORD.pack(start, end))

    def mark_done(self, start: int, end: int) -> None:
        """Record that bytes [start, end) are written (:meth:`note_written`), and start
        writing them to disk (the commit's fsync then waits for little)."""
        self.note_written(start, end)
        self.start_writeback(start, end)

    def start_writeback(self, start: int, end: int) -> None:
        """Start writing bytes [start, end) to disk without waiting (the commit's fsync
        then finds little left); a no-op once closed or taken over."""
        with contextlib.suppress(StoreUnwritable), self._writing_fd() as fd:
            start_writeback(fd, start, end - start)

    def checkpoint(self, *, durable: bool = True) -> None:
        """Durable checkpoint: fdatasync the data, then record what it covers (and the
        time: a heartbeat that outlives the owner file). Safe from another thread than
        the writers; a no-op once closed, and when it would record what the last durable
        one did (the owner file's beat is the heartbeat then). ``durable=False`` writes
        the record without any fsync: it serves a resume within this boot (the journal
        needs it), and a power loss loses nothing but the work it describes."""
        with self._fd_lock:  # close() waits for us: the fd stays this file's
            with self._lock:
                done = [(0, self.written)] if self.kind == "append" else list(self._done)
                fd = self.fd
                lost = self._lost
            if fd < 0 or lost:  # a folder taken over is not ours to write in
                return
            done = coalesce(done)
            if not self._journaled or (durable and done == self._durable_done):
                # Nothing to record; the data file's mtime still moves, as a rewrite of
                # the state did: another process waiting for this blob (its download
                # lock) takes an ingest whose files never change for a stuck one.
                with contextlib.suppress(OSError):
                    os.utime(fd)
                return
            state = IngestState(str(self.digest) if self.digest else "",
                                 -1 if self.expected_size is None else self.expected_size,
                                 self.chunk_size, done, self.kind, self.algorithm,
                                 time.time(), self.meta)
            with contextlib.suppress(OSError):
                if durable:
                    os.fdatasync(fd)
                # the temp file in the folder itself: GC sees it with the folder
                write_atomic(self.dir / "state.json", msgspec.json.encode(state), self.dir,
                             durable=durable)
                if durable:
                    self._durable_done = done

    # -- ending
    def commit(self, actual: Digest | None = None, source: str | None = None) -> Digest:
        """Verify and give the bytes their blob name; return the digest.

        ``actual`` is the digest of what was written (the caller hashed it: offset
        writes, links); appends use their own hash. The size on disk must be the
        expected one and the digest the expected one, else the folder is dropped and
        SizeMismatch/DigestMismatch raised. Then: fsync, read-only (not a hardlinked
        file: its mode is its owner's), rename into ``blobs/``, fsync ``blobs/``, the
        folder removed. Idempotent per content: two writers of one blob both succeed.
        Raises InsufficientSpace/StoreUnwritable for failing I/O.
        """
        source = source or self.source
        if actual is None:
            assert self._hasher is not None, "offset writes: pass the digest"
            actual = Digest(self.algorithm, self._hasher.hexdigest())
        try:
            os.fsync(self.fd)
            on_disk = os.fstat(self.fd).st_size
        except OSError as exc:
            self._fail()
            raise _space_error(exc, self.layout.blob_ingest, 0) from exc
        expected = self.digest or actual
        if self.expected_size is not None and on_disk != self.expected_size:
            self.drop()
            raise SizeMismatch(str(expected), self.expected_size, on_disk, source=source)
        if actual != expected:
            self.drop()
            raise DigestMismatch(str(expected), str(actual), source=source)
        if self.lease is not None:
            self.lease.add(digests={actual})  # GC keeps it from before it has a name
        _unregister(self)
        data = self.data_path
        private = self.dir / f"data.commit-{secrets.token_hex(4)}"
        with self._fd_lock, self._lock:  # no checkpoint, journal or heartbeat after this
            self._wait_idle_locked()  # no write into data while it moves
            err = self._take_data(data, private)
            if err is None:
                fds = self._take_fds_locked()
                mine, self._owner = self._owner, None
        if err is not None:
            self._fail()
            raise err
        _close_fds(fds)  # fsynced above: a close error loses nothing
        try:
            if self.kind != "link":
                # another user's file (a download of theirs this run resumed, in a
                # group-shared store): only its owner may change its mode, so it keeps
                # theirs, as a hardlinked file does
                with contextlib.suppress(PermissionError):
                    os.chmod(private, 0o444)
            if not self.layout.blobs.is_dir():
                make_dirs(self.layout.blobs)
            os.replace(private, self.layout.blob(actual))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.rename(private, data)
            self._owner = mine  # ours to release (close) or delete (drop)
            self._fail()
            raise _space_error(exc, self.layout.blob_ingest, 0) from exc
        # the folder goes first: its removal rides on the same journal commit as the
        # fsync of blobs/ (measured: a separate rmdir after that fsync costs ~0.7 ms)
        try:  # the usual folder holds only its owner now: no tree walk
            os.unlink(self.dir / "owner")
            os.rmdir(self.dir)
        except OSError:
            shutil.rmtree(self.dir, ignore_errors=True)  # the owner file goes with it
        fsync_dir(self.layout.blobs)
        self._forget()
        return actual

    def _forget(self) -> None:
        """The folder is gone: its key leaves the lease (which stays small however many
        blobs one lease sees in)."""
        if self.lease is not None:
            # (a lease that names a folder no more costs nothing: a full disk here must
            # not fail what already succeeded)
            with contextlib.suppress(StoreError):
                self.lease.discard(ingests={self.key})

    def _take_data(self, data: Path, private: Path) -> StoreUnwritable | InsufficientSpace | None:
        """Rename ``data`` to ``private`` if it is still ours (under both locks): first
        out of reach (a writer claiming the folder from now on opens a new file), then
        checked: our owner file, our inode. A writer judged dead while paused never
        renames its taker's file. The error to raise, or None."""
        try:
            os.rename(data, private)
        except OSError as exc:
            if not self._owns_locked():
                self._lost = True
                return self._lost_error()
            return _space_error(exc, self.layout.blob_ingest, 0)
        try:
            owned = (self._owns_locked()
                     and os.stat(private).st_ino == os.fstat(self.fd).st_ino)
        except OSError:
            owned = False
        if owned:
            return None
        self._lost = True
        _put_back(private, data)  # back where its owner expects it
        return self._lost_error()

    def _lost_error(self) -> StoreUnwritable:
        return StoreUnwritable(str(self.dir), "another writer took this ingest over (this "
                               "one was judged dead); its blob is left to that writer")

    def _fail(self) -> None:
        """A commit failed on I/O: offset writes keep their folder (resumable), the rest
        drop theirs."""
        if self.kind == "ranges":
            self.close()
        else:
            self.drop()

    def close(self) -> None:
        """Close the files, keeping the folder for a later resume (idempotent). Appends
        are checkpointed first (:meth:`reopen`). The caller makes sure no thread still
        writes."""
        if self.kind == "append" and self.fd >= 0:
            self.checkpoint()
        with self._fd_lock, self._lock:
            fds = self._take_fds_locked()
        _close_fds(fds)
        self._release_owner()

    def drop(self) -> None:
        """Close and delete the ingest folder (idempotent)."""
        _unregister(self)
        with self._fd_lock, self._lock:
            fds = self._take_fds_locked()
            self._owner = None  # no heartbeat writes into the folder being removed
        _close_fds(fds)
        if not self._lost:  # a folder taken over is its new owner's
            shutil.rmtree(self.dir, ignore_errors=True)
        self._forget()


class ResumableIngest(Ingest):
    """A blob of known digest and size written at offsets, resumable after a crash
    (spec/pull.md, "Resume"): :meth:`Ingest.for_digest` under its historical name."""

    def __init__(self, layout: Layout, digest: Digest, size: int, chunk_size: int,
                 lease: Lease | None = None, *, journal: bool = True) -> None:
        """``journal=False``: a blob so small that resuming it is not worth the two files
        (journal, state) a resumable one creates: unless an earlier run left a resumable
        folder, nothing is recorded and a later run starts it over (the pull engine: a blob
        of one receive batch, what a kill loses in flight anyway)."""
        super().__init__(layout, self.key_of(digest), kind="ranges", digest=digest,
                         size=size, algorithm=digest.algorithm, chunk_size=chunk_size,
                         lease=lease)
        self._journaled = journal
        self._open_ranges()

    @staticmethod
    def key_of(digest: Digest) -> str:
        """The ingest entry (folder name, lease key) of ``digest``'s resumable download."""
        return digest.filename

    @property
    def size(self) -> int:
        assert self.expected_size is not None
        return self.expected_size


class BlobWriter:
    """A blob streamed in, hashed while written: an :class:`Ingest` of appends. Use as a
    context manager: an exception (or leaving without :meth:`commit`) drops it."""

    def __init__(
        self,
        layout: Layout,
        *,
        expected: Digest | None = None,
        expected_size: int | None = None,
        algorithm: str | None = None,
        source: str | None = None,
        lease: Lease | None = None,
        meta: dict[str, str] | None = None,
    ) -> None:
        self.ingest = Ingest.new(layout, expected=expected, expected_size=expected_size,
                                 algorithm=algorithm, lease=lease, source=source, meta=meta)

    @classmethod
    def reopen(cls, layout: Layout, key: str, lease: Lease | None = None, *,
               expect_meta: dict[str, str] | None = None) -> BlobWriter | None:
        """The writer ``key`` (:attr:`key`) that was closed or killed, from its last
        checkpoint (:meth:`Ingest.reopen`), or None."""
        ing = Ingest.reopen(layout, key, lease, expect_meta=expect_meta)
        if ing is None:
            return None
        w = cls.__new__(cls)
        w.ingest = ing
        return w

    @staticmethod
    def peek_meta(layout: Layout, key: str) -> dict[str, str] | None:
        """:meth:`Ingest.peek_meta`: a closed writer's ``meta``, read only."""
        return Ingest.peek_meta(layout, key)

    @property
    def meta(self) -> dict[str, str]:
        return self.ingest.meta

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self.ingest.written

    @property
    def expected(self) -> Digest | None:
        return self.ingest.digest

    @expected.setter
    def expected(self, digest: Digest | None) -> None:
        """Name the digest before :meth:`commit` (a push names it only at the end; one
        of another algorithm than the hash ran with makes the commit read the bytes
        back and hash them with it)."""
        self.ingest.digest = digest

    @property
    def key(self) -> str:
        return self.ingest.key

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.ingest.append(data)

    def copy_from(self, stream: BinaryIO,
                  progress: Callable[[int], None] | None = None) -> None:
        """Copy a whole stream in; ``progress(bytes_so_far)`` after each MiB."""
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := stream.readinto(buf):  # type: ignore[attr-defined]
            self.ingest.append(view[:n])
            if progress is not None:
                progress(self.ingest.written)

    def commit(self) -> Digest:
        """Verify and move into ``blobs/`` (:meth:`Ingest.commit`); return the digest.

        When :attr:`expected` is of another algorithm than the one hashed while writing
        (an upload session hashes sha256 from its first byte and learns the digest, say
        ``sha512:…``, only at the end), the bytes are read back once and hashed with the
        expected digest's algorithm: that digest is what is verified, and the blob's
        name."""
        ing = self.ingest
        want = ing.digest
        if want is not None and want.algorithm != ing.algorithm:
            h = new_hasher(want.algorithm)
            ing.hash_range(h, 0, ing.written, memoryview(bytearray(CHUNK)))
            return ing.commit(actual=Digest(want.algorithm, h.hexdigest()))
        return ing.commit()

    def checkpoint(self) -> None:
        self.ingest.checkpoint()

    def abort(self) -> None:
        """Drop the ingest folder (safe to call twice)."""
        self.ingest.drop()

    def close(self) -> None:
        """Keep the folder with a checkpoint for :meth:`reopen` (safe to call twice)."""
        self.ingest.close()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None or self.ingest.fd >= 0:
            self.abort()


def link_in(layout: Layout, path: Path, *, expected: Digest | None = None,
            expected_size: int | None = None, lease: Lease | None = None,
            source: str | None = None,
            check: Callable[[Path], None] | None = None) -> Digest | None:
    """Hardlink the file ``path`` into a fresh ingest folder, hash the store's own link
    (what gets the name, whatever the source does meanwhile) and commit it. None if it
    cannot be linked (another filesystem, no hard links there): the caller copies.
    A ``path`` that is a symlink (or a chain of them, relative or absolute) links the
    regular file it names: the blob is never a symlink.
    ``check(link)`` runs on the link after it is hashed and before the commit; what it
    raises drops the folder and propagates. Raises DigestMismatch/SizeMismatch against
    ``expected``/``expected_size`` (the folder is gone), InvalidInput (a symlink put in
    the file's place meanwhile), InsufficientSpace/StoreUnwritable."""
    ing = Ingest(layout, _upload_key(), kind="link",
                 digest=expected, size=expected_size,
                 algorithm=expected.algorithm if expected else DEFAULT_ALGORITHM,
                 lease=lease, source=source or str(path))
    ing._open_private(check_space=False)
    data = ing.data_path
    try:
        try:
            # the file a symlink (or a chain of them) names, never the symlink itself:
            # Linux's link(2) links a symlink as it is (a relative one then dangles in
            # blobs/), and CPython's os.link does not ask linkat for AT_SYMLINK_FOLLOW
            os.link(os.path.realpath(path), data)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP,
                             errno.EOPNOTSUPP):
                ing.drop()
                return None
            raise
        try:  # a symlink put in the file's place between realpath and link: not a blob
            ing.fd = os.open(data, os.O_RDONLY | CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise InvalidInput(f"{path} changed while it was being imported (a symlink "
                               "took its place); try again") from exc
        h = new_hasher(ing.algorithm)
        _hash_fd(ing.fd, h)  # the store's own link, through the fd the commit checks
        digest = Digest(ing.algorithm, h.hexdigest())
        if check is not None:
            check(data)
    except OSError as exc:
        ing.drop()
        raise _space_error(exc, layout.blob_ingest, 0) from exc
    except BaseException:
        ing.drop()
        raise
    return ing.commit(digest)
