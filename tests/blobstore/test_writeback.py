"""Writeback starts while an ingest is written (blobstore.layout.start_writeback), so a
multi-GB commit's fsync does not wait for every byte at the end (spec/pull.md, "Writeback
as it goes").

Observed from the kernel's side: /proc/meminfo's ``Dirty`` is the page cache not yet sent
to disk. A control file written with plain ``pwrite`` must stay dirty for WINDOW seconds
(the kernel's own flusher waits ``dirty_expire_centisecs``, 30 s by default); the same
amount written through the ingest writer must leave ``Dirty`` within that same window,
before any fsync. Where the control does not hold (a file system that does not count its
pages as Dirty, or a kernel that flushes that soon by itself) writeback cannot be seen
and the test says so by skipping; on the development and CI machine (ext4) it holds.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from blobstore.digest import Digest
from blobstore.ingest import Ingest
from blobstore.layout import Layout, start_writeback

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux only")]

MiB = 1 << 20
SIZE = 96 * MiB
WINDOW = 3.0  # seconds: the control stays dirty this long; writeback must beat it


def dirty() -> int:
    """Bytes of dirty page cache, machine-wide."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Dirty line in /proc/meminfo")


def settle(limit: int, seconds: float = WINDOW) -> int:
    """Wait until Dirty is at most ``limit`` (or ``seconds`` passed); return it."""
    end = time.monotonic() + seconds
    while (d := dirty()) > limit and time.monotonic() < end:
        time.sleep(0.05)
    return d


def stays_dirty(path: Path) -> int:
    """The control: SIZE bytes written with plain pwrite stay dirty for WINDOW seconds
    (the kernel does not write them back on its own in that time). Returns Dirty after
    the control is synced and gone: the baseline for the test."""
    os.sync()
    before = dirty()
    block = os.urandom(4 * MiB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, SIZE, len(block)):
            os.pwrite(fd, block, off)
        time.sleep(WINDOW)
        held = dirty() - before
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    if held < SIZE * 0.7:
        pytest.skip(f"only {held / MiB:.0f} of {SIZE / MiB:.0f} MiB written with plain pwrite "
                    f"were still counted as Dirty after {WINDOW:g} s: writeback cannot be "
                    "observed on this file system / kernel")
    return dirty()


@settings(max_examples=3, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk_mib=st.integers(1, 8), order=st.randoms(use_true_random=False))
def test_ranged_ingest_writes_back_each_finished_chunk(tmp_path_factory: pytest.TempPathFactory,
                                                       chunk_mib: int, order: object) -> None:
    root = tmp_path_factory.mktemp("wb")
    before = stays_dirty(root / "control")
    data = os.urandom(SIZE)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    chunk = chunk_mib * MiB
    ing = Ingest.for_digest(Layout(root), digest, SIZE, chunk)
    starts = list(range(0, SIZE, chunk))
    order.shuffle(starts)  # type: ignore[attr-defined]
    view = memoryview(data)
    for a in starts:
        b = min(a + chunk, SIZE)
        ing.write_at(view[a:b], a)
        ing.mark_done(a, b)
    left = settle(before + SIZE // 4)
    assert left <= before + SIZE // 4, f"{(left - before) / MiB:.0f} MiB still dirty"
    assert ing.commit(digest) == digest
    assert (root / "blobs" / digest.filename).stat().st_size == SIZE


def test_appends_write_back_as_they_go(tmp_path: Path) -> None:
    before = stays_dirty(tmp_path / "control")
    ing = Ingest.new(Layout(tmp_path))
    block = os.urandom(3 * MiB + 17)  # not a multiple of the writeback stretch
    h = hashlib.sha256()
    n = 0
    while n < SIZE:
        ing.append(block)
        h.update(block)
        n += len(block)
    left = settle(before + SIZE // 4)
    assert left <= before + SIZE // 4, f"{(left - before) / MiB:.0f} MiB still dirty"
    digest = ing.commit()
    assert digest.hex == h.hexdigest()


def test_start_writeback_ignores_what_it_cannot_do_and_goes_on(tmp_path: Path) -> None:
    r, w = os.pipe()  # ESPIPE: not a file
    try:
        start_writeback(r, 0, 4096)
    finally:
        os.close(r)
        os.close(w)
    before = stays_dirty(tmp_path / "control")
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start_writeback(fd, 0, 0)
        block = os.urandom(4 * MiB)
        for off in range(0, SIZE, len(block)):
            os.pwrite(fd, block, off)
        start_writeback(fd, 0, SIZE)  # a pipe's refusal did not switch it off
        left = settle(before + SIZE // 4)
        assert left <= before + SIZE // 4, f"{(left - before) / MiB:.0f} MiB still dirty"
    finally:
        os.close(fd)

