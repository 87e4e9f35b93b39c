"""The hasher reads finished chunks back from the ingest file (spec/pull.md, "Hash
frontier"): what the page cache holds costs no disk read, and ``bytes_read_back`` counts
only what came from storage. Chunk sizes keep off page multiples ("Chunks")."""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.errors import StoreUnwritable
from blobstore.ingest import ResumableIngest
from blobstore.layout import Layout
from registry_client.download.engine import PAGE, DownloadOptions, chunk_size_for
from tests.registry_client.pagecache import evict, in_thread, measured, page_cache_evictable

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
def _ingest(tmp_path: Path, data: bytes) -> ResumableIngest:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    ing = ResumableIngest(Layout(tmp_path / "store"), digest, len(data), 1 * MiB)
    ing.write_at(memoryview(data), 0)
    return ing


def test_hash_range_reads_the_page_cache_and_counts_storage_reads(tmp_path: Path) -> None:
    if not page_cache_evictable(tmp_path):
        pytest.skip(f"{tmp_path}: the page cache cannot be evicted here (tmpfs?)")
    data = os.urandom(8 * MiB + 12345)
    ing = _ingest(tmp_path, data)
    buf = memoryview(bytearray(MiB))
    page = mmap.PAGESIZE
    try:
        def whole() -> str:
            h = hashlib.sha256()
            ing.hash_range(h, 0, len(data), buf)
            return h.hexdigest()

        # just written: all of it in the page cache
        assert in_thread(whole) == hashlib.sha256(data).hexdigest()
        assert measured(whole) == 0
        # evicted (as after a reboot, or under memory pressure): read from disk, and only
        # what was asked (no readahead past it)
        evict(ing.data_path)
        assert len(data) <= measured(whole) <= len(data) + page
        assert in_thread(whole) == hashlib.sha256(data).hexdigest()
        # a part of the file, after another eviction: that part only
        evict(ing.data_path)
        part = measured(lambda: ing.hash_range(hashlib.sha256(), 3 * MiB, 5 * MiB, buf))
        assert 2 * MiB <= part <= 2 * MiB + 2 * page
    finally:
        ing.close()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hash_range_of_any_part_reads_only_what_is_not_cached(
        tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """Hypothesis picks the part, the read buffer's size and whether the file was evicted
    first: the digest is the part's, and storage gives exactly the part's pages when
    evicted, nothing otherwise."""
    folder = tmp_path_factory.mktemp("hr")
    if not page_cache_evictable(folder):
        pytest.skip(f"{folder}: the page cache cannot be evicted here (tmpfs?)")
    blob = os.urandom(3 * MiB + data.draw(st.integers(0, 2 * PAGE), label="extra"))
    start = data.draw(st.integers(0, len(blob) - 1), label="start")
    end = data.draw(st.integers(start + 1, len(blob)), label="end")
    size = data.draw(st.sampled_from([PAGE - 1, 64 * 1024, MiB, 3 * MiB]), label="buffer")
    evicted = data.draw(st.booleans(), label="evicted")
    ing = _ingest(folder, blob)
    try:
        if evicted:
            evict(ing.data_path)
        h = hashlib.sha256()
        read = measured(lambda: ing.hash_range(h, start, end, memoryview(bytearray(size))))
        assert h.hexdigest() == hashlib.sha256(blob[start:end]).hexdigest()
        page = mmap.PAGESIZE
        pages = (-(-end // page) - start // page) * page  # the pages the part touches
        if evicted:
            assert pages <= read <= pages + page
        else:
            assert read == 0
    finally:
        ing.close()


def test_prefetch_reads_ahead_for_the_hasher(tmp_path: Path) -> None:
    """Bytes an earlier run wrote (a resume): prefetch starts their reads at once, in the
    thread that asks, so the hash finds them in the page cache."""
    if not page_cache_evictable(tmp_path):
        pytest.skip(f"{tmp_path}: the page cache cannot be evicted here (tmpfs?)")
    data = os.urandom(6 * MiB)
    ing = _ingest(tmp_path, data)
    buf = memoryview(bytearray(MiB))
    try:
        evict(ing.data_path)
        assert 4 * MiB <= measured(lambda: ing.prefetch(MiB, 5 * MiB)) <= 4 * MiB + 2 * PAGE
        h = hashlib.sha256()
        assert measured(lambda: ing.hash_range(h, MiB, 5 * MiB, buf)) == 0
        assert h.hexdigest() == hashlib.sha256(data[MiB:5 * MiB]).hexdigest()
        evict(ing.data_path)
        assert measured(lambda: ing.prefetch(5, 5)) == 0  # nothing asked: nothing read
    finally:
        ing.close()
    ing.prefetch(0, MiB)  # closed: advice only, no error


def test_hash_range_of_a_file_shorter_than_recorded_is_an_error(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    ing = _ingest(tmp_path, data)
    try:
        os.truncate(ing.data_path, MiB)
        with pytest.raises(StoreUnwritable, match="shorter"):
            ing.hash_range(hashlib.sha256(), 0, len(data), memoryview(bytearray(MiB)))
    finally:
        ing.close()


@settings(max_examples=500, deadline=None)
@example(connections=16, adaptive=False, window=192 * MiB, size=10_321_920, fixed=None)
@example(connections=16, adaptive=False, window=192 * MiB, size=10_321_919, fixed=None)
@example(connections=1, adaptive=False, window=MiB // 4, size=1_228_799, fixed=None)
@example(connections=16, adaptive=False, window=192 * MiB, size=1 << 30, fixed=None)
@given(connections=st.integers(1, 64), adaptive=st.booleans(),
       window=st.integers(1, 2048).map(lambda m: m * MiB // 4),
       size=st.integers(0, 1 << 36), fixed=st.none() | st.integers(4096, 64 * MiB))
def test_chunk_sizes_are_even_and_keep_off_page_multiples(
        connections: int, adaptive: bool, window: int, size: int, fixed: int | None) -> None:
    o = DownloadOptions(connections=connections, adaptive=adaptive, window_bytes=window)
    if fixed is not None:
        o = DownloadOptions(connections=connections, window_bytes=window, min_chunk=fixed,
                            max_chunk=fixed)
    c = chunk_size_for(o, size)
    assert c <= o.max_chunk
    if fixed is not None:
        assert c == fixed  # the user's size, whatever it is
    elif c < size:  # more than one chunk
        assert c % PAGE != 0
        n = -(-size // c)
        assert size - (n - 1) * c >= c - 2 * n  # even: the last chunk is no sliver
        assert 2 * c >= o.min_chunk  # at most halved by the evening out
    else:
        assert c >= o.min_chunk  # one chunk: one plain GET


def test_default_chunks_are_as_large_as_allowed() -> None:
    # the default window (192 MiB) over 16 connections: 8 MiB at most; a 1 GiB blob in
    # 129 even chunks (128 would be page multiples; spec/pull.md, "Chunks")
    assert chunk_size_for(DownloadOptions(), 1 << 30) == -(-(1 << 30) // 129)
    assert chunk_size_for(DownloadOptions(), 3 * MiB) == 3 * MiB  # one chunk: one GET
    assert chunk_size_for(DownloadOptions(), 20 * MiB + 1) == -(-(20 * MiB + 1) // 3)
