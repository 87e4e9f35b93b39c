"""blobctl's own state: last use, use count, pins and settings (spec/store-layout.md).

Kept in ``.blobctl/state.db``, a stdlib sqlite database in WAL mode with a busy
timeout, so any number of blobctl processes can read and write it at once. State is
advisory: losing it loses LRU order and pins, never data. Rows are keyed by the
case-folded full model name (``ModelName.key``).

Thread-safe: each thread that uses a ``State`` gets its own sqlite connection (sqlite
connections belong to the thread that made them), closed when that thread ends or by
``close()``, whichever comes first. Every use of a connection holds its lock, and
``close()`` takes it too: a connection is never closed under a running statement (that
crashed the host process: sqlite's ``close`` frees what the statement is using). A use
after ``close()`` opens a new connection. Read errors raise :class:`StateUnreadable`
rather than answering "no pins": GC must never take an unreadable pin for an absent one.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from blobstore.errors import InsufficientSpace, StateUnreadable, StoreError, StoreUnwritable
from blobstore.index import ManifestIndex
from blobstore.layout import CREATE_MODE
from blobstore.name import ModelName
from blobstore.owner import hand_over, make_dirs

__all__ = ["ModelState", "State", "holds_nothing", "out_of_space", "unmakeable"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    key        TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    last_used  REAL,
    use_count  INTEGER NOT NULL DEFAULT 0,
    pinned     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS config (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


_BUSY_S = 10.0  # sqlite's busy timeout: how long a locked database is waited for
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_FULL = 5, 6, 10, 13  # primary codes
# below this much free space a refused write is the disk being full: sqlite needs its
# 32 KiB shared memory and a few WAL pages (an open on a full disk fails with "disk I/O
# error", making the shared memory; a write with a few pages free, "disk is full")
_FULL_BELOW = 1 << 20


def _free(folder: Path) -> int | None:
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _busy(exc: sqlite3.Error) -> bool:
    """Whether sqlite said the database is busy or locked (worth trying again)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def out_of_space(folder: Path) -> InsufficientSpace | None:
    """InsufficientSpace where ``folder``'s disk is full (what a refused write of state
    is then: exit 8, not "check permissions"), else None."""
    free = _free(folder)
    if free is not None and free < _FULL_BELOW:
        return InsufficientSpace(str(folder), None, free)
    return None


def holds_nothing(path: Path) -> bool:
    """Whether the state database at ``path`` holds no state: there is none, or it is an
    empty file with no WAL content (an open that failed, on a full disk say, leaves a
    0-byte file; so does blobctl's own creation of the file before sqlite writes it).
    sqlite takes an empty file for an empty database: no pins, no settings."""
    try:
        if os.stat(path).st_size:
            return False
    except FileNotFoundError:
        return True
    except OSError:
        return False  # there, but unknown: never taken for "no pins"
    try:
        return os.stat(f"{path}-wal").st_size == 0
    except FileNotFoundError:
        return True
    except OSError:
        return False


def unmakeable(path: Path) -> bool:
    """Whether no state database is at ``path`` and none can be made there now (a
    read-only folder or medium): a store then has no state for good."""
    if path.exists():
        return False
    folder = path.parent if path.parent.is_dir() else path.parent.parent
    return not os.access(folder, os.W_OK | os.X_OK) or _read_only_fs(folder)


@dataclass(frozen=True)
class ModelState:
    last_used: float | None
    use_count: int
    pinned: bool


_EMPTY = ModelState(None, 0, False)


def _close(db: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        db.close()


class _Handle:
    """One sqlite connection and the lock that every use of it holds. Closing takes
    the lock, so it waits for a statement running on the connection (its thread may be
    another: ``State.close()``, a stale database closed by the store)."""

    __slots__ = ("closed", "db", "lock")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.lock = threading.RLock()
        self.closed = False

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                _close(self.db)


class _Conn:
    """A thread's connection, held only by that thread's local storage: when the
    thread ends, this goes and a finalizer closes the connection."""

    __slots__ = ("__weakref__", "handle")

    def __init__(self, handle: _Handle) -> None:
        self.handle = handle


class State:
    """A connection to a store's state database."""

    def __init__(self, path: Path, *, readonly: bool = False, immutable: bool = False,
                 busy_wait: float = _BUSY_S) -> None:
        self.path = path
        # how long opening for writing waits out a busy or locked database: the busy
        # timeout; a caller trying again after a failure may ask for less
        self._busy_wait = busy_wait
        self.readonly = readonly or immutable
        # ``immutable``: read without locks or the WAL's shared memory (a store on a full
        # disk or read-only medium, where even those cannot be made); only for a database
        # whose WAL is empty, since its contents would be missed (Store.state checks)
        self.immutable = immutable
        # why a read-only State is read-only (the refusal of the open for writing; the
        # store sets it): what a write is then refused with
        self.refusal: StoreUnwritable | None = None
        self._local = threading.local()
        self._open: list[weakref.finalize[[], _Conn]] = []
        self._guard = threading.Lock()
        self._connect(first=True)

    def _connect(self, *, first: bool = False) -> _Conn:
        if self.readonly:
            flags = "mode=ro&immutable=1" if self.immutable else "mode=ro"
            try:
                db = sqlite3.connect(f"file:{self.path}?{flags}", uri=True, timeout=_BUSY_S,
                                     isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise StoreUnwritable(str(self.path), f"state database: {exc}") from exc
        else:
            if first:
                try:
                    make_dirs(self.path.parent)
                except OSError as exc:
                    raise StoreUnwritable(str(self.path), f"state database: {exc}") from exc
            db = self._open_writable(schema=first, wait=self._busy_wait if first else _BUSY_S)
        handle = _Handle(db)
        holder = _Conn(handle)
        with self._guard:
            self._open = [f for f in self._open if f.alive]
            self._open.append(weakref.finalize(holder, handle.close))
        self._local.conn = holder
        return holder

    def _open_writable(self, *, schema: bool, wait: float) -> sqlite3.Connection:
        """A read-write connection in WAL mode (and the schema made, for the first).

        Processes that open a new database at the same moment contend for it: switching
        to WAL takes an exclusive lock and sqlite answers SQLITE_BUSY at once, without
        its busy handler. That is retried, with jitter, for up to ``wait`` seconds in
        all; a store must not turn read-only because another blobctl opened it first."""
        # sqlite opens a file it cannot write read-only without a word, and a database
        # with its WAL and shared memory left by a crash opens even on a read-only
        # medium: every write would fail later. Say so now, so the store reads it
        # read-only and says so up front (as on a full disk).
        if self.path.exists():
            # the WAL and its shared memory too (a `sudo blobctl` leaves them root's),
            # and where they are not there, the folder they will be made in
            parts = [self.path, *(Path(f"{self.path}{x}") for x in ("-wal", "-shm"))]
            if len(parts) != sum(q.exists() for q in parts):
                parts.append(self.path.parent)
            for part in parts:
                if part.exists() and not os.access(part, os.W_OK):
                    why = ("read-only file system" if _read_only_fs(self.path.parent)
                           else "permission denied")
                    raise StoreUnwritable(str(part), f"state database: {why}")
        # made here, not by sqlite (which makes it 0644 whatever the umask), so that it
        # follows the umask like every file blobctl makes: in a group-shared store the
        # group can then write state (sqlite gives -wal and -shm the database's mode)
        with contextlib.suppress(OSError):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | getattr(os, "O_CLOEXEC", 0), CREATE_MODE))
        deadline = time.monotonic() + wait
        while True:
            db: sqlite3.Connection | None = None
            try:
                # each statement waits (sqlite's busy handler) only for what is left
                db = sqlite3.connect(self.path, timeout=max(0.0, deadline - time.monotonic()),
                                     isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                if schema:
                    db.executescript(_SCHEMA)
                # opened: every later statement waits the whole busy timeout again
                db.execute(f"PRAGMA busy_timeout = {int(_BUSY_S * 1000)}")
                for part in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                    hand_over(part)  # (run as root on another user's store: theirs)
                return db
            except sqlite3.Error as exc:
                if db is not None:
                    _close(db)
                if not _busy(exc) or time.monotonic() >= deadline:
                    raise StoreUnwritable(str(self.path), f"state database: {exc}") from exc
            time.sleep(random.uniform(0.002, 0.02))

    @contextlib.contextmanager
    def _use(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (opened on first use in the thread, and again after
        ``close()``), its lock held for the block: ``close()`` waits for the block."""
        while True:
            holder: _Conn | None = getattr(self._local, "conn", None)
            if holder is None or holder.handle.closed:
                holder = self._connect()
            handle = holder.handle
            with handle.lock:
                if handle.closed:  # closed between the check and the lock: open anew
                    continue
                yield handle.db
                return

    def close(self) -> None:
        """Close every thread's connection, each once no statement runs on it (safe to
        call twice, and from any thread while others use the State). A later use opens
        a new connection."""
        with self._guard:
            open_, self._open = self._open, []
        for fin in open_:
            fin()

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        try:
            with self._use() as db:
                return db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StateUnreadable(str(self.path), str(exc)) from exc

    def manifest_index(self) -> ManifestIndex:
        return ManifestIndex(self._use, writable=not self.readonly)

    def _read_only_error(self) -> StoreError:
        """What a write to a read-only State is refused with: a full disk is
        InsufficientSpace (exit 8, not "check permissions"), else why it could not be
        opened for writing."""
        full = out_of_space(self.path.parent)
        if full is not None:
            return full
        if self.refusal is not None:
            return StoreUnwritable(self.refusal.path, self.refusal.reason)
        return StoreUnwritable(str(self.path), "state database is opened read-only")

    def _write_error(self, exc: sqlite3.Error) -> StoreError:
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary in (_SQLITE_FULL, _SQLITE_IOERR):
            free = _free(self.path.parent)
            if primary == _SQLITE_FULL or (free is not None and free < _FULL_BELOW):
                return InsufficientSpace(str(self.path.parent), None, free or 0)
        return StoreUnwritable(str(self.path), f"state database: {exc}")

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        if self.readonly:
            raise self._read_only_error()
        try:
            with self._use() as db:
                db.execute(sql, args)
        except sqlite3.Error as exc:
            raise self._write_error(exc) from exc

    def get(self, name: ModelName) -> ModelState:
        """One model's state; raises StateUnreadable if the database cannot be read."""
        rows = self._read(
            "SELECT last_used, use_count, pinned FROM models WHERE key = ?", (name.key,))
        if not rows:
            return _EMPTY
        lu, uc, p = rows[0]
        return ModelState(lu, uc, bool(p))  # type: ignore[arg-type]

    def probe(self) -> None:
        """Read the tables (raises StateUnreadable where the database cannot be read, or
        has no tables yet)."""
        self._read("SELECT 1 FROM models LIMIT 0")
        self._read("SELECT 1 FROM config LIMIT 0")

    def all(self) -> dict[str, ModelState]:
        """Every model's state, keyed by ``ModelName.key``; raises StateUnreadable."""
        rows = self._read("SELECT key, last_used, use_count, pinned FROM models")
        return {str(k): ModelState(lu, uc, bool(p))  # type: ignore[arg-type]
                for k, lu, uc, p in rows}

    def record_use(self, name: ModelName, when: float | None = None) -> None:
        self._write(
            "INSERT INTO models (key, name, last_used, use_count) VALUES (?, ?, ?, 1) "
            "ON CONFLICT(key) DO UPDATE SET last_used = excluded.last_used, "
            "use_count = use_count + 1, name = excluded.name",
            (name.key, str(name), time.time() if when is None else when),
        )

    def set_pinned(self, name: ModelName, pinned: bool) -> None:
        self._write(
            "INSERT INTO models (key, name, pinned) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET pinned = excluded.pinned",
            (name.key, str(name), int(pinned)),
        )

    def forget(self, name: ModelName) -> None:
        self._write("DELETE FROM models WHERE key = ?", (name.key,))

    def forget_many(self, names: list[ModelName]) -> None:
        """Drop the state of many models in one transaction."""
        if self.readonly:
            raise self._read_only_error()
        with self._use() as db:  # (one hold: the transaction is never cut by a close)
            try:
                db.execute("BEGIN")
                db.executemany("DELETE FROM models WHERE key = ?", [(n.key,) for n in names])
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise self._write_error(exc) from exc

    def get_config(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM config WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_config(self, key: str, value: str | None) -> None:
        if value is None:
            self._write("DELETE FROM config WHERE key = ?", (key,))
        else:
            self._write(
                "INSERT INTO config (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def all_config(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self._read("SELECT key, value FROM config")}
