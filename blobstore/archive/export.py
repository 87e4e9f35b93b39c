"""Export models as an OCI image layout: folder, .tar or .tar.zst (spec/archive.md)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from blobstore.archive.common import (
    ANNOTATION_REF_NAME,
    INDEX_CHECK,
    OCI_LAYOUT,
    ExportResult,
    Progress,
    emit,
    file_kind,
    reader_lease,
)
from blobstore.digest import Digest
from blobstore.errors import (
    InsufficientSpace,
    IntegrityError,
    InvalidInput,
    StoreError,
)
from blobstore.ingest import check_free_space
from blobstore.layout import fsync_dir
from blobstore.manifest import OCI_INDEX, Manifest
from blobstore.name import ModelName
from blobstore.store import Store
from blobstore.tarstream import (
    Writeback,
    copy_range,
    tar_header,
    tar_padding,
    tar_trailer,
)
from blobstore.units import human_bytes

__all__ = ["export_models", "remove_dead_parts"]

# Blocks fed to the multi-threaded compressor: 8 MiB keeps both cores busy (1 MiB
# blocks made it ~1.7x slower than `zstd -T0` on the bench machine; 8 MiB, faster).
ZSTD_BLOCK = 8 << 20


def _export_format(dest: Path, fmt: str | None, as_dir: bool) -> str:
    if fmt is not None:
        if fmt not in ("dir", "tar", "tar.zst"):
            raise InvalidInput(f"unknown archive format {fmt!r}", hint="dir, tar or tar.zst")
        return fmt
    name = dest.name.lower()
    if as_dir or dest.is_dir():
        return "dir"
    if name.endswith((".tar.zst", ".tzst")):
        return "tar.zst"
    if name.endswith(".tar"):
        return "tar"
    raise InvalidInput(f"cannot tell the archive format from {dest.name!r}",
                       hint="name it FILE.tar or FILE.tar.zst, or DIR/ for a folder")


def _index_bytes(entries: list[tuple[ModelName, Manifest]]) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": m.media_type, "digest": str(m.digest), "size": len(m.raw),
         "annotations": {ANNOTATION_REF_NAME: str(n)}} for n, m in entries]}
    return msgspec.json.encode(doc)


class _TarSink:
    """Writes tar members to a file descriptor, optionally through zstd. Never seeks the
    descriptor: it may be a pipe (``regular=False``: no writeback of a file)."""

    def __init__(self, fd: int, zstd: bool, level: int, *, regular: bool = True) -> None:
        self.fd = fd
        self.written = 0  # uncompressed tar bytes
        self.writeback = Writeback(fd) if regular else None
        self._z: Any = None
        self._file: BinaryIO | None = None
        self._worker: _Offload | None = None
        if zstd:
            import zstandard

            self._file = os.fdopen(os.dup(fd), "wb", buffering=0)
            cctx = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
            self._z = cctx.stream_writer(self._file, closefd=False)
            self._worker = _Offload(self._file)

    def _zwrite(self, data: bytes | memoryview) -> None:
        assert self._worker is not None
        self._worker.call(self._z.write, data)

    def write(self, data: bytes) -> None:
        if self._z is not None:
            self._zwrite(data)
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        self.written += len(data)

    def member(self, name: str, src_fd: int | None, size: int, data: bytes = b"",
               is_dir: bool = False, tick: Callable[[int], None] | None = None) -> None:
        self.write(tar_header(name, size, is_dir=is_dir))
        if src_fd is None:
            self.write(data)
        elif self._z is None:
            copy_range(src_fd, self.fd, size, after=self._kick)
            self.written += size
        else:
            done = 0
            buf = bytearray(ZSTD_BLOCK)
            while done < size:
                n = os.readv(src_fd, [buf])
                if n <= 0:
                    raise OSError(f"blob shrank while it was exported: {name}")
                n = min(n, size - done)
                self._zwrite(memoryview(buf)[:n])
                self._kick()
                done += n
                self.written += n
                if tick is not None:
                    tick(done)
        if not is_dir:
            self.write(tar_padding(size))

    def _kick(self, _done: int = 0) -> None:
        if self.writeback is not None:
            self.writeback.kick()

    @property
    def bytes_out(self) -> int:
        """Bytes written to the descriptor so far (compressed for zstd)."""
        return int(self._z.tell()) if self._z is not None else self.written

    def close(self) -> None:
        """Write the end of the archive (and of the zstd frame)."""
        self.write(tar_trailer(self.written))
        if self._z is not None:
            assert self._worker is not None
            self._worker.call(self._z.close)
            self._worker.stop()
        if self._file is not None:
            self._file.close()
            self._file = None

    def abort(self) -> None:
        """Let go of the descriptor's duplicate without writing anything more."""
        if self._worker is not None and not self._worker.stop():
            self._file = None  # (the worker closes it when its call returns)
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()  # (unbuffered: nothing is flushed)
            self._file = None


class _Offload:
    """Runs the zstd calls on a thread of their own while the caller waits in Python.

    A multi-threaded zstd compressor's write, flush or close waits in C for its jobs
    (a level-19 job is tens of seconds): a signal's handler cannot run in the thread
    that made the call until it returns (found from outside: Ctrl-C and SIGTERM took
    ~40 s to stop ``export --zstd-level 19``). Waiting on an event instead, the caller
    sees the signal at once; the call left running then closes ``file`` (the
    descriptor's duplicate it writes to) itself when it returns, so the number is never
    reused under it."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._busy = False
        self._abandoned = False

    def call(self, fn: Callable[..., object], *args: object) -> None:
        done = threading.Event()
        box: list[BaseException] = []

        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001  (re-raised by the caller)
                box.append(exc)
            finally:
                with self._lock:
                    self._busy = False
                    left = self._abandoned
                done.set()
                if left:
                    with contextlib.suppress(OSError):
                        self._file.close()

        with self._lock:
            assert not self._busy and not self._abandoned, "one call at a time"
            self._busy = True
        threading.Thread(target=run, name="blobctl-zstd", daemon=True).start()
        try:
            done.wait()
        except BaseException:
            with self._lock:
                if self._busy:
                    self._abandoned = True
            raise
        if box:
            raise box[0]

    def stop(self) -> bool:
        """True if no call is left running (else its thread closes the file)."""
        with self._lock:
            return not self._busy


def export_models(
    store: Store,
    names: Sequence[ModelName],
    dest: Path | str | int,
    *,
    format: str | None = None,
    zstd_level: int = 3,
    progress: Progress | None = None,
) -> ExportResult:
    """Write the models ``names`` as an OCI image layout at ``dest``.

    ``format``: ``dir``, ``tar`` or ``tar.zst``; by default from ``dest`` (``.tar``,
    ``.tar.zst``, an existing folder or a path given with a trailing ``/`` → ``dir``).
    ``dest`` is a path, or an open file descriptor (``format`` ``tar`` or ``tar.zst``)
    that the archive is streamed into without seeking, e.g. a pipe; it is not closed.

    A path is never replaced unless it is a regular file: a symlink is followed and the
    file it names is written under a temp name beside it and renamed over it when
    complete (atomic); an existing FIFO or character device is streamed into (opened
    and written, like a descriptor); anything else (a socket, a block device, a symlink
    loop) and a terminal are refused (InvalidInput). A folder gets ``index.json`` last.
    The index lists the models by name: the same models give the same bytes in any
    order. A temp file an export to the same path killed without cleanup left is
    removed first (:func:`remove_dead_parts`). A stream that fails midway has received
    part of an archive (which import refuses as truncated). Raises ModelNotFound,
    StoreDamaged (a blob of a model is missing), InvalidInput (unknown format, a
    non-empty folder, a target refused above), StoreError when a stream stops midway
    (e.g. ``EPIPE``: its reader went away) and OSError. Blobs are copied as stored:
    ``blobctl verify`` checks them, and every importer re-hashes them.
    ``progress`` receives ``{"status": "exporting <12 hex>", "digest", "total",
    "completed"}`` events.
    """
    t0 = time.monotonic()
    if isinstance(dest, int):
        if format not in ("tar", "tar.zst"):
            raise InvalidInput("an archive streamed to a file descriptor needs its format",
                               hint="tar or tar.zst; a folder cannot be streamed")
        fmt = format
    else:
        as_dir = str(dest).endswith(("/", os.sep))
        dest = Path(dest).expanduser().absolute()
        fmt = _export_format(dest, format, as_dir)
    entries: list[tuple[ModelName, Manifest]] = []
    seen: set[ModelName] = set()
    for n in names:
        canonical = store.canonical_name(n)
        if canonical in seen:
            continue
        seen.add(canonical)
        m = store.get_manifest(canonical)
        store.check_blobs(canonical, m)
        entries.append((canonical, m))
    if not entries:
        raise InvalidInput("no model to export")
    entries.sort(key=lambda e: str(e[0]))  # the same models give the same bytes, in any order
    blobs: dict[Digest, tuple[int, bytes | None]] = {}  # digest -> (size, manifest bytes)
    for _, m in entries:
        blobs.setdefault(m.digest, (len(m.raw), m.raw))
        for d in m.descriptors:
            blobs.setdefault(d.digest, (d.size, None))
    result = ExportResult(None if isinstance(dest, int) else dest, fmt,
                          [(n, m.digest) for n, m in entries], blobs=len(blobs))
    index = _index_bytes(entries)
    tar = _TarJob(store, fmt, zstd_level, blobs, index, result, progress)
    label = f"fd {dest}" if isinstance(dest, int) else dest.name
    with reader_lease(store.layout, f"export {label}", set(blobs)):
        if isinstance(dest, int):
            tar.stream(dest, "stdout" if dest == 1 else f"file descriptor {dest}")
        elif fmt == "dir":
            _export_dir(store, dest, blobs, index, result, progress)
        else:
            tar.to_path(dest)
    result.seconds = time.monotonic() - t0
    emit(progress, status="success")
    return result


def _open_blob_fd(store: Store, digest: Digest, size: int) -> int:
    fd = os.open(store.blob_path(digest), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    actual = os.fstat(fd).st_size
    if actual != size:
        os.close(fd)
        raise IntegrityError(f"blob {digest} has {actual} bytes, its manifest says {size}",
                             hint="run 'blobctl verify'")
    return fd


class _TarJob:
    """One tar/tar.zst export: where it goes decides how it is written."""

    def __init__(self, store: Store, fmt: str, level: int,
                 blobs: dict[Digest, tuple[int, bytes | None]], index: bytes,
                 result: ExportResult, progress: Progress | None) -> None:
        self.store = store
        self.fmt = fmt
        self.level = level
        self.blobs = blobs
        self.index = index
        self.result = result
        self.progress = progress
        self.written = 0  # bytes in the part file when writing it failed

    def to_path(self, dest: Path) -> None:
        """A FIFO or character device is streamed into; a new or regular file (through
        symlinks) written atomically; anything else refused, never replaced."""
        try:
            mode: int | None = os.stat(dest).st_mode
        except FileNotFoundError:
            mode = None  # (also a dangling symlink: the file it names is created)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidInput(f"{dest} is a symlink loop") from exc
            raise
        if mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            fd = os.open(dest, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)  # a FIFO: waits
            try:                                                           # for a reader
                now = os.fstat(fd).st_mode
                if not (stat.S_ISFIFO(now) or stat.S_ISCHR(now)):
                    raise InvalidInput(f"{dest} changed while it was opened; not written")
                self.stream(fd, str(dest))
            finally:
                os.close(fd)
            return
        if mode is not None and not stat.S_ISREG(mode):
            raise InvalidInput(f"{dest} is {file_kind(mode)}; an archive is written to a "
                               f"new or regular file, a FIFO or a character device")
        self.atomically(Path(os.path.realpath(dest)))

    def stream(self, fd: int, label: str) -> None:
        """Into ``fd`` as it is (a pipe, a device, stdout): no temp file, no rename."""
        if os.isatty(fd):
            raise InvalidInput(f"refusing to write an archive to a terminal ({label})",
                               hint="redirect it to a file or a pipe")
        sink = _TarSink(fd, self.fmt == "tar.zst", self.level, regular=False)
        try:
            self._members(sink)
            sink.close()
        except OSError as exc:
            sink.abort()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # (the CLI's "disk full")
            # mapped, so that EPIPE is not a CLI's quiet "stdout closed early" exit
            raise StoreError(f"the export to {label} stopped: {exc.strerror or exc}",
                             hint=f"{label} got part of an archive (import refuses it "
                                  f"as truncated)") from exc
        except BaseException:
            sink.abort()
            raise
        self.result.bytes_out = sink.bytes_out

    def _blob_bytes(self) -> int:
        return sum(size for size, _ in self.blobs.values())

    def _no_space(self, dest: Path, free: int, written: int | None) -> InsufficientSpace:
        """The disk at ``dest`` cannot hold the archive: the error names the output path,
        the archive's size (before compression for tar.zst) and the space free there."""
        total = self._blob_bytes() + 512 * (2 * len(self.blobs) + 8)  # + tar headers
        err = InsufficientSpace(str(dest), max(0, total - free) if written is None else None,
                                free)
        size = (f"about {human_bytes(total)}" if self.fmt == "tar"
                else f"up to {human_bytes(total)} (before compression)")
        where = ("" if written is None
                 else f"; the disk filled up after {human_bytes(written)} of it")
        err.message = (f"not enough disk space for {dest}: the archive is {size}, "
                       f"{human_bytes(free)} was free there{where}")
        err.hint = ("free space there or write the archive to another disk (-o PATH); "
                    f"nothing was left at {dest}")
        return err

    def atomically(self, dest: Path) -> None:
        """As ``.NAME.<pid>.part`` beside ``dest``, fsynced, renamed over it. A plain tar
        that cannot fit is refused before any byte is written, and a disk that fills up
        while writing is ``InsufficientSpace`` naming ``dest`` (the part is removed)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_parts(dest)
        try:
            free = shutil.disk_usage(dest.parent).free
        except OSError:
            free = None
        if free is not None and self.fmt == "tar":
            err = self._no_space(dest, free, None)
            if err.needed:
                raise err
        try:
            self._write_atomically(dest)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or free is None:
                raise
            raise self._no_space(dest, free, self.written) from exc  # (free at the start)

    def _write_atomically(self, dest: Path) -> None:
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            with contextlib.suppress(OSError):  # (held while written: remove_dead_parts)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            sink = _TarSink(fd, self.fmt == "tar.zst", self.level)
            self._members(sink)
            sink.close()
            os.fsync(fd)
            self.result.bytes_out = os.fstat(fd).st_size
            os.close(fd)
            fd = -1
            with contextlib.suppress(FileNotFoundError):  # (changed since to_path looked)
                mode = os.lstat(dest).st_mode
                if not stat.S_ISREG(mode):
                    raise InvalidInput(f"{dest} became {file_kind(mode)} during the "
                                       f"export; not replaced")
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except BaseException:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    self.written = os.fstat(fd).st_size
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _members(self, sink: _TarSink) -> None:
        sink.member("oci-layout", None, len(OCI_LAYOUT), OCI_LAYOUT)
        sink.member("blobs/", None, 0, is_dir=True)
        for alg in sorted({d.algorithm for d in self.blobs}):
            sink.member(f"blobs/{alg}/", None, 0, is_dir=True)
        for d, (size, raw) in self.blobs.items():
            name = f"blobs/{d.algorithm}/{d.hex}"
            status = f"exporting {d.short}"

            def tick(done: int, d: Digest = d, size: int = size, status: str = status) -> None:
                emit(self.progress, status=status, digest=str(d), total=size,
                     completed=done)

            if raw is not None:
                sink.member(name, None, size, raw)
            else:
                src = _open_blob_fd(self.store, d, size)
                try:
                    sink.member(name, src, size, tick=tick)
                finally:
                    os.close(src)
            self.result.bytes_in += size
            tick(size)
        sink.member("index.json", None, len(self.index), self.index)
        check = (Digest.of_bytes(self.index).hex + "\n").encode()
        sink.member(INDEX_CHECK, None, len(check), check)


def remove_dead_parts(dest: Path) -> list[Path]:
    """Remove the temp files an export to ``dest`` killed without cleaning up (SIGKILL,
    the OOM killer, power loss) left beside it; return them.

    A file goes only if all hold: its name is exactly ``.NAME.<pid>.part`` for
    ``dest``'s NAME (``<pid>`` ASCII digits, no leading zero); it is a regular file
    (never followed if a symlink); no process with that pid exists (``kill(pid, 0)``
    says ESRCH; EPERM is a live process of another user); and it is not locked: a live
    export holds ``flock`` on its part file for as long as it writes it, so a pid
    reused by another process, or seen from another pid namespace, still keeps a
    live export's file (a file that cannot be locked, e.g. ``ENOLCK``, stays too).
    Nothing here raises: what cannot be checked is left as it is.
    """
    prefix = f".{dest.name}."
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return []
    removed = []
    for name in names:
        pid = name[len(prefix):-len(".part")]
        if not (name.startswith(prefix) and name.endswith(".part") and pid.isascii()
                and pid.isdigit() and not pid.startswith("0")):
            continue
        if int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        path = dest.parent / name
        if _unlink_unlocked(path):
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` may exist (True when it cannot be told)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # EPERM: someone else's process; or no such pid could be asked
    return True


def _unlink_unlocked(path: Path) -> bool:
    """Unlink ``path`` if it is a regular file (not a symlink) nobody holds a lock on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False  # replaced since it was opened
        os.unlink(path)
        return True
    except OSError:
        return False  # locked (a live export), or gone
    finally:
        os.close(fd)


def _export_dir(store: Store, dest: Path, blobs: dict[Digest, tuple[int, bytes | None]],
                index: bytes, result: ExportResult, progress: Progress | None) -> None:
    if dest.exists() and not dest.is_dir():
        raise InvalidInput(f"{dest} is {file_kind(dest.stat().st_mode)}, not a folder")
    if dest.exists() and any(dest.iterdir()):
        raise InvalidInput(f"{dest} is not empty", hint="export into a new or empty folder")
    check_free_space(dest.parent if not dest.exists() else dest,
                     sum(s for s, _ in blobs.values()))
    for d, (size, raw) in blobs.items():
        folder = dest / "blobs" / d.algorithm
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / d.hex
        tmp = folder / f".{d.hex}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            if raw is not None:
                os.write(fd, raw)
            else:
                src = _open_blob_fd(store, d, size)
                try:
                    copy_range(src, fd, size)
                finally:
                    os.close(src)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        result.bytes_in += size
        result.bytes_out += size
        emit(progress, status=f"exporting {d.short}", digest=str(d), total=size,
             completed=size)
    for name, data in (("oci-layout", OCI_LAYOUT),
                       (INDEX_CHECK, (Digest.of_bytes(index).hex + "\n").encode()),
                       ("index.json", index)):
        (dest / f".{name}.part").write_bytes(data)
        os.replace(dest / f".{name}.part", dest / name)
        result.bytes_out += len(data)
    for folder in {dest / "blobs" / d.algorithm for d in blobs}:
        fsync_dir(folder)
    fsync_dir(dest)
