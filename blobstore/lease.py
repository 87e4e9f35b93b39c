"""Leases: how a live writer (a pull, an import) tells GC "hands off".

A lease is a small JSON file in ``.blobctl/leases/`` naming the process that holds it
(pid plus the process's start time, so a recycled pid is not mistaken for the holder),
the blob digests it needs and the ingest entries it writes. A lease is *live* while
that process runs; a killed process's lease lapses by itself, with no cleanup needed.
GC and ``rm`` never delete a blob or an ingest entry named by a live lease
(spec/gc.md, "Never delete").
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from blobstore.digest import Digest
from blobstore.layout import Layout, write_atomic

__all__ = ["Lease", "LeaseInfo", "live_leases", "process_alive", "process_start_time"]


class _LeaseDoc(msgspec.Struct):
    pid: int
    start_time: float
    created: float
    purpose: str = ""
    digests: list[str] = msgspec.field(default_factory=list)
    ingests: list[str] = msgspec.field(default_factory=list)


_DEC = msgspec.json.Decoder(_LeaseDoc)


def process_start_time(pid: int) -> float | None:
    """The start time of process ``pid`` (psutil), or None if it does not exist."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
        return None


def process_alive(pid: int, start_time: float) -> bool:
    """True if ``pid`` runs and started at ``start_time`` (within clock granularity)."""
    if pid <= 0:
        return False
    actual = process_start_time(pid)
    if actual is None:
        # psutil could not look (e.g. a pid in another namespace): trust the pid alone.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return abs(actual - start_time) < 1.0


@dataclass(frozen=True)
class LeaseInfo:
    path: Path
    pid: int
    purpose: str
    digests: frozenset[Digest]
    ingests: frozenset[str]
    created: float


def live_leases(layout: Layout, *, remove_stale: bool = False) -> list[LeaseInfo]:
    """Every lease whose process is alive. With ``remove_stale``, delete the others."""
    out: list[LeaseInfo] = []
    try:
        entries = list(os.scandir(layout.leases))
    except FileNotFoundError:
        return out
    for e in entries:
        if not e.name.endswith(".json"):
            continue
        try:
            doc = _DEC.decode(Path(e.path).read_bytes())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            continue  # half-written lease: its writer is still creating it, or died
        if not process_alive(doc.pid, doc.start_time):
            if remove_stale:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
            continue
        digests: set[Digest] = set()
        for d in doc.digests:
            with contextlib.suppress(ValueError):
                digests.add(Digest.parse(d))
        out.append(LeaseInfo(Path(e.path), doc.pid, doc.purpose, frozenset(digests),
                             frozenset(doc.ingests), doc.created))
    return out


@dataclass
class Lease:
    """A lease held by this process. ``update()`` rewrites it atomically."""

    layout: Layout
    purpose: str
    digests: set[Digest] = field(default_factory=set)
    ingests: set[str] = field(default_factory=set)
    path: Path | None = None

    def acquire(self) -> Lease:
        self.layout.leases.mkdir(parents=True, exist_ok=True)
        self.path = self.layout.leases / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.json"
        self._write()
        return self

    def add(self, *, digests: set[Digest] | None = None, ingests: set[str] | None = None) -> None:
        changed = False
        if digests and not digests <= self.digests:
            self.digests |= digests
            changed = True
        if ingests and not ingests <= self.ingests:
            self.ingests |= ingests
            changed = True
        if changed and self.path is not None:
            self._write()

    def _write(self) -> None:
        assert self.path is not None
        doc = _LeaseDoc(
            pid=os.getpid(),
            start_time=process_start_time(os.getpid()) or 0.0,
            created=time.time(),
            purpose=self.purpose,
            digests=sorted(str(d) for d in self.digests),
            ingests=sorted(self.ingests),
        )
        write_atomic(self.path, msgspec.json.encode(doc), self.layout.ingest)

    def release(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
