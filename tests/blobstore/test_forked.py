"""The forked helper GC uses to stat and unlink on a second core, and its fallbacks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blobstore.digest import Digest
from blobstore.gc import GCOptions, _blob_table, _stat_blob_folder, gc
from blobstore.store import Store
from tests.blobstore.gcutil import add_model, assert_no_missing_blobs

ROOT = Path(__file__).resolve().parents[2]
LATER = time.time() + 10 * 86400


def test_blob_table_reads_every_kind_of_entry(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    a = Digest.of_bytes(b"a")
    (blobs / a.filename).write_bytes(b"a" * 10)
    (blobs / a.legacy_filename).write_bytes(b"a" * 5)  # Ollama's pre-2024 name, same blob
    b = Digest.of_bytes(b"b")
    (blobs / b.filename).write_bytes(b"")
    (blobs / f"{b.filename}-partial-3").write_bytes(b"xx")  # Ollama's unfinished download
    (blobs / "notes.txt").write_bytes(b"not a blob")
    os.mkdir(blobs / Digest.of_bytes(b"dir").filename)  # a folder with a blob's name
    os.symlink(blobs / a.filename, blobs / Digest.of_bytes(b"link").filename)
    (blobs / os.fsdecode(b"sha256-\xff\xfe")).write_bytes(b"undecodable name")
    os.utime(blobs / b.filename, (1000.5, 2000.25))
    table, partials = _blob_table(_stat_blob_folder(str(blobs)))
    assert set(table) == {a, b}
    assert table[a][1] == 15  # both copies count
    assert table[b] == (b.filename, 0, 2000.25, 1000.5)
    assert partials == [f"{b.filename}-partial-3"]
    assert _blob_table(_stat_blob_folder(str(tmp_path / "missing"))) == ({}, [])


CHILD = """
import os, sys, threading, time
from blobstore import _forked
from blobstore.gc import _stat_blob_folder

folder = sys.argv[1]
child = _forked.start(lambda out: out.write(_stat_blob_folder(folder)))
assert child is not None and child.pid != os.getpid()
assert child.result() == _stat_blob_folder(folder)
failing = _forked.start(lambda out: 1 / 0)
assert failing is not None and failing.result() is None  # failure reported, not raised
slow = _forked.start(lambda out: time.sleep(60))
assert slow is not None
t0 = time.monotonic()
slow.cancel()  # killed and reaped at once: no zombie left behind
assert time.monotonic() - t0 < 5
try:
    os.kill(slow.pid, 0)
    raise AssertionError("child still there")
except ProcessLookupError:
    pass
stop = threading.Event()
t = threading.Thread(target=stop.wait)
t.start()
try:
    assert _forked.start(lambda out: None) is None  # never fork a threaded process
finally:
    stop.set()
    t.join()
print("ok")
"""


def test_forked_child_gives_the_same_result_and_fails_safely(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    for i in range(50):
        store.put_bytes(b"blob %d" % i)
    # a fresh process: pytest's own threads must not decide whether forking is tried
    p = subprocess.run([sys.executable, "-c", CHILD, str(store.layout.blobs)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


def test_gc_in_a_threaded_process_does_the_same_work_in_process(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With another thread alive GC never forks; the result is the same."""
    caplog.set_level(logging.DEBUG, logger="blobctl.gc")
    stores = [Store(tmp_path / name) for name in ("forked", "threaded")]
    for store in stores:
        for i in range(120):
            add_model(store, f"m{i}", [b"shared", b"own %d" % i], used=1000 + i)
        for i in range(200):
            store.put_bytes(b"orphan %d" % i)
    reports = []
    for store in stores:
        stop = threading.Event()
        t = threading.Thread(target=stop.wait) if store is stores[1] else None
        if t is not None:
            t.start()
        try:
            reports.append(gc(store, GCOptions(max_size=2000), now=LATER))
        finally:
            stop.set()
            if t is not None:
                t.join()
        assert_no_missing_blobs(store)
        how = "in-process" if t is not None else "forked"
        assert f"(blob folder {how})" in caplog.text
        assert f"orphans went ({how};" in caplog.text
        caplog.clear()
    forked, threaded = reports
    assert forked.removed_models == threaded.removed_models
    assert forked.removed_blobs == threaded.removed_blobs
    assert len(forked.removed_blobs) >= 200
    assert forked.total_bytes_after == threaded.total_bytes_after <= 2000
