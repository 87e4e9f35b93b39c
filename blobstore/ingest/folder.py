"""The ingest folder's format (spec/store-layout.md, "Ingest"): the owner record, the
durable checkpoint, the journal's framing, and how an owner is judged alive. Private to
``blobstore.ingest``: nothing outside the package reads these files."""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from pathlib import Path

import msgspec

from blobstore.decoding import decode
from blobstore.lease import (
    LEASE_TTL,
    boot_id,
    pid_namespace,
    process_alive,
    process_start_time,
)

__all__ = ["CLOEXEC", "HEARTBEAT_SECONDS", "JOURNAL_MAGIC", "OWNER_DECODER", "OWNER_TTL",
           "PRIVATE_PREFIX", "RECORD", "STAGING_PREFIX", "STATE_DECODER", "TOMBSTONE_PREFIX",
           "IngestState", "Owner", "boot_id", "coalesce", "covered_chunks", "identity",
           "local_identity", "owner_record", "owner_status", "read_state", "start_time"]

# Seconds without a heartbeat after which a foreign owner is gone: the lease TTL, one
# setting for both (GC passes its GCOptions.lease_ttl; writers taking a folder over use
# this default).
OWNER_TTL = LEASE_TTL
HEARTBEAT_SECONDS = 30.0   # how often an open writer refreshes its heartbeat
PRIVATE_PREFIX = "up-"
STAGING_PREFIX = ".new-"   # a private folder being made (owner inside), renamed to up-…
TOMBSTONE_PREFIX = ".gc-"  # a folder GC took out of the way before deleting it

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


def covered_chunks(ranges: set[tuple[int, int]], size: int,
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


class Owner(msgspec.Struct):
    host: str
    boot: str
    pid: int
    start: float
    beat: float = 0.0   # time.time() of the claim (the heartbeat is the file's mtime)
    pidns: str = ""


class IngestState(msgspec.Struct):
    digest: str                      # "" while not known (appends of unknown content)
    size: int                        # the blob's size, or -1 while not known
    chunk_size: int
    done: list[tuple[int, int]]
    kind: str = "ranges"             # ranges | append | link
    algorithm: str = ""
    saved: float = 0.0               # time.time() of this checkpoint: a heartbeat
    meta: dict[str, str] = {}        # the caller's own notes (serve: repository, caller)


OWNER_DECODER = msgspec.json.Decoder(Owner)
STATE_DECODER = msgspec.json.Decoder(IngestState)
JOURNAL_MAGIC = b"blobctl-journal-1"
RECORD = struct.Struct("<QQ")
CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def start_time(pid: int) -> float:
    """Start time of ``pid`` (seconds since the epoch), or -1 if it does not run."""
    t = process_start_time(pid)
    return -1.0 if t is None else t


@functools.lru_cache(maxsize=4)
def identity(pid: int) -> tuple[str, str, float, str]:
    """(host, boot, start time, pid namespace) of this process (keyed by pid: a forked
    child is another process)."""
    import socket

    return socket.gethostname(), boot_id(), start_time(pid), pid_namespace()


def owner_record(beat: float) -> bytes:
    """This process as the owner of a folder, with heartbeat ``beat``."""
    pid = os.getpid()
    host, boot, start, pidns = identity(pid)
    return msgspec.json.encode(Owner(host, boot, pid, start, beat, pidns))


def local_identity() -> tuple[str, str, str]:
    """(host name, boot id, pid namespace) of this machine and process, as owners are
    judged against (read once per scan, not per folder)."""
    import socket

    return socket.gethostname(), boot_id(), pid_namespace()


def owner_status(folder: Path, now: float, *, ttl: float = OWNER_TTL,
                 here: tuple[str, str, str] | None = None) -> tuple[bool, float] | None:
    """(alive, heartbeat) of the folder's owner, or None without one.

    Seen from its own host, boot and pid namespace an owner is alive exactly while its
    process runs; from elsewhere (a container, another host on a shared store) while its
    heartbeat (the later of its claim and its owner file's mtime) is younger than
    ``ttl`` (the lease TTL). ``here``: :func:`local_identity`, if already known.
    """
    host, boot, pidns = here or local_identity()
    try:
        raw = (folder / "owner").read_bytes()
    except OSError:
        return None
    if not raw:
        # created with O_EXCL (a file system without hard links) and not written yet:
        # an owner of unknown identity, alive while its file is younger than ``ttl``
        # (also what a crash at that instant leaves; a corrupt record is dead at once)
        try:
            mtime = (folder / "owner").stat().st_mtime
        except OSError:
            return None
        return now - mtime < ttl, mtime
    try:
        o = decode(raw, OWNER_DECODER)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False, 0.0
    beat = o.beat  # when it was claimed; each heartbeat since sets the file's mtime
    with contextlib.suppress(OSError):
        beat = max(beat, (folder / "owner").stat().st_mtime)
    if o.host == host and o.boot and o.boot == boot and (not o.pidns or o.pidns == pidns):
        return process_alive(o.pid, o.start), beat
    return now - beat < ttl, beat


def read_state(folder: Path) -> IngestState | None:
    try:
        return decode((folder / "state.json").read_bytes(), STATE_DECODER)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
