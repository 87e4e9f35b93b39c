"""The hasher reads finished chunks back from the ingest file (spec/pull.md, "Hash
frontier"): what the page cache holds costs no disk read, and ``bytes_read_back`` counts
only what came from storage. Chunk sizes keep off page multiples ("Chunks")."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.errors import StoreUnwritable
from blobstore.ingest import ResumableIngest
from blobstore.layout import Layout
from registry_client.download.engine import PAGE, DownloadOptions, _storage_reads, chunk_size_for

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def _in_thread(fn: object) -> object:
    """Run ``fn`` in a fresh thread (``/proc/thread-self/io`` is per thread) and return
    what it returned."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()))  # type: ignore[operator]
    t.start()
    t.join(60)
    assert out, "the thread did not finish"
    return out[0]


def _evict(path: Path) -> None:
    """Write the file's pages to disk and drop them from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _ingest(tmp_path: Path, data: bytes) -> ResumableIngest:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    ing = ResumableIngest(Layout(tmp_path / "store"), digest, len(data), 1 * MiB)
    ing.write_at(memoryview(data), 0)
    return ing


def test_hash_range_reads_the_page_cache_and_counts_storage_reads(tmp_path: Path) -> None:
    data = os.urandom(8 * MiB + 12345)
    ing = _ingest(tmp_path, data)
    buf = memoryview(bytearray(MiB))
    try:
        def hash_and_count() -> tuple[str, int]:
            h = hashlib.sha256()
            before = _storage_reads()
            ing.hash_range(h, 0, len(data), buf)
            after = _storage_reads()
            assert before is not None and after is not None
            return h.hexdigest(), after - before

        # just written: all of it in the page cache
        hexdigest, read = _in_thread(hash_and_count)  # type: ignore[misc]
        assert hexdigest == hashlib.sha256(data).hexdigest()
        assert read == 0
        # evicted (as after a reboot, or under memory pressure): read from disk, and only
        # what was asked (no readahead past it)
        _evict(ing.data_path)
        hexdigest, read = _in_thread(hash_and_count)  # type: ignore[misc]
        assert hexdigest == hashlib.sha256(data).hexdigest()
        assert len(data) <= read <= len(data) + PAGE
        # a part of the file, after another eviction: that part only
        _evict(ing.data_path)

        def part() -> int:
            before = _storage_reads()
            ing.hash_range(hashlib.sha256(), 3 * MiB, 5 * MiB, buf)
            after = _storage_reads()
            assert before is not None and after is not None
            return after - before

        assert 2 * MiB <= _in_thread(part) <= 2 * MiB + 2 * PAGE  # type: ignore[operator]
    finally:
        ing.close()


def test_hash_range_of_a_file_shorter_than_recorded_is_an_error(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    ing = _ingest(tmp_path, data)
    try:
        os.truncate(ing.data_path, MiB)
        with pytest.raises(StoreUnwritable, match="shorter"):
            ing.hash_range(hashlib.sha256(), 0, len(data), memoryview(bytearray(MiB)))
    finally:
        ing.close()


@settings(max_examples=300, deadline=None)
@given(connections=st.integers(1, 64), adaptive=st.booleans(),
       window=st.integers(1, 2048).map(lambda m: m * MiB // 4),
       size=st.integers(0, 1 << 36), fixed=st.none() | st.integers(4096, 64 * MiB))
def test_chunk_size_keeps_off_page_multiples(connections: int, adaptive: bool, window: int,
                                             size: int, fixed: int | None) -> None:
    o = DownloadOptions(connections=connections, adaptive=adaptive, window_bytes=window)
    if fixed is not None:
        o = DownloadOptions(connections=connections, window_bytes=window, min_chunk=fixed,
                            max_chunk=fixed)
    c = chunk_size_for(o, size)
    assert o.min_chunk <= c <= o.max_chunk
    if fixed is not None:
        assert c == fixed  # the user's size, whatever it is
    elif c < size:  # more than one chunk: never a page multiple
        assert c % PAGE != 0


def test_default_chunks_are_as_large_as_allowed() -> None:
    # the default window (192 MiB) over 16 connections: the largest chunk, less one byte
    # (few, large requests cost the server least; spec/pull.md, "Chunks")
    assert chunk_size_for(DownloadOptions(), 1 << 30) == 8 * MiB - 1
    assert chunk_size_for(DownloadOptions(), 3 * MiB) == 3 * MiB  # one chunk: one GET
