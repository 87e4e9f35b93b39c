"""The ingest area seen from outside: what GC (:func:`scan`) and a waiting pull
(:func:`activity`, :func:`preallocated`) may know about the writers in it."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from blobstore.digest import Digest
from blobstore.ingest.folder import (
    OWNER_TTL,
    TOMBSTONE_PREFIX,
    local_identity,
    owner_status,
    read_state,
)
from blobstore.layout import Layout
from blobstore.lease import LeaseInfo, live_leases

__all__ = ["IngestEntry", "OwnBytes", "activity", "areas", "legacy_entry", "preallocated",
           "probe", "remove", "scan"]


@dataclass(frozen=True)
class IngestEntry:
    """One ingest as GC sees it (:func:`scan`)."""

    path: Path
    bytes: int               # on disk that its removal frees (not a file linked elsewhere)
    heartbeat: float         # time.time() of the writer's last sign of life
    owner_alive: bool        # its writer runs (or, from elsewhere, beats)
    leased: bool             # named by a live lease
    legacy: bool = False     # a temp file of an older blobctl, or Ollama's ``-partial``

    @property
    def held(self) -> bool:
        return self.owner_alive or self.leased

    def age(self, now: float) -> float:
        return now - self.heartbeat


class OwnBytes:
    """The bytes that go back to the file system when a set of files is removed: a
    file's blocks count only once every link to it is among them (spec/gc.md, "Bytes"):
    an HF cache file or a user's file hardlinked into an ingest keeps its bytes."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], int] = {}  # (device, inode) -> names seen

    def add(self, st: os.stat_result) -> int:
        """Count one name of a file: its blocks when this is its last link, else 0."""
        if st.st_nlink <= 1:
            return st.st_blocks * 512
        key = (st.st_dev, st.st_ino)
        seen = self._seen[key] = self._seen.get(key, 0) + 1
        return st.st_blocks * 512 if seen == st.st_nlink else 0


def _fs_age(path: Path) -> tuple[int, float]:
    """(bytes its removal frees, newest mtime or ctime) of a file or folder: the last
    sign of life of what has no heartbeat (a file renamed in keeps its old mtime; its
    ctime is the rename)."""
    try:
        st = path.lstat()
    except OSError:
        return 0, 0.0
    newest = max(st.st_mtime, st.st_ctime)
    own = OwnBytes()
    if not stat.S_ISDIR(st.st_mode):
        return own.add(st), newest
    size = 0
    for dirpath, _, files in os.walk(path):
        for fn in files:
            with contextlib.suppress(OSError):
                s = os.lstat(os.path.join(dirpath, fn))
                size += own.add(s)
                newest = max(newest, s.st_mtime, s.st_ctime)
    return size, newest


def _leased_names(leases: Iterable[LeaseInfo]) -> set[str]:
    names: set[str] = set()
    for lease in leases:
        names |= lease.ingests
    return names


def legacy_entry(path: Path, leases: Iterable[LeaseInfo] = (), *,
                 names: set[str] | None = None) -> IngestEntry:
    """An entry without a heartbeat (Ollama's ``blobs/*-partial``, an older blobctl's
    ``put-*.tmp``): its last sign of life is its newest mtime or ctime."""
    size, newest = _fs_age(path)
    names = _leased_names(leases) if names is None else names
    return IngestEntry(path, size, newest, False, path.name in names or str(path) in names,
                       True)


def probe(path: Path, leases: Iterable[LeaseInfo],
          now: float | None = None, *, ttl: float = OWNER_TTL, names: set[str] | None = None,
          here: tuple[str, str, str] | None = None) -> IngestEntry:
    """The entry at ``path`` (in the ingest area) as it is now. A foreign owner is alive
    while its heartbeat is younger than ``ttl`` (GC: its lease TTL). ``names`` (the
    leased ingest names) and ``here`` (:func:`local_identity`): if already known."""
    now = time.time() if now is None else now
    names = _leased_names(leases) if names is None else names
    leased = path.name in names or str(path) in names
    try:
        is_dir = stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        is_dir = False
    if not is_dir:
        return legacy_entry(path, names=names)
    if path.name.startswith(TOMBSTONE_PREFIX):  # GC's own, being deleted: no writer
        size, _ = _fs_age(path)
        return IngestEntry(path, size, 0.0, False, False)
    owner = owner_status(path, now, ttl=ttl, here=here)
    state = read_state(path)
    beats = [b for b in ((owner[1] if owner else 0.0), (state.saved if state else 0.0)) if b]
    size, newest = _fs_age(path)
    if beats:
        return IngestEntry(path, size, max(beats), bool(owner and owner[0]), leased)
    # no heartbeat at all: being created this instant, or left by an older blobctl
    return IngestEntry(path, size, newest, False, leased, legacy=True)


def scan(layout: Layout, leases: Iterable[LeaseInfo], now: float | None = None, *,
         ttl: float = OWNER_TTL) -> list[IngestEntry]:
    """Every entry of the ingest area: its writer alive or not (a foreign one: heartbeat
    younger than ``ttl``), leased or not, and its heartbeat. Entries of older versions
    (temp files) come as legacy entries; a folder GC left half-deleted (``.gc-``) as an
    entry with no heartbeat at all."""
    now = time.time() if now is None else now
    leases = list(leases)
    names, here = _leased_names(leases), local_identity()  # once, not per entry
    out: list[IngestEntry] = []
    for folder in areas(layout):
        try:
            entries = [e.name for e in os.scandir(folder)]
        except (FileNotFoundError, NotADirectoryError):
            continue
        out.extend(probe(folder / n, leases, now, ttl=ttl, names=names, here=here)
                   for n in entries)
    return out


def areas(layout: Layout) -> list[Path]:
    """The folders that hold ingest entries: ``.blobctl/ingest`` (temp files of state
    writes, and blobs when ``blobs/`` is on the same file system) and the blob ingest
    (``Layout.blob_ingest``) when that is another folder; both are scanned, so what was
    left in either before ``blobs/`` moved is still collected."""
    blob = layout.blob_ingest
    return [layout.ingest] if blob == layout.ingest else [layout.ingest, blob]


def activity(layout: Layout, digest: Digest) -> tuple[float, int]:
    """What changes while some process downloads ``digest`` into the store (its
    writes, journal records and checkpoints, not its heartbeat: a hung writer still
    beats): a peer whose signature stays the same for long is stuck."""
    folder = layout.blob_ingest / digest.filename
    newest, size = 0.0, 0
    for name in ("data", "journal", "state.json"):  # not the owner: a hung writer beats
        with contextlib.suppress(OSError):
            info = os.stat(folder / name)
            newest = max(newest, info.st_mtime)
            size += info.st_size
    return newest, size


def preallocated(layout: Layout, digest: Digest, size: int) -> bool:
    """Whether a resumable download of ``digest`` already holds its space: a data file
    of ``size`` bytes (one of another size is made again, for the size asked now: found
    from outside, a size claim that grew was allocated without a check and filled the
    disk)."""
    try:
        return (layout.blob_ingest / digest.filename / "data").stat().st_size == size
    except OSError:
        return False


def remove(layout: Layout, path: Path, *, ttl: float = OWNER_TTL) -> str | None:
    """Delete the ingest folder ``path`` that GC judged stale; None when done, else why
    it stays. Not by its path: first renamed to a ``.gc-`` tombstone (a name no writer
    adopts), then its owner and the leases asked again (a pull may have adopted it
    right before the rename: then it is put back), then removed. A tombstone left by a
    crash is collected by the next GC. Raises nothing: an OSError is the reason."""
    tomb = path.parent / f"{TOMBSTONE_PREFIX}{secrets.token_hex(8)}"  # (same folder)
    try:
        os.rename(path, tomb)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot remove it: {exc.strerror or exc}"
    names = _leased_names(live_leases(layout, ttl=ttl))
    owner = owner_status(tomb, time.time(), ttl=ttl)
    if (owner is not None and owner[0]) or path.name in names or str(path) in names:
        try:
            os.rename(tomb, path)  # adopted meanwhile: its writer's again
        except OSError as exc:
            return f"adopted while being removed; left as {tomb.name}: {exc.strerror or exc}"
        return "its writer came back"
    try:
        shutil.rmtree(tomb)
    except OSError as exc:
        return f"partly removed ({tomb.name} stays for the next GC): {exc.strerror or exc}"
    return None
