"""The blob folder as GC and ``du`` count it (spec/gc.md, "Bytes"): one table, one rule.

A digest may stand under two names (Ollama's current ``sha256-<hex>`` and its legacy
``sha256:<hex>``); both are the one blob: its entry lists every name present, and its
size is the bytes of its distinct files (two copies count twice, two hardlinks of one
inode once). A symlink at a blob name to a regular file is the blob (a big blob moved
to another disk and linked back; ``verify`` hashes it) with its target's size; a
symlink that leads to no regular file is damage, not a blob (listed apart). Files at
other names are not blobs; Ollama's ``<digest name>-partial[-N]`` are its unfinished
downloads.
"""

from __future__ import annotations

import array
import os
import stat
import struct
from typing import NamedTuple

from blobstore.digest import Digest
from blobstore.errors import InvalidDigest

__all__ = ["BlobFiles", "BlobTable", "blob_table", "scan_blobs", "stat_blob_folder",
           "unlink_names"]

# per file: size, mtime_ns, atime_ns, dev, ino, nlink, kind (_REG, _LINK, _DANGLING)
_FIELDS = 7
_REG, _LINK, _DANGLING = 0, 1, 2
_WRAP = 1 << 64


class BlobFiles(NamedTuple):
    """One digest's files in ``blobs/``."""

    names: tuple[str, ...]  # the names present (one or two), in scan order
    size: int               # bytes of its distinct files (a symlink: its target's)
    mtime: float            # newest of its files (a symlink: newest of link and target)
    atime: float            # newest
    freeable: int = -1      # see ``freed``; -1: its size
    links: int = 0          # how many of its names are symlinks (to a regular file)

    @property
    def freed(self) -> int:
        """Bytes its removal gives back to the file system: its regular files that have
        no other name (a symlink's target stays; a hardlink outside ``blobs/`` keeps the
        inode alive)."""
        return self.size if self.freeable < 0 else self.freeable


class BlobTable(NamedTuple):
    blobs: dict[Digest, BlobFiles]
    partials: list[str]            # Ollama's unfinished downloads
    dangling: dict[Digest, tuple[str, float]]  # symlinks at blob names that lead nowhere


def stat_blob_folder(folder: str) -> bytes:
    """Regular files and symlinks in ``folder`` with their stats, packed (the format is
    private to this module: a forked child sends it to the parent)."""
    names: list[str] = []
    nums = array.array("q")
    try:
        entries = os.scandir(folder)
    except FileNotFoundError:
        entries = None
    if entries is not None:
        with entries:
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                kind = _REG
                if stat.S_ISLNK(st.st_mode):
                    link_mtime = st.st_mtime_ns
                    try:
                        st = os.stat(e.path)
                        target_ok = stat.S_ISREG(st.st_mode)
                    except OSError:
                        target_ok = False
                    if not target_ok:
                        names.append(e.name)
                        nums.extend((0, link_mtime, 0, 0, 0, 0, _DANGLING))
                        continue
                    kind = _LINK
                    mtime = max(link_mtime, st.st_mtime_ns)
                elif stat.S_ISREG(st.st_mode):
                    mtime = st.st_mtime_ns
                else:
                    continue
                names.append(e.name)
                nums.extend((st.st_size, mtime, st.st_atime_ns,
                             _signed(st.st_dev), _signed(st.st_ino), st.st_nlink, kind))
    text = "\0".join(names).encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(names)) + nums.tobytes() + text


def _signed(n: int) -> int:
    return n - _WRAP if n >= _WRAP // 2 else n


def blob_table(packed: bytes) -> BlobTable:
    """Blobs by digest, the names of Ollama's unfinished downloads, and dangling
    symlinks at blob names (with the link's mtime)."""
    (n,) = struct.unpack_from("<Q", packed)
    nums = array.array("q")
    width = 8 * _FIELDS * n
    nums.frombytes(packed[8:8 + width])
    names = packed[8 + width:].decode("utf-8", "surrogateescape").split("\0") if n else []
    blobs: dict[Digest, BlobFiles] = {}
    partials: list[str] = []
    dangling: dict[Digest, tuple[str, float]] = {}
    # per digest and file (dev, ino): [size, nlink, how many of its names here are that
    # file itself (not a symlink to it)]; its bytes go back to the file system when
    # those are all its links
    files: dict[Digest, dict[tuple[int, int], list[int]]] = {}
    from_filename = Digest.from_filename
    for i, name in enumerate(names):
        try:
            d = from_filename(name)
        except InvalidDigest:
            if "-partial" in name:
                partials.append(name)
            continue
        size, mtime_ns, atime_ns, dev, ino, nlink, kind = nums[_FIELDS * i:_FIELDS * i + _FIELDS]
        if kind == _DANGLING:
            dangling[d] = (name, mtime_ns / 1e9)
            continue
        mine = files.setdefault(d, {})
        f = mine.get((dev, ino))
        if f is None:
            f = mine[(dev, ino)] = [size, nlink, 0]
        if kind == _REG:
            f[2] += 1
        prev = blobs.get(d)
        blobs[d] = BlobFiles(
            (*prev.names, name) if prev else (name,),
            sum(x[0] for x in mine.values()),
            max(prev.mtime if prev else 0.0, mtime_ns / 1e9),
            max(prev.atime if prev else 0.0, atime_ns / 1e9),
            links=(prev.links if prev else 0) + (kind == _LINK))
    for d, mine in files.items():
        blobs[d] = blobs[d]._replace(freeable=sum(x[0] for x in mine.values() if x[2] >= x[1]))
    for d in list(dangling):
        if d in blobs:  # the other name is the blob
            del dangling[d]
    return BlobTable(blobs, partials, dangling)


def scan_blobs(folder: str) -> BlobTable:
    """``blob_table(stat_blob_folder(folder))``."""
    return blob_table(stat_blob_folder(folder))


def unlink_names(paths: list[str]) -> tuple[bool, int]:
    """Unlink every one of ``paths`` that exists (a blob's names). Returns whether any
    was there, and the bytes given back to the file system: a regular file's size when
    its last link goes (a symlink frees nothing of its target's; an inode with another
    name elsewhere lives on)."""
    removed, freed = False, 0
    for path in paths:
        try:
            st = os.lstat(path)
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed = True
        if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1:
            freed += st.st_size
    return removed, freed
