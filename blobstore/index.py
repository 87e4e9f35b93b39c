"""A summary of each manifest file, so that listing a large store need not read them all.

Kept in the state database (``manifest_index`` table). A summary (model ID, total size,
referenced digests, model layer) is trusted only while the file's inode, size, mtime and
ctime are unchanged, as git trusts its index; and, as git does for "racily clean" entries,
never for a file whose last change came less than ``RACY_SECONDS`` before the summary was
taken (a rewrite within the same clock tick would otherwise go unnoticed). ctime cannot be
set back by ``utime``, so any rewrite by any program invalidates the summary. Losing or
distrusting the index only costs speed: the file is read again.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass

from blobstore.digest import Digest
from blobstore.manifest import Manifest

__all__ = ["RACY_SECONDS", "FileKey", "ManifestIndex", "Summary"]

RACY_SECONDS = 2.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifest_index (
    path      TEXT PRIMARY KEY,
    ino       INTEGER NOT NULL,
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    ctime_ns  INTEGER NOT NULL,
    taken_ns  INTEGER NOT NULL,
    digest    TEXT NOT NULL,
    total     INTEGER NOT NULL,
    refs      TEXT NOT NULL,
    model     TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class FileKey:
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileKey:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Summary:
    """Model ID, total size, referenced digests and model layer of one manifest."""

    __slots__ = ("_refs", "_refs_text", "digest", "model", "size")

    def __init__(self, digest: Digest, size: int, refs: frozenset[Digest] | str,
                 model: Digest | None) -> None:
        self.digest = digest
        self.size = size
        self.model = model
        # parsed on first use: listing a big store never needs them
        self._refs = refs if isinstance(refs, frozenset) else None
        self._refs_text = refs if isinstance(refs, str) else ""

    @property
    def refs(self) -> frozenset[Digest]:
        if self._refs is None:
            self._refs = frozenset(Digest.validated(r) for r in self._refs_text.split())
        return self._refs

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Summary):
            return NotImplemented
        return (self.digest, self.size, self.model, self.refs) == (
            other.digest, other.size, other.model, other.refs)

    def __hash__(self) -> int:
        return hash((self.digest, self.size))

    @classmethod
    def of(cls, manifest: Manifest) -> Summary:
        return cls(manifest.digest, manifest.size, frozenset(manifest.blob_digests),
                   manifest.model_digest())


class ManifestIndex:
    """Read and update manifest summaries in an open sqlite connection."""

    def __init__(self, db: sqlite3.Connection, *, writable: bool) -> None:
        self._db = db
        self._writable = writable
        self._pending: list[tuple[object, ...]] = []
        if writable:
            try:
                db.executescript(_SCHEMA)
            except sqlite3.Error:
                self._writable = False

    def load(self) -> dict[str, tuple[FileKey, int, Summary]]:
        """path -> (file key, taken_ns, summary) for every stored summary."""
        try:
            rows = self._db.execute(
                "SELECT path, ino, size, mtime_ns, ctime_ns, taken_ns, digest, total, refs, "
                "model FROM manifest_index").fetchall()
        except sqlite3.Error:
            return {}
        out: dict[str, tuple[FileKey, int, Summary]] = {}
        for path, ino, size, mtime, ctime, taken, digest, total, refs, model in rows:
            summary = Summary(Digest.validated(digest), total, refs,
                              Digest.validated(model) if model else None)
            out[path] = (FileKey(ino, size, mtime, ctime), taken, summary)
        return out

    @staticmethod
    def trusted(known: tuple[FileKey, int, Summary] | None, key: FileKey) -> Summary | None:
        """The stored summary if the file is unchanged and was not racy when stored."""
        if known is None or known[0] != key:
            return None
        if known[1] - key.ctime_ns < RACY_SECONDS * 1e9:
            return None  # changed too shortly before the summary was taken: re-read
        return known[2]

    def remember(self, path: str, key: FileKey, summary: Summary) -> None:
        if self._writable:
            self._pending.append((
                path, key.ino, key.size, key.mtime_ns, key.ctime_ns, time.time_ns(),
                str(summary.digest), summary.size, " ".join(sorted(summary.refs)),
                str(summary.model) if summary.model else ""))

    def flush(self, present: set[str] | None = None) -> None:
        """Write remembered summaries (and drop rows for files no longer present)."""
        if not self._writable or (not self._pending and present is None):
            return
        try:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO manifest_index VALUES (?,?,?,?,?,?,?,?,?,?)",
                self._pending)
            if present is not None:
                stale = [(p,) for (p,) in self._db.execute("SELECT path FROM manifest_index")
                         if p not in present]
                self._db.executemany("DELETE FROM manifest_index WHERE path = ?", stale)
            self._db.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
        self._pending.clear()
