"""The page cache, seen from tests: evict a file's pages, and measure what a piece of
code read from storage (not from the cache) in a thread of its own."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from registry_client.download.engine import _StorageReads

MiB = 1 << 20
T = TypeVar("T")


def in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a fresh thread (``/proc/thread-self/io`` is per thread); its exception
    is raised here."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            err.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    if err:
        raise err[0]
    assert out, "the thread did not finish"
    return out[0]


def evict(path: Path) -> None:
    """Write the file's pages to disk and drop them from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measured(fn: Callable[[], object]) -> int:
    """Bytes read from storage while ``fn()`` ran in a fresh thread."""
    def run() -> int:
        reads = _StorageReads()
        try:
            before = reads()
            fn()
            after = reads()
        finally:
            reads.close()
        assert before is not None and after is not None, "no /proc/thread-self/io"
        return after - before
    return in_thread(run)


def page_cache_evictable(folder: Path) -> bool:
    """Whether a file here, once evicted, is read from storage again (not on tmpfs, say,
    whose pages are the file)."""
    probe = folder / "evict-probe"
    probe.write_bytes(os.urandom(MiB))
    evict(probe)
    try:
        return measured(probe.read_bytes) >= MiB // 2
    finally:
        probe.unlink()
