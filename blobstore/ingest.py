"""Writing a blob: hash while writing, verify, then commit with one rename.

:class:`BlobWriter` streams bytes into a temp file in the store's ingest area and feeds
the same bytes to the hasher, so the digest is known when the last byte lands and a
commit never reads the data back. ``commit()``:

1. flushes and fsyncs the temp file;
2. checks size and digest against what was expected (if anything was), and on a
   mismatch deletes the temp file and raises: a wrong blob never gets a digest name;
3. makes the file read-only and ``os.replace``-s it to ``blobs/<alg>-<hex>``;
4. fsyncs ``blobs/``.

Temp names are unique per writer (pid + random), so two processes writing the same
blob never share a file; whichever renames last wins with identical bytes. This holds
even where file locks do not work.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import msgspec

from blobstore.digest import DEFAULT_ALGORITHM, Digest, Hasher, new_hasher
from blobstore.errors import DigestMismatch, InsufficientSpace, SizeMismatch, StoreUnwritable
from blobstore.layout import Layout, fsync_dir, write_atomic
from blobstore.lease import Lease

log = logging.getLogger("blobctl.ingest")

__all__ = ["CHUNK", "BlobWriter", "ResumableIngest", "boot_id", "check_free_space", "coalesce",
           "hash_file"]

CHUNK = 1 << 20


def check_free_space(path: Path, needed: int, *, reserve: int = 64 << 20) -> None:
    """Raise InsufficientSpace unless ``needed`` bytes (+ a small reserve) fit at ``path``."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return
    if needed + reserve > free:
        raise InsufficientSpace(str(path), needed + reserve - free, free)


def hash_file(path: Path, algorithm: str = DEFAULT_ALGORITHM) -> tuple[Digest, int]:
    """Digest and size of a file, read once in 1 MiB chunks."""
    h = new_hasher(algorithm)
    size = 0
    with open(path, "rb") as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return Digest(algorithm, h.hexdigest()), size


class BlobWriter:
    """A blob being written. Use as a context manager: an exception aborts it."""

    def __init__(
        self,
        layout: Layout,
        *,
        expected: Digest | None = None,
        expected_size: int | None = None,
        algorithm: str | None = None,
        source: str | None = None,
        lease: Lease | None = None,
    ) -> None:
        self.layout = layout
        self.lease = lease
        self.expected = expected
        self.expected_size = expected_size
        self.algorithm = expected.algorithm if expected else (algorithm or DEFAULT_ALGORITHM)
        self.source = source
        self._hasher: Hasher = new_hasher(self.algorithm)
        self.size = 0
        try:
            layout.ingest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnwritable(str(layout.root), exc.strerror or str(exc)) from exc
        if expected_size:  # before the temp file exists: a refusal leaves nothing behind
            check_free_space(layout.ingest, expected_size)
        # The temp name is in the lease before the file exists: GC never takes it for a
        # stale ingest, whatever its age.
        tmp = layout.ingest / f"put-{os.getpid()}-{secrets.token_hex(8)}.tmp"
        if lease is not None:
            lease.add(ingests={tmp.name})
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise StoreUnwritable(str(layout.root), exc.strerror or str(exc)) from exc
        self.tmp_path = tmp
        self._file: BinaryIO | None = os.fdopen(fd, "wb")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._file is not None, "writer is closed"
        self._file.write(data)
        self._hasher.update(data)
        self.size += len(data)
        if self.expected_size is not None and self.size > self.expected_size:
            digest = str(self.expected) if self.expected else "blob"
            self.abort()
            raise SizeMismatch(digest, self.expected_size, self.size, source=self.source)

    def copy_from(self, stream: BinaryIO,
                  progress: Callable[[int], None] | None = None) -> None:
        """Copy a whole stream in; ``progress(bytes_so_far)`` after each MiB."""
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := stream.readinto(buf):  # type: ignore[attr-defined]
            self.write(view[:n])
            if progress is not None:
                progress(self.size)

    def commit(self) -> Digest:
        """Verify and move into ``blobs/``; return the digest. Idempotent per content."""
        assert self._file is not None, "writer is closed"
        f, self._file = self._file, None
        try:
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        actual = Digest(self.algorithm, self._hasher.hexdigest())
        try:
            if self.expected_size is not None and self.size != self.expected_size:
                raise SizeMismatch(
                    str(self.expected or actual), self.expected_size, self.size,
                    source=self.source,
                )
            if self.expected is not None and actual != self.expected:
                raise DigestMismatch(str(self.expected), str(actual), source=self.source)
            if self.lease is not None:
                self.lease.add(digests={actual})  # GC keeps it from before it has a name
            os.chmod(self.tmp_path, 0o444)
            self.layout.blobs.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp_path, self.layout.blob(actual))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp_path)
            raise
        fsync_dir(self.layout.blobs)
        return actual

    def abort(self) -> None:
        """Drop the temp file (safe to call twice)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            os.unlink(self.tmp_path)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None or self._file is not None:
            self.abort()


# ---------------------------------------------------------------------------- resumable
def boot_id() -> str:
    """This boot's id (Linux), or "" where unknown: page-cache contents survive a killed
    process but not a reboot, so light checkpoints are trusted only within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


OWNER_TTL = 300.0  # seconds without a write after which another host's ingest is stale


class _Owner(msgspec.Struct):
    host: str
    boot: str
    pid: int
    start: float


def _start_time(pid: int) -> float:
    """Start time of ``pid`` (seconds since the epoch), or -1 if it does not run."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, ValueError):
        return -1.0


class _IngestState(msgspec.Struct):
    digest: str
    size: int
    chunk_size: int
    done: list[tuple[int, int]]


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged ``[start, end)`` ranges (state.json stays small whatever the chunk
    count; the delta planner merges its verified spans with it too)."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _covered_chunks(ranges: set[tuple[int, int]], size: int,
                    chunk: int) -> set[tuple[int, int]]:
    """The chunks of the grid ``chunk`` over ``size`` bytes that ``ranges`` cover whole."""
    out: set[tuple[int, int]] = set()
    if chunk <= 0:
        return out
    for s, e in coalesce(list(ranges)):
        first = -(-s // chunk) * chunk  # the first chunk starting inside [s, e)
        for cs in range(first, e, chunk):
            ce = min(size, cs + chunk)
            if ce <= e:
                out.add((cs, ce))
    return out


_JOURNAL_MAGIC = b"blobctl-journal-1"
_RECORD = struct.Struct("<QQ")


class ResumableIngest:
    """A blob being written at arbitrary offsets, resumable after a crash (spec/pull.md,
    "Resume").

    Folder ``.blobctl/ingest/<alg>-<hex>/`` holds ``data`` (preallocated to the blob's
    size), ``state.json`` (durable checkpoint: the finished ranges whose bytes were
    ``fdatasync``-ed before it was written) and ``journal`` (light checkpoint: one 16-byte
    record appended per finished range, no sync; its header names the boot it was
    written in, and it is trusted only in that same boot, because a killed process leaves
    its written pages in the page cache while a power loss does not).

    Only :meth:`commit` gives the bytes a blob name, after the caller's digest matched.
    Thread-safe for concurrent :meth:`write_at` / :meth:`mark_done` at disjoint offsets.
    """

    def __init__(self, layout: Layout, digest: Digest, size: int, chunk_size: int,
                 lease: Lease | None = None) -> None:
        self.layout = layout
        self.digest = digest
        self.size = size
        self.dir = layout.ingest / digest.filename
        self._lease = lease
        if lease is not None:
            lease.add(ingests={self.dir.name}, digests={digest})
        self.fd = -1
        self._journal = -1
        self._owner: bytes | None = None
        self._lock = threading.Lock()      # the done list and the journal fd
        self._fd_lock = threading.Lock()   # the data fd's lifetime vs. checkpoint()
        self._done: list[tuple[int, int]] = []
        self.chunk_size = chunk_size
        self.adopted: set[tuple[int, int]] = set()
        self._open()

    # -- setup
    def _read_adoptable(self) -> tuple[int, set[tuple[int, int]]] | None:
        """(chunk size, finished ranges) an earlier run left, or None."""
        data = self.dir / "data"
        try:
            state = msgspec.json.decode((self.dir / "state.json").read_bytes(),
                                        type=_IngestState)
            if (state.digest != str(self.digest) or state.size != self.size
                    or data.stat().st_size != self.size):
                return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None
        done = {(s, e) for s, e in state.done if 0 <= s < e <= self.size}
        try:
            raw = (self.dir / "journal").read_bytes()
        except OSError:
            raw = b""
        head, sep, body = raw.partition(b"\n")
        parts = head.split(b" ")
        boot = boot_id()
        if (sep and len(parts) == 4 and parts[0] == _JOURNAL_MAGIC and boot
                and parts[1].decode("ascii", "replace") == boot
                and parts[2].decode("ascii", "replace") == str(self.digest)
                and parts[3] == str(state.chunk_size).encode()):
            usable = len(body) - len(body) % _RECORD.size  # a torn tail record is dropped
            for i in range(0, usable, _RECORD.size):
                s, e = _RECORD.unpack_from(body, i)
                if 0 <= s < e <= self.size:
                    done.add((s, e))
        return state.chunk_size, _covered_chunks(done, self.size, state.chunk_size)

    # -- ownership: one writer per folder, whether or not file locks work
    def _claim(self) -> bool:
        """Become the folder's only writer. False if a live writer owns it.

        ``owner`` is created with ``link`` (atomic create-if-absent, also over NFS). An
        owner whose process is gone (same boot and host) or whose folder has had no write
        for ``OWNER_TTL`` seconds (another host or pid namespace) is stale: its file is
        renamed away (only one taker can) and the link tried again.
        """
        me = msgspec.json.encode(_Owner(socket.gethostname(), boot_id(), os.getpid(),
                                        _start_time(os.getpid())))
        tmp = self.dir / f"owner.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.write_bytes(me)
        owner = self.dir / "owner"
        try:
            for _ in range(3):
                try:
                    os.link(tmp, owner)
                    self._owner = me
                    return True
                except FileExistsError:
                    pass
                try:
                    seen = owner.read_bytes()
                except FileNotFoundError:
                    continue
                if self._owner_alive(seen):
                    return False
                away = self.dir / f"owner.stale.{secrets.token_hex(4)}"
                try:
                    os.rename(owner, away)
                except FileNotFoundError:
                    continue  # another taker moved it first
                if away.read_bytes() != seen:  # a new owner linked in meanwhile: undo
                    with contextlib.suppress(OSError):
                        os.link(away, owner)
                    away.unlink(missing_ok=True)
                    return False
                away.unlink(missing_ok=True)
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _owner_alive(self, raw: bytes) -> bool:
        try:
            o = msgspec.json.decode(raw, type=_Owner)
        except (msgspec.DecodeError, msgspec.ValidationError):
            o = None
        if o is not None and o.host == socket.gethostname() and o.boot == boot_id() \
                and o.boot:
            start = _start_time(o.pid)
            return start is not None and abs(start - o.start) < 1.0
        # another host or pid namespace (or unreadable): alive while it writes
        newest = 0.0
        for name in ("owner", "data", "journal", "state.json"):  # the writer's files only
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(self.dir / name).st_mtime)
        return time.time() - newest < OWNER_TTL

    def _release_owner(self) -> None:
        if self._owner is None:
            return
        owner = self.dir / "owner"
        with contextlib.suppress(OSError):
            if owner.read_bytes() == self._owner:
                owner.unlink()
        self._owner = None

    def _open(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not self._claim():
                # Another live writer has this blob (its lock did not keep us out, e.g. on
                # NFS): write a private folder of our own instead; never share the file.
                log.warning("another process is writing %s; downloading it separately",
                            self.digest.short)
                self.dir = self.layout.ingest / (
                    f"{self.digest.filename}.{os.getpid()}-{secrets.token_hex(4)}")
                if self._lease is not None:
                    self._lease.add(ingests={self.dir.name})
                self.dir.mkdir(parents=True)
                if not self._claim():  # pragma: no cover - a fresh folder has no owner
                    raise StoreUnwritable(str(self.dir), "cannot own a fresh ingest folder")
            adopt = self._read_adoptable()
            if adopt is not None:
                self.chunk_size, self.adopted = adopt
            data = self.dir / "data"
            self.fd = os.open(data, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            if adopt is None:
                os.ftruncate(self.fd, 0)
                if self.size:
                    try:
                        os.posix_fallocate(self.fd, 0, self.size)
                    except OSError as exc:
                        if exc.errno == errno.ENOSPC:
                            raise
                        os.ftruncate(self.fd, self.size)  # no fallocate here: sparse file
            self._done = sorted(self.adopted)
            # A fresh journal holding what is adopted, in this boot; then the durable state.
            tmp = self.dir / "journal.tmp"
            with open(tmp, "wb") as f:
                f.write(b" ".join((_JOURNAL_MAGIC, boot_id().encode() or b"-",
                                   str(self.digest).encode(), str(self.chunk_size).encode()))
                        + b"\n" + b"".join(_RECORD.pack(s, e) for s, e in self._done))
            os.replace(tmp, self.dir / "journal")
            self._journal = os.open(self.dir / "journal",
                                    os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
            if adopt is None:
                self.checkpoint()
        except OSError as exc:
            self.close()
            if exc.errno == errno.ENOSPC:
                free = shutil.disk_usage(self.layout.ingest).free
                raise InsufficientSpace(str(self.dir), max(1, self.size - free), free) from exc
            raise StoreUnwritable(str(self.dir), exc.strerror or str(exc)) from exc

    # -- writing
    def write_at(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (raises InsufficientSpace/StoreUnwritable)."""
        try:
            while data:
                n = os.pwrite(self.fd, data, offset)
                data, offset = data[n:], offset + n
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                free = shutil.disk_usage(self.layout.ingest).free
                raise InsufficientSpace(str(self.layout.ingest), max(1, len(data)),
                                        free) from exc
            raise StoreUnwritable(str(self.dir), exc.strerror or str(exc)) from exc

    def read_at(self, size: int, offset: int) -> bytes:
        try:
            data = os.pread(self.fd, size, offset)
        except OSError as exc:
            raise StoreUnwritable(str(self.dir), exc.strerror or str(exc)) from exc
        if len(data) != size:
            raise StoreUnwritable(str(self.dir), "ingest file shorter than recorded")
        return data

    def mark_done(self, start: int, end: int) -> None:
        """Record that bytes [start, end) are written (a light checkpoint: one append)."""
        with self._lock:  # held across the write: close() never races it (fd reuse)
            self._done.append((start, end))
            if self._journal >= 0:
                with contextlib.suppress(OSError):  # the durable checkpoint still covers it
                    os.write(self._journal, _RECORD.pack(start, end))

    def checkpoint(self) -> None:
        """Durable checkpoint: fdatasync the data, then record what it covers. Safe to
        call from another thread than the writers; a no-op once closed."""
        with self._fd_lock:  # close() waits for us: the fd stays this file's
            with self._lock:
                done = list(self._done)
                fd = self.fd
            if fd < 0:
                return
            with contextlib.suppress(OSError):
                os.fdatasync(fd)
                write_atomic(self.dir / "state.json",
                             msgspec.json.encode(_IngestState(
                                 str(self.digest), self.size, self.chunk_size,
                                 coalesce(done))),
                             self.layout.ingest)

    # -- ending
    def commit(self, actual: Digest, source: str | None = None) -> Path:
        """Verify ``actual`` (the digest of what was written), then give the bytes their
        blob name: fsync, read-only, rename, fsync ``blobs/``. A mismatch drops the ingest
        and raises DigestMismatch."""
        if actual != self.digest:
            self.drop()
            raise DigestMismatch(str(self.digest), str(actual), source=source)
        try:
            os.fsync(self.fd)
            with self._fd_lock, self._lock:  # no checkpoint or journal write after this
                fds, self.fd, self._journal = (self.fd, self._journal), -1, -1
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            data = self.dir / "data"
            os.chmod(data, 0o444)
            self.layout.blobs.mkdir(parents=True, exist_ok=True)
            target = self.layout.blob(self.digest)
            # still the owner here: nobody can adopt (or truncate) the file being renamed
            os.replace(data, target)
        except OSError as exc:
            raise StoreUnwritable(str(self.dir), exc.strerror or str(exc)) from exc
        fsync_dir(self.layout.blobs)
        shutil.rmtree(self.dir, ignore_errors=True)  # the owner file goes with it
        self._owner = None
        return target

    def close(self) -> None:
        """Close the files, keeping the folder for a later resume (idempotent). The caller
        makes sure no thread still writes through :meth:`write_at`."""
        with self._fd_lock, self._lock:
            fds, self.fd, self._journal = (self.fd, self._journal), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._release_owner()

    def drop(self) -> None:
        """Close and delete the ingest folder (idempotent)."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
