"""Leases: how a live writer (a pull, an import) tells GC "hands off".

A lease is a small JSON file in ``.blobctl/leases/`` naming the process that holds it,
the blob digests it needs and the ingest entries (temp files, resumable downloads) it
writes. GC and ``rm`` never delete a blob or an ingest entry named by a live lease
(spec/gc.md, "Never deleted").

Whether a lease is live (spec/store-layout.md, "Leases"):

* The holder is named by **host id** (host name + the kernel's boot id), **pid
  namespace** and **pid + process start time**. Seen from the same host and pid
  namespace, the lease is live exactly while that process runs (a recycled pid has
  another start time), so a killed writer's lease lapses at once.
* From another host, another boot, or another pid namespace (a container sharing the
  store with the host, a store on NFS) the pid means nothing here. The holder refreshes
  a **heartbeat** in the file every ``HEARTBEAT_SECONDS``; such a lease is live until
  its heartbeat is older than ``LEASE_TTL`` (5 minutes by default). Clocks of the hosts
  sharing a store must agree to well within that.
* A lease file written by an older blobctl (no host id) is judged by pid + start time.

A lease whose digest list holds something that is not a digest keeps what it names
that is, and is otherwise ignored: one odd lease never breaks ``gc`` or ``rm``.

A lease that names many digests (an import or pull of thousands of blobs) spans several
files, each a whole lease of the same holder, and readers take the union of the live
ones. ``add()`` rewrites only the newest file; once that names ``SEGMENT_DIGESTS``
digests it is sealed (never again rewritten to name less, but to drop an ingest entry
that is gone and to refresh its heartbeat) and a new file, naming the ingest entries,
takes the next ones. No digest ever leaves a file while the lease is held, so a reader
that lists the folder once still finds every digest whose ``add()`` returned before it
began, and an update costs O(change), not O(lease) (found from outside: an import of
8,000 tiny blobs took 121-151 s, each blob rewriting every digest so far).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from blobstore.decoding import decode
from blobstore.digest import Digest
from blobstore.errors import InsufficientSpace, InvalidDigest, StoreError, StoreUnwritable
from blobstore.layout import Layout, write_atomic
from blobstore.owner import make_dirs

__all__ = [
    "HEARTBEAT_SECONDS",
    "LEASE_TTL",
    "SEGMENT_DIGESTS",
    "Lease",
    "LeaseInfo",
    "host_id",
    "live_leases",
    "pid_namespace",
    "process_alive",
    "process_start_time",
]

LEASE_TTL = 300.0
HEARTBEAT_SECONDS = 30.0
SEGMENT_DIGESTS = 256  # digests a lease file takes before they move to a sealed one


class _LeaseDoc(msgspec.Struct):
    pid: int
    start_time: float
    created: float
    purpose: str = ""
    digests: list[str] = msgspec.field(default_factory=list)
    ingests: list[str] = msgspec.field(default_factory=list)
    host: str = ""          # host_id() of the holder; "" from older versions
    pidns: str = ""         # pid_namespace() of the holder
    heartbeat: float = 0.0  # time.time() of the holder's last refresh


_DEC = msgspec.json.Decoder(_LeaseDoc)


@functools.lru_cache(maxsize=1)
def boot_id() -> str:
    """This boot's id (Linux), or "" where unknown (it cannot change while we run):
    page-cache contents survive a killed process but not a reboot, so light checkpoints
    are trusted only within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def host_id() -> str:
    """``<hostname>/<boot id>``: the same for every process of one boot of one host."""
    return f"{socket.gethostname()}/{boot_id() or '?'}"


def pid_namespace() -> str:
    """This process's pid namespace (``pid:[4026531836]``), or "" where unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_start_time(pid: int) -> float | None:
    """The start time of process ``pid`` (psutil), or None if it does not exist."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, ValueError):
        return None


def process_alive(pid: int, start_time: float) -> bool:
    """True if ``pid`` runs and started at ``start_time`` (within clock granularity)."""
    if pid <= 0:
        return False
    actual = process_start_time(pid)
    if actual is None:
        # psutil could not look: trust the pid alone.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return abs(actual - start_time) < 1.0


def _alive(doc: _LeaseDoc, ttl: float, wall: float) -> bool:
    if not doc.host or (doc.host == host_id() and doc.pidns == pid_namespace()):
        return process_alive(doc.pid, doc.start_time)
    return wall - max(doc.heartbeat, doc.created) < ttl


@dataclass(frozen=True)
class LeaseInfo:
    path: Path
    pid: int
    purpose: str
    digests: frozenset[Digest]
    ingests: frozenset[str]
    created: float
    host: str = ""
    heartbeat: float = 0.0


def live_leases(layout: Layout, *, remove_stale: bool = False,
                ttl: float = LEASE_TTL) -> list[LeaseInfo]:
    """Every live lease. With ``remove_stale``, delete the files of lapsed ones."""
    out: list[LeaseInfo] = []
    try:
        entries = list(os.scandir(layout.leases))
    except FileNotFoundError:
        return out
    wall = time.time()
    for e in entries:
        if not e.name.endswith(".json"):
            if remove_stale and e.name.startswith("w-") and e.name.endswith(".tmp"):
                # a rewrite's temp file left by a killed writer (a live one renames its
                # temp file within milliseconds of creating it)
                with contextlib.suppress(OSError):
                    if wall - e.stat().st_mtime > ttl:
                        os.unlink(e.path)
            continue
        try:
            doc = decode(Path(e.path).read_bytes(), _DEC)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            # A rewrite renames a whole file into place, so only a power loss (leases are
            # not fsynced) or another tool leaves one that does not decode: collected
            # like a lapsed lease once older than the TTL.
            if remove_stale:
                with contextlib.suppress(OSError):
                    if wall - e.stat().st_mtime > ttl:
                        os.unlink(e.path)
            continue
        if not _alive(doc, ttl, wall):
            if remove_stale:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
            continue
        digests: set[Digest] = set()
        for d in doc.digests:
            with contextlib.suppress(InvalidDigest):
                digests.add(Digest.parse(d))
        out.append(LeaseInfo(Path(e.path), doc.pid, doc.purpose, frozenset(digests),
                             frozenset(doc.ingests), doc.created, doc.host, doc.heartbeat))
    return out


@dataclass
class Lease:
    """A lease held by this process. ``add()`` rewrites its file atomically (the
    digests beyond ``SEGMENT_DIGESTS`` live in sealed files of their own, see the module
    docstring); while held, a daemon thread refreshes the heartbeat of every file every
    ``heartbeat_seconds``. Thread-safe.

    A lease file belongs to the process that made it (spec/api.md, "Forking"). In a
    forked child the inherited ``Lease`` never touches the parent's file: ``release()``
    (the end of the ``with`` block, ``sys.exit``) leaves it, and the first ``add()`` or
    ``discard()`` makes the child's own lease file, naming everything the lease names
    (with its own heartbeat), which the child's ``release()`` removes."""

    layout: Layout
    purpose: str
    digests: set[Digest] = field(default_factory=set)
    ingests: set[str] = field(default_factory=set)
    path: Path | None = None
    heartbeat_seconds: float = HEARTBEAT_SECONDS
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _beat: threading.Thread | None = field(default=None, repr=False)
    _also: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _pid: int = field(default=0, repr=False)
    _start_time: float | None = field(default=None, repr=False)  # of _pid, looked up once
    _owner: int = field(default=0, repr=False)  # the pid whose lease this object holds
    _inherited: bool = field(default=False, repr=False)  # held by the parent at a fork
    _open: set[Digest] = field(default_factory=set, repr=False)  # named in ``path``
    # the lease's earlier files: (path, digests, ingest entries it still names)
    _sealed: list[tuple[Path, list[str], set[str]]] = field(default_factory=list,
                                                             repr=False)

    def acquire(self) -> Lease:
        self._forked()
        make_dirs(self.layout.leases)
        with self._lock:
            self._new_file()
        return self

    def _new_file(self) -> None:
        """Make this process's lease file and start its heartbeat (under ``_lock``)."""
        self.path = self._new_path()
        self._owner = os.getpid()
        self._inherited = False
        self._sealed = []
        self._open = set(self.digests)
        self._write()
        self._stop.clear()
        self._beat = threading.Thread(target=self._refresh, name="blobctl-lease",
                                      daemon=True)
        self._beat.start()

    def _forked(self) -> None:
        """In a forked child, on first use: the parent's lease file (and heartbeat,
        lock, beat callbacks) stay the parent's; the child holds no file of its own
        until it writes (``_inherited`` remembers that the parent held one)."""
        pid = os.getpid()
        if self._owner in (0, pid):
            return
        self._lock = threading.Lock()  # (a parent thread may have held it at the fork)
        self._stop = threading.Event()
        self._beat = None
        self._also = []  # (the parent's ingest writers refresh their own heartbeats)
        self._inherited = self.path is not None
        self.path = None
        self._sealed = []  # (the parent's files: the child writes its own)
        self._owner = pid

    def add(self, *, digests: set[Digest] | None = None, ingests: set[str] | None = None) -> None:
        """Name more digests / ingest entries; every process sees them when this returns
        (a lease is never fsynced: after a power loss its holder is gone anyway)."""
        self._forked()
        with self._lock:
            changed = False
            if digests and not digests <= self.digests:
                new = digests - self.digests
                self.digests |= new
                self._open |= new
                changed = True
            if ingests and not ingests <= self.ingests:
                self.ingests |= ingests
                changed = True
            if changed:
                self._rewrite()

    def _rewrite(self) -> None:
        """Write the lease file again (under ``_lock``): in a forked child whose parent
        held the lease, the child's own file first."""
        if self.path is not None:
            self._write()
        elif self._inherited:
            make_dirs(self.layout.leases)
            self._new_file()

    def discard(self, *, ingests: set[str]) -> None:
        """Stop naming ingest entries (they are gone)."""
        self._forked()
        with self._lock:
            if ingests & self.ingests:
                self.ingests -= ingests
                if self.path is not None:  # (an earlier file may name one too)
                    for path, digests, named in self._sealed:
                        if ingests & named:
                            named.difference_update(ingests)
                            self._write_doc(path, digests, sorted(named))
                self._rewrite()

    def on_beat(self, fn: Callable[[], None], *, remove: bool = False) -> None:
        """Call ``fn`` at each heartbeat while the lease is held (an open ingest writer
        refreshes its own heartbeat so); ``remove`` stops that."""
        self._forked()
        with self._lock:
            if remove:
                with contextlib.suppress(ValueError):
                    self._also.remove(fn)
            else:
                self._also.append(fn)

    def _refresh(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            with self._lock:
                if self.path is None:
                    return
                with contextlib.suppress(OSError, StoreError):
                    for path, digests, named in self._sealed:
                        self._write_doc(path, digests, sorted(named))
                    self._write_doc(self.path, sorted(map(str, self._open)),
                                    sorted(self.ingests))
                also = list(self._also)
            for fn in also:
                with contextlib.suppress(OSError):
                    fn()

    def _new_path(self) -> Path:
        return self.layout.leases / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.json"

    def _write(self) -> None:
        """Write this process's newest lease file (under ``_lock``); once it names
        ``SEGMENT_DIGESTS`` digests it is sealed as it is, and a new file, naming the
        ingest entries, takes the next digests (written before this returns, so no
        instant sees an ingest entry unnamed)."""
        assert self.path is not None and self._owner == os.getpid()
        digests = sorted(map(str, self._open))
        self._write_doc(self.path, digests, sorted(self.ingests))
        if len(digests) >= SEGMENT_DIGESTS:
            self._sealed.append((self.path, digests, set(self.ingests)))
            self.path = self._new_path()
            self._open = set()
            self._write_doc(self.path, [], sorted(self.ingests))

    def _write_doc(self, path: Path, digests: list[str], ingests: list[str]) -> None:
        """Write one lease file naming ``digests`` and ``ingests`` atomically."""
        assert self._owner == os.getpid()
        now = time.time()
        if self._start_time is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._start_time = process_start_time(self._pid) or 0.0
        doc = _LeaseDoc(
            pid=self._pid,
            start_time=self._start_time,
            created=now,
            # a label for people (it may name a file whose name is not UTF-8)
            purpose=self.purpose.encode("utf-8", "backslashreplace").decode("utf-8"),
            digests=digests,
            ingests=ingests,
            host=host_id(),
            pidns=pid_namespace(),
            heartbeat=now,
        )
        # the temp file sits beside the lease (never in ingest/, where GC judges files)
        try:
            # Visible to every process at once, atomically; not fsynced (a rewrite per blob
            # of a pull: with fsyncs, 4 of the 12 a blob of a 300-layer pull cost).
            write_atomic(path, msgspec.json.encode(doc), self.layout.leases,
                         durable=False)
        except OSError as exc:  # a full disk is a store error like any write's, not a crash
            where = str(self.layout.leases)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                try:
                    free = shutil.disk_usage(where).free
                except OSError:
                    free = 0
                raise InsufficientSpace(where, None, free) from exc
            raise StoreUnwritable(where, exc.strerror or str(exc)) from exc

    def release(self) -> None:
        """Stop naming anything: remove this process's lease file (in a forked child,
        never the parent's). Idempotent."""
        self._forked()
        self._inherited = False
        self._stop.set()
        beat, self._beat = self._beat, None
        if beat is not None and beat is not threading.current_thread():
            beat.join()
        with self._lock:
            if self.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                self.path = None
            for path, _, _ in self._sealed:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self._sealed = []

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
