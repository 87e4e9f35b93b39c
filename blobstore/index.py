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
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blobstore.digest import Digest
from blobstore.errors import InvalidManifest, InvalidName, StoreError
from blobstore.layout import read_small, unreadable
from blobstore.manifest import Manifest, decode_stored, scan_digests
from blobstore.name import ModelName

if TYPE_CHECKING:
    from blobstore.layout import Layout

__all__ = ["RACY_SECONDS", "FileKey", "ManifestFile", "ManifestIndex", "Summary",
           "dangling", "link_target", "mentioned", "walk_manifests"]

log = logging.getLogger("blobctl.store")

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
            self._refs = frozenset(Digest.unchecked(r) for r in self._refs_text.split())
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


def _key_of(path: str) -> str | bytes:
    """A path as the index keeps it: text, or its bytes (a BLOB) when it is not UTF-8
    (a store under a folder named in another encoding: ``os.fsdecode`` gave it lone
    surrogates, which sqlite cannot take as text)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path)
    return path


def _path_of(key: str | bytes) -> str:
    return os.fsdecode(key) if isinstance(key, bytes) else key


class ManifestIndex:
    """Read and update manifest summaries in the state database.

    ``use()`` lends the connection for one block (``State._use``: the connection's lock
    held, so that a ``close()`` from another thread waits for the block)."""

    def __init__(self, use: Callable[[], AbstractContextManager[sqlite3.Connection]], *,
                 writable: bool) -> None:
        self._use = use
        self._writable = writable
        self._pending: list[tuple[object, ...]] = []
        if writable:
            try:
                with use() as db:
                    db.executescript(_SCHEMA)
            except (sqlite3.Error, StoreError):
                self._writable = False

    def load(self) -> dict[str, tuple[FileKey, int, Summary]]:
        """path -> (file key, taken_ns, summary) for every stored summary."""
        try:
            with self._use() as db:
                rows = db.execute(
                    "SELECT path, ino, size, mtime_ns, ctime_ns, taken_ns, digest, total, "
                    "refs, model FROM manifest_index").fetchall()
        except (sqlite3.Error, StoreError):
            return {}
        out: dict[str, tuple[FileKey, int, Summary]] = {}
        for path, ino, size, mtime, ctime, taken, digest, total, refs, model in rows:
            summary = Summary(Digest.unchecked(digest), total, refs,
                              Digest.unchecked(model) if model else None)
            out[_path_of(path)] = (FileKey(ino, size, mtime, ctime), taken, summary)
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
                _key_of(path), key.ino, key.size, key.mtime_ns, key.ctime_ns, time.time_ns(),
                str(summary.digest), summary.size, " ".join(sorted(summary.refs)),
                str(summary.model) if summary.model else ""))

    def flush(self, present: set[str] | None = None) -> None:
        """Write remembered summaries (and drop rows for files no longer present)."""
        if not self._writable or (not self._pending and present is None):
            return
        try:
            with self._use() as db:  # (one hold: the transaction is never cut by a close)
                try:
                    db.execute("BEGIN")
                    db.executemany(
                        "INSERT OR REPLACE INTO manifest_index VALUES (?,?,?,?,?,?,?,?,?,?)",
                        self._pending)
                    if present is not None:
                        stale = [(p,) for (p,) in db.execute("SELECT path FROM manifest_index")
                                 if _path_of(p) not in present]
                        db.executemany("DELETE FROM manifest_index WHERE path = ?", stale)
                    db.execute("COMMIT")
                except sqlite3.Error:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
        except StoreError:
            pass  # (closed meanwhile and not opened again: only speed is lost)
        self._pending.clear()


class ManifestFile:
    """One ``manifests/*/*/*/*`` file as ``walk_manifests`` found it.

    ``name`` is None for a path that is not a valid model name, and for a file
    ``reused`` from an earlier walk (its name is not parsed again); ``summary`` is None
    for a file that does not decode (then ``error`` says why) and for a reused one;
    ``refs`` is what the file references (for a file that does not decode: every digest
    it mentions, which GC and ``rm`` keep); ``manifest`` is set when the file had to be
    read and decoded.
    """

    __slots__ = ("_refs", "error", "manifest", "name", "path", "reused", "st", "summary")

    def __init__(self, path: str, name: ModelName | None, st: os.stat_result,
                 summary: Summary | None, refs: frozenset[Digest] | None = None,
                 manifest: Manifest | None = None, error: str | None = None,
                 reused: bool = False) -> None:
        self.path = path
        self.name = name
        self.st = st
        self.summary = summary
        self._refs = refs
        self.manifest = manifest
        self.error = error
        self.reused = reused

    @property
    def refs(self) -> frozenset[Digest]:
        if self._refs is None:
            self._refs = self.summary.refs if self.summary is not None else frozenset()
        return self._refs


def walk_manifests(
    layout: Layout,
    index: ManifestIndex | None = None,
    *,
    known: dict[str, tuple[int, int, frozenset[Digest]]] | None = None,
    read_unnamed: bool = True,
    on_problem: Callable[[str, str], None] | None = None,
) -> Iterator[ManifestFile]:
    """Every manifest file of the store, as Ollama globs them (the one manifest walker:
    ``list``, ``rm``, GC's snapshot and GC's re-checks all use it).

    * ``index``: a summary is taken from it while the file is provably unchanged, and
      files that had to be read are remembered in it (the caller flushes it).
    * ``known``: path -> (mtime_ns, size, refs) from an earlier walk; a file with the
      same mtime and size is not read again (``reused``).
    * ``read_unnamed``: read files whose path is not a valid name (GC keeps whatever
      they mention); else they are yielded unread, with no refs.

    * ``on_problem(path, reason)``: told of each folder or file that exists but cannot
      be read; without it, the first is raised as ``ManifestsUnreadable`` (GC and
      ``rm`` must not take a manifest they cannot read for one that is not there).

    Files that vanish meanwhile are skipped.
    """

    loaded = index.load() if index is not None else {}
    for parts, path in layout.iter_manifest_files(on_problem):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if layout.is_v2(path) and os.path.islink(path):  # its manifest blob is gone
                with contextlib.suppress(OSError, InvalidName):
                    yield ManifestFile(path, ModelName.from_parts(parts), os.lstat(path),
                                       None, frozenset(), error=dangling(path))
            continue
        except OSError as exc:
            unreadable(on_problem, path, exc)
            continue
        if known is not None:
            prev = known.get(path)
            if prev is not None and prev[0] == st.st_mtime_ns and prev[1] == st.st_size:
                # (a re-check under the lock: only the refs are wanted, not the name)
                yield ManifestFile(path, None, st, None, prev[2], reused=True)
                continue
        try:
            name: ModelName | None = ModelName.from_parts(parts)
        except InvalidName as exc:
            log.debug("%s: %s", path, exc.message)
            name = None
        if name is not None and loaded:
            summary = ManifestIndex.trusted(loaded.get(path), FileKey.of(st))
            if summary is not None:
                yield ManifestFile(path, name, st, summary,
                                   summary.refs | {summary.digest} if layout.is_v2(path)
                                   else None)
                continue
        elif name is None and not read_unnamed:
            yield ManifestFile(path, None, st, None, frozenset(), error="not a valid name")
            continue
        try:
            raw, st = read_small(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            unreadable(on_problem, path, exc)
            continue
        own = {Digest.of_bytes(raw)} if layout.is_v2(path) else set()
        try:
            if name is None:
                raise InvalidManifest("not a valid model name")
            manifest = decode_stored(raw, source=path, read_blob=layout.read_small_blob)
        except InvalidManifest as exc:
            # a manifest we cannot read or name: whatever digests it mentions stay
            # referenced (spec/gc.md, "Never deleted"), and what the manifests among
            # those mention (Ollama's manifest lists name their manifests by digest)
            yield ManifestFile(path, name, st, None,
                               frozenset(mentioned(layout, raw) | own), error=exc.reason)
            continue
        summary = Summary.of(manifest)
        if manifest.raw is not raw:  # the runner's manifest of an Ollama manifest list:
            # the model's ID is the file's, and it needs the list's manifests too
            summary = Summary(Digest.of_bytes(raw), summary.size,
                              summary.refs | mentioned(layout, raw), summary.model)
        if index is not None and manifest.raw is raw:  # (a list's children may change)
            index.remember(path, FileKey.of(st), summary)
        yield ManifestFile(path, name, st, summary, summary.refs | own if own else None,
                           manifest=manifest)


def dangling(path: str) -> str:
    """Why a ``manifests-v2/`` link that leads nowhere is no manifest."""
    return f"its manifest blob {link_target(path)} is missing"


def link_target(path: str) -> str:
    """The blob name a ``manifests-v2/`` symlink names (``sha256-<hex>``)."""
    return os.path.basename(os.readlink(path))


def mentioned(layout: Layout, raw: bytes, depth: int = 3) -> set[Digest]:
    """Every digest ``raw`` mentions, and, through the small blobs among them (a manifest
    is at most ``MAX_MANIFEST_SIZE``), what those mention, ``depth`` levels down: what a
    manifest blobctl cannot decode may need (Ollama's manifest lists name each runner's
    manifest by the digest of its blob, whose layers the list needs too)."""
    found = scan_digests(raw)
    todo = list(found)
    for _ in range(depth):
        nxt: list[Digest] = []
        for d in todo:
            data = layout.read_small_blob(d)
            if data is None:
                continue
            more = scan_digests(data) - found
            found |= more
            nxt.extend(more)
        todo = nxt
    return found
