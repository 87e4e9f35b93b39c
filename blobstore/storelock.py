"""The store lock: reentrant within a process, exclusive between processes.

``.blobctl/locks/store.lock`` (filelock) serializes manifest commits, ``rm`` and GC's
apply step between processes (spec/gc.md, "Concurrency and crash safety"). In front of
it sits one process-local ``RLock`` per lock file, shared by every ``Store`` object of
the process that opens the same store, by whatever path (keyed by the real path):

* a thread that holds the lock may take it again (``put_manifest`` or ``remove_model``
  inside ``with store.lock():`` works);
* other threads of the process wait on the ``RLock`` (with the same timeout), never on
  the file lock, which is taken once, by the outermost holder, and released when the
  outermost holder leaves.

Correctness never depends on the file lock working (network filesystems): it avoids
wasted work; renames keep data safe (STYLE.md, "Data safety").
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from blobstore.errors import StoreBusy, StoreUnwritable
from blobstore.layout import file_mode
from blobstore.owner import hand_over, make_dirs

__all__ = ["StoreLock", "store_lock"]


class StoreLock:
    """One lock file's process-local state (use ``store_lock(path)`` to get it)."""

    def __init__(self, path: Path) -> None:
        import filelock

        self.path = path
        self._mutex = threading.RLock()
        self._depth = 0
        # mode: 0666 less the umask, given explicitly (older filelock made 0644 whatever
        # the umask: a group member could not take the lock)
        self._file = filelock.FileLock(str(path), thread_local=False, mode=file_mode())

    @contextlib.contextmanager
    def hold(self, timeout: float, what: str = "the store") -> Iterator[None]:
        """Hold the lock; raise StoreBusy after ``timeout`` seconds of waiting."""
        import filelock

        deadline = time.monotonic() + timeout
        if not self._mutex.acquire(timeout=max(0.0, timeout)):
            raise StoreBusy(what, timeout)
        try:
            if self._depth == 0:
                try:
                    make_dirs(self.path.parent)
                    self._file.acquire(timeout=max(0.0, deadline - time.monotonic()))
                    hand_over(self.path)
                except filelock.Timeout as exc:
                    raise StoreBusy(what, timeout) from exc
                except OSError as exc:
                    raise StoreUnwritable(str(self.path), exc.strerror or str(exc)) from exc
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._file.release(force=True)
        finally:
            self._mutex.release()

    @property
    def held_here(self) -> bool:
        """True if some thread of this process holds the lock."""
        return self._depth > 0


class _Registry:
    """The process's ``StoreLock`` per lock file."""

    def __init__(self) -> None:
        self.locks: dict[str, StoreLock] = {}
        self.guard = threading.Lock()

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's lock state is not the child's. A thread of
        the parent may have held the RLock (never released here: that thread does not
        exist in the child), and filelock refuses an instance inherited across a fork;
        so a new ``Store`` of the child gets a fresh ``StoreLock`` (spec/api.md,
        "Forking"). Found from outside: every locking call of the child failed, with
        RuntimeError or, after 30 s, StoreBusy."""
        self.__init__()  # type: ignore[misc]


_REGISTRY = _Registry()
os.register_at_fork(after_in_child=_REGISTRY.forget_after_fork)


def store_lock(path: Path) -> StoreLock:
    """The process-wide ``StoreLock`` for a lock file: one per file, however the store's
    path is spelled (a symlink to the store, ``sub/../s``, a trailing slash: the real
    path is the key). Found from outside: keyed by the spelling, a second ``Store`` on a
    symlink to the store got a lock of its own, and ``set_pinned`` through it inside
    ``with store.lock():`` waited on the file lock this very thread held (StoreBusy
    after 30 s)."""
    key = os.path.realpath(path)
    with _REGISTRY.guard:
        lock = _REGISTRY.locks.get(key)
        if lock is None:
            lock = _REGISTRY.locks[key] = StoreLock(Path(key))
        return lock
