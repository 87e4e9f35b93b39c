"""blobctl's own state: last use, use count, pins and settings (spec/store-layout.md).

Kept in ``.blobctl/state.db``, a stdlib sqlite database in WAL mode with a busy
timeout, so any number of blobctl processes can read and write it at once. State is
advisory: losing it loses LRU order and pins, never data. Rows are keyed by the
case-folded full model name (``ModelName.key``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from blobstore.errors import StoreUnwritable
from blobstore.index import ManifestIndex
from blobstore.name import ModelName

__all__ = ["ModelState", "State"]

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


@dataclass(frozen=True)
class ModelState:
    last_used: float | None
    use_count: int
    pinned: bool


_EMPTY = ModelState(None, 0, False)


class State:
    """A connection to a store's state database."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        try:
            if readonly:
                self._db = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, timeout=10.0, isolation_level=None
                )
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnwritable(str(path), f"state database: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def manifest_index(self) -> ManifestIndex:
        return ManifestIndex(self._db, writable=not self.readonly)

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        if self.readonly:
            raise StoreUnwritable(str(self.path), "store is opened read-only")
        try:
            self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreUnwritable(str(self.path), f"state database: {exc}") from exc

    def get(self, name: ModelName) -> ModelState:
        row = self._db.execute(
            "SELECT last_used, use_count, pinned FROM models WHERE key = ?", (name.key,)
        ).fetchone()
        return ModelState(row[0], row[1], bool(row[2])) if row else _EMPTY

    def all(self) -> dict[str, ModelState]:
        """Every model's state, keyed by ``ModelName.key``."""
        try:
            rows = self._db.execute(
                "SELECT key, last_used, use_count, pinned FROM models"
            ).fetchall()
        except sqlite3.Error:
            return {}
        return {k: ModelState(lu, uc, bool(p)) for k, lu, uc, p in rows}

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
            raise StoreUnwritable(str(self.path), "store is opened read-only")
        try:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM models WHERE key = ?", [(n.key,) for n in names])
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise StoreUnwritable(str(self.path), f"state database: {exc}") from exc

    def get_config(self, key: str) -> str | None:
        try:
            row = self._db.execute("SELECT value FROM config WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error:
            return None
        return str(row[0]) if row else None

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
        try:
            return dict(self._db.execute("SELECT key, value FROM config").fetchall())
        except sqlite3.Error:
            return {}
